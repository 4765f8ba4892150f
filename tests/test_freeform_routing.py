"""benchmarks/freeform_routing.py on a tiny stream: experts from the novelty detector, gate fits only, every
free-form set routed in both forms, and the arms' results side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import write_tiny_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import freeform_routing


def test_system_overrides_are_merged_into_nested_sections():
    system = {"router": {"top_k": 2}, "model": "m"}
    merged = freeform_routing.system_dict(system, ["router.route_layer=6", "model=other", "novelty.layer=3"])
    assert merged == {"router": {"top_k": 2, "route_layer": 6}, "model": "other", "novelty": {"layer": 3}}
    assert system == {"router": {"top_k": 2}, "model": "m"}  # the stream's own section is left alone
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        freeform_routing.system_dict(system, ["router.route_layer"])


def test_a_tiny_stream_is_routed_per_arm(tmp_path):
    stream = write_tiny_run(tmp_path, n=16, steps=1)
    out = tmp_path / "routing.json"
    freeform_routing.main(["--stream", str(stream), "--system", f"model={tmp_path / 'model'}", "--arm", "default",
                           "--arm", "raw:raw_routing=true", "--limit", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [a["arm"] for a in result["arms"]] == ["default", "raw"]
    for arm in result["arms"]:
        assert set(arm["expert_of"]) == {"digits", "letters", "digits-again"}
        assert set(arm["held_out_routing"]) == {"digits", "letters", "digits-again"}
        assert all(0.0 <= v <= 1.0 for v in arm["held_out_routing"].values())
        examples = [s for s in arm["sets"] if s["skill"] == "examples"]  # the README requests: no skill's own
        assert [s["form"] for s in examples] == ["chat", "raw"]
        assert all(s["right"] is None and sum(s["picks"].values()) == s["n"] for s in examples)
    assert result["arms"][1]["overrides"] == {"raw_routing": True}
