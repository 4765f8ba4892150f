"""What a response says about its routing: the experts that matter, and the rest summed up."""

from __future__ import annotations

import pytest

from dylora_moe.serving.config import ServerConfig
from dylora_moe.serving.continuous import RunningBatch
from dylora_moe.serving.metrics import Metrics
from dylora_moe.serving.routing_info import summarise
from tests.serving.test_continuous import request, system


def info(*weights: float) -> dict:
    return {"strategy": "dense", "granularity": "sequence",
            "experts": [{"expert_id": i, "skill": None, "weight": w} for i, w in enumerate(weights)]}


def test_summarise_keeps_the_heaviest_experts_above_the_threshold():
    dense = info(0.5, 0.3, 0.15, 0.04, 0.006, 0.004)
    out = summarise(dense, top=4, min_weight=0.01)
    assert [e["expert_id"] for e in out["experts"]] == [0, 1, 2, 3]
    assert out["omitted_experts"] == 2 and out["omitted_weight"] == pytest.approx(0.01)
    out = summarise(dense, top=1, min_weight=0.01)
    assert [e["expert_id"] for e in out["experts"]] == [0] and out["omitted_experts"] == 5
    flat = summarise(info(*[0.005] * 200), top=4, min_weight=0.01)
    assert len(flat["experts"]) == 1 and flat["omitted_experts"] == 199  # the heaviest is always named
    sparse = info(0.7, 0.3)
    assert summarise(sparse, top=4, min_weight=0.01) is sparse


def test_a_dense_response_lists_the_top_experts_and_the_metrics_count_every_weight():
    model, metrics = system("dense"), Metrics()
    batch = RunningBatch(model, ServerConfig(routing_top=2), metrics)
    r = request(model, "hello world", 2)
    batch.join([r])
    while batch.size:
        batch.step()
    routing = r.future.result(timeout=0).routing
    assert len(routing["experts"]) == 2 and routing["omitted_experts"] == 1
    listed = sum(e["weight"] for e in routing["experts"])
    assert listed + routing["omitted_weight"] == pytest.approx(1.0, abs=1e-5)
    counted = {s.labels["expert"]: s.value for m in metrics.routing_weight.collect() for s in m.samples
               if s.name.endswith("_total")}
    assert len(counted) == 3 and sum(counted.values()) == pytest.approx(1.0, abs=1e-5)
