"""``benchmarks/ray_load.py``: the `dylora serve` side of the Ray comparison runs as users run it, a process of
its own, with the same untimed warm-up as the Ray side, while the clients run in this process."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from tests.serving.conftest import empty_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import load_test
import ray_load


def test_the_single_server_is_its_own_process_and_warmed_up_like_ray(tmp_path, monkeypatch):
    run = empty_run(tmp_path)
    args = load_test.parse_args(["--ray", "--clients", "2", "--duration", "1", "--max-tokens", "2",
                                 "--replicas", "1"])
    started, warmed, measured = [], [], []
    popen, phase, warm_up = subprocess.Popen, load_test.phase, ray_load.warm_up

    def record_popen(cmd, *a, **kw):
        started.append(cmd)
        return popen(cmd, *a, **kw)

    def record_warm_up(url, args, requests):
        warmed.append(requests)
        return warm_up(url, args, requests)

    def record_phase(url, *a, **kw):
        # no server thread in the clients' process while they are timed
        measured.append([t.name for t in threading.enumerate() if "uvicorn" in t.name])
        return phase(url, *a, **kw)

    monkeypatch.setattr(load_test, "PROMPTS", ("def f(x):", "module m;"))  # the tiny model's context is short
    monkeypatch.setattr(load_test.subprocess, "Popen", record_popen)
    monkeypatch.setattr(load_test, "phase", record_phase)
    monkeypatch.setattr(ray_load, "warm_up", record_warm_up)
    result = ray_load.single_process(run, args, tmp_path / "serve.log")
    assert len(started) == 1 and "serve" in started[0] and str(run) in started[0]
    assert warmed == [4 * args.replicas]
    assert measured == [[]]
    assert result["requests"] > 0 and result["errors"] == 0
