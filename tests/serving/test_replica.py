"""The pieces of the Ray deployment without Ray: the routing head routes as the whole system does, a replica
holding only the routed expert generates what the whole system generates, evicts and reloads it identically,
and notices a newer save of the folder."""

from __future__ import annotations

import pytest
import torch

from dylora_moe.serving.config import ServerConfig
from dylora_moe.serving.engine import Engine, GenerationRequest
from dylora_moe.serving.metrics import Metrics
from dylora_moe.serving.ray_ingress import expert_key, parse_key, same_routing
from dylora_moe.serving.replica import ReplicaSystem, StaleVersion
from dylora_moe.serving.routing_head import RoutingHead
from dylora_moe.serving.routing_info import route_prompt
from dylora_moe.serving.system import ServedSystem
from tests.serving.conftest import two_skill_run

PROMPTS = ["3+3=", "up cd:", "12+12=", "up zz:", "hello"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return two_skill_run(tmp_path_factory.mktemp("replica"))


def routed(model, prompt: str) -> dict:
    ids = torch.tensor([model.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    return route_prompt(model, ids, torch.ones_like(ids))[0]


def complete(system, prompt: str) -> tuple[str, dict]:
    engine = Engine(system, ServerConfig(), Metrics())
    try:
        gen = engine.submit(GenerationRequest(prompt, 12)).result(timeout=60)
    finally:
        engine.close()
    return gen.text, gen.routing


def test_the_routing_head_routes_as_the_whole_system(run):
    head, full = RoutingHead(run), ServedSystem(run)
    assert head.version and head.model.experts.expert_ids == [0, 1]
    assert len(head.model.backbone.model.layers) == 1  # route_layer 0: one decoder layer, never run
    routes = [routed(head.model, p) for p in PROMPTS]
    assert routes == [routed(full.model, p) for p in PROMPTS]
    assert {r["experts"][0]["expert_id"] for r in routes} == {0, 1}


def test_a_replica_with_only_the_routed_expert_answers_as_the_whole_system(run):
    full, replica = ServedSystem(run), ReplicaSystem(run)
    assert replica.resident == []
    texts = {}
    for prompt in PROMPTS:
        want_text, want_routing = complete(full, prompt)
        expert = want_routing["experts"][0]["expert_id"]
        held = replica.hold(replica.version, (expert,))
        assert replica.resident == [expert]
        text, routing = complete(replica, prompt)
        assert (text, routing) == (want_text, want_routing)
        texts[prompt, expert] = text
        held.release()  # as Ray's LRU eviction does: the expert is dropped, and loaded again next time
        assert replica.resident == []
    # the experts matter: the same prompt through the other expert reads differently
    with full.model.force_expert(1 - routed(full.model, "3+3=")["experts"][0]["expert_id"]):
        other, _ = complete(full, "3+3=")
    assert other != next(t for (p, _), t in texts.items() if p == "3+3=")


def test_a_held_expert_stays_while_in_use_and_a_new_save_is_a_new_version(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    replica = ReplicaSystem(copy)
    held = replica.hold(replica.version, (0,))
    replica.using_enter(held)
    held.release()
    assert replica.resident == [0]  # evicted while a request generates with it: kept until it finishes
    assert replica.using_exit(held)
    replica.collect()
    assert replica.resident == []
    with pytest.raises(ValueError, match="no expert"):
        replica.hold(replica.version, (7,))
    old, head = replica.version, RoutingHead(copy)
    held = replica.hold(old, (0,))
    loads = []
    load_expert = replica.model.experts.load_expert
    replica.model.experts.load_expert = lambda *a: (loads.append(a[0]), load_expert(*a))
    full = ServedSystem(copy)
    full.model.mark_mature(1, False)  # any change saved is a new version
    full.save(full.model, full.memory)
    assert head.refresh() and head.version != old and head.model.router.strategy == "dense"
    assert head.refresh() is False  # nothing saved since: one stat, no reload
    both = replica.hold(head.version, (0, 1))  # the first request routed on the new version moves the replica
    assert replica.version == head.version and replica.current(both) and not replica.current(held)
    assert loads == [1]  # expert 0's files did not change: kept across the versions, not read again
    for prompt in PROMPTS[:2]:  # dense: the replica holds the whole pool and mixes it as the whole system does
        text, routing = complete(replica, prompt)
        assert routing["strategy"] == "dense" and (text, routing) == complete(full, prompt)
    with pytest.raises(StaleVersion):
        replica.hold(old, (0,))


def test_multiplexed_ids_name_the_experts_a_request_needs():
    sparse = {"strategy": "sparse", "experts": [{"expert_id": 3, "weight": 0.7}, {"expert_id": 1, "weight": 0.3}]}
    dense = {"strategy": "dense", "experts": [{"expert_id": 0, "weight": 0.9}]}
    assert expert_key("v1", sparse, [0, 1, 2, 3]) == "v1:1+3"
    assert expert_key("v1", dense, [0, 1, 2]) == "v1:0+1+2"  # dense: the whole pool, whatever the weights
    assert expert_key("v1", {"strategy": "none", "experts": []}, []) == "v1:none"
    assert parse_key("v1:1+3") == ("v1", (1, 3)) and parse_key("v1:none") == ("v1", ())
    with pytest.raises(ValueError, match="version:ids"):
        parse_key("1+3")
    assert same_routing(sparse, sparse)
    assert not same_routing(sparse, {**sparse, "strategy": "dense"})
    assert not same_routing(dense, {"strategy": "dense", "experts": [{"expert_id": 0, "weight": 0.8}]})
