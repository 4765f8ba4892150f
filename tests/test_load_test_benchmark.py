"""``benchmarks/load_test.py``'s summary: per mode and phase the medians over repeats of what the README's
tables quote, streamed first-token latency included, and the continuous/static ratios per repeat."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import load_test


def phase(tps: float, first: float | None, errors: int = 0) -> dict:
    return {"tokens_per_second": tps, "p50_ms": 10 * tps, "p99_ms": 20 * tps, "stream_first_token_p50_ms": first,
            "errors": errors, "requests": 5}


def test_the_summary_gives_the_median_first_token_of_streamed_requests_per_mode_and_phase():
    runs = [{m: {"serving": phase(t, f), "serving_with_upload": phase(t, None, errors=1)}
             for m, t, f in (("continuous", ct, cf), ("static", st, sf))}
            for ct, cf, st, sf in ((40.0, 400.0, 20.0, 20000.0), (50.0, 900.0, 20.0, 21000.0),
                                   (45.0, 500.0, 25.0, 25000.0))]
    out = load_test.summary(runs, ["continuous", "static"])
    assert out["serving"]["continuous"]["stream_first_token_p50_ms"] == 500.0
    assert out["serving"]["static"]["stream_first_token_p50_ms"] == 21000.0
    assert out["serving_with_upload"]["continuous"]["stream_first_token_p50_ms"] is None
    assert out["serving_with_upload"]["static"]["errors"] == 3 and out["serving"]["static"]["requests"] == 15
    assert out["serving"]["tokens_per_second_ratio"]["per_repeat"] == [2.0, 2.5, 1.8]
    assert out["serving"]["tokens_per_second_ratio"]["median"] == 2.0
