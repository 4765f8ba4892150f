"""``dylora serve --ray`` on a local Ray cluster (2 CPUs) started by this module: answers equal to
``dylora serve``'s, requests sent to the replica holding their expert, LRU eviction and reload, a replica
killed during traffic, a skill uploaded during traffic.

One cluster and one deployment (2 generation replicas, one expert each) serve the whole module; the slow
tests run in file order after the default one, the upload last since it changes the system."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from fastapi.testclient import TestClient
from ray import serve
from ray.serve.schema import ServeDeploySchema

from dylora_moe.serving import ROUTING_HEADER, create_app
from dylora_moe.serving.ray_config import RayServeConfig
from tests.serving.conftest import AUTH, KEY, MODEL, server_config, two_skill_run, wait

SERVE_YAML = Path(__file__).parents[2] / "configs" / "ray" / "serve.yaml"
DIGITS, LETTERS = ["3+3=", "12+12=", "7+7="], ["up cd:", "up zz:", "up kq:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout(**overrides) -> RayServeConfig:
    """Fractions of the 2 CPUs: two replicas, an ingress, and room for a second application."""
    return RayServeConfig(**{"replicas": 2, "experts_per_replica": 1, "replica_cpus": 0.4, "ingress_cpus": 0.2,
                             **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return two_skill_run(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """``dylora serve``'s answers (one process) on a copy of the run as it is before any upload."""
    copy = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(run, copy)
    with TestClient(create_app(copy, server_config())) as client:
        yield client


# Ray Serve sends a multiplexed request elsewhere when the replica holding its id does not answer a queue-length
# probe within 0.1 s (doubling up to 1 s) or within the 1 s matching window: on a machine busy with other work
# that happens to idle replicas too. The tests check the policy, so they give the probes time to answer.
# Likewise the controller kills an HTTP proxy that is not ready within 5 s (or misses three 10 s health checks),
# and on a busy machine starting one takes longer: the module's fixture then fails before any test runs.
PATIENT_PROBES = {"RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "2.0",
                  "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5.0",
                  "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "5.0",
                  "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120.0",
                  "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60.0"}


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in PATIENT_PROBES}
    os.environ.update(PATIENT_PROBES)  # the local cluster's processes (controller, proxies) inherit them
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": PATIENT_PROBES})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def url(cluster, run):
    from dylora_moe.serving.ray_app import build_app

    serve.run(build_app(run, server_config(), layout()), name="dylora", route_prefix="/")
    return cluster


def complete(http: httpx.Client, prompt: str, base: str = "") -> httpx.Response:
    return http.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8})


def answer(response: httpx.Response) -> tuple[str, list[int]]:
    body = response.json()
    return body["choices"][0]["text"], [e["expert_id"] for e in body["routing"]["experts"]]


def serve_round(http: httpx.Client, reference: TestClient) -> dict[int, set[str]]:
    """One request per prompt, each answered as ``dylora serve`` answers it; the replicas that served each expert."""
    replicas: dict[int, set[str]] = {0: set(), 1: set()}
    for prompt in DIGITS + LETTERS:
        r = complete(http, prompt)
        assert r.status_code == 200, r.text
        body, want = r.json(), complete(reference, prompt).json()
        assert body["choices"] == want["choices"] and body["usage"] == want["usage"]
        routing = body["routing"]
        assert json.loads(r.headers[ROUTING_HEADER]) == routing
        assert routing["experts"] == want["routing"]["experts"] and routing["system_version"]
        replicas[routing["experts"][0]["expert_id"]].add(routing["replica"])
    return replicas


def settled(replicas: dict[int, set[str]]) -> bool:
    return len(replicas[0]) == len(replicas[1]) == 1 and replicas[0] != replicas[1]


def test_ray_answers_as_dylora_serve_from_the_replica_holding_the_expert(url, reference):
    with httpx.Client(base_url=url, timeout=120) as http:
        # The first requests load each expert somewhere; the replicas' resident ids then reach the ingress's router
        # through the controller, which takes a while on a busy machine: wait for one round served by the holders
        # (each expert on one replica, a different one each), then every later round must stay on them.
        deadline, rounds = time.monotonic() + 90, []
        while not (rounds and settled(rounds[-1])):
            assert time.monotonic() < deadline, f"requests never settled on the replicas holding them: {rounds}"
            rounds.append(serve_round(http, reference))
            time.sleep(1)
        replicas = rounds[-1]
        for _ in range(2):
            assert serve_round(http, reference) == replicas
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "up cd:"}], "max_tokens": 6}
        got, want = http.post("/v1/chat/completions", json=chat).json(), reference.post("/v1/chat/completions",
                                                                                        json=chat).json()
        assert got["choices"] == want["choices"]
        stream = http.post("/v1/completions", json={"model": MODEL, "prompt": "3+3=", "max_tokens": 8, "stream": True})
        chunks = [json.loads(line[6:]) for line in stream.text.split("\n\n") if line.startswith("data: {")]
        texts = [c["choices"][0]["text"] for c in chunks]
        assert "".join(texts) == complete(reference, "3+3=").json()["choices"][0]["text"]
        assert sum(map(bool, texts)) > 1  # token by token through Ray Serve's streaming handle
        assert json.loads(stream.headers[ROUTING_HEADER])["replica"] == chunks[0]["routing"]["replica"]
        assert http.post("/v1/completions", json={"model": "other", "prompt": "x"}).json()["error"]["code"] == \
            "model_not_found"
        assert http.post("/skills", json={"name": "x", "examples": []}).status_code == 401  # no key
        assert http.get("/experts").json()["data"] == reference.get("/experts").json()["data"]
        metrics = http.get("/metrics").text
        (replica,) = replicas[0]
        assert f'dylora_replica_requests_total{{expert="0",replica="{replica}"}}' in metrics
        assert f'dylora_replica_expert_resident{{expert="0",replica="{replica}"}} 1.0' in metrics


@pytest.mark.slow
def test_an_evicted_expert_is_reloaded_with_identical_answers(cluster, run, reference):
    from dylora_moe.serving.ray_app import build_app

    # a second application: one replica that keeps one expert, so alternating skills evict each other
    serve.run(build_app(run, server_config(api_key=None), layout(replicas=1, app_name="lru")), name="lru",
              route_prefix="/lru")
    try:
        with httpx.Client(base_url=cluster, timeout=120) as http:
            seen = []
            for prompt in ["3+3=", "up cd:", "3+3=", "up cd:", "3+3="]:
                r = complete(http, prompt, "/lru")
                assert r.status_code == 200, r.text
                assert r.json()["choices"] == complete(reference, prompt).json()["choices"]
                seen.append((answer(r), r.json()["routing"]["replica"]))
            assert len({replica for _, replica in seen}) == 1
            assert seen[0][0] == seen[2][0] == seen[4][0] and seen[1][0] == seen[3][0] and seen[0][0] != seen[1][0]
            metrics, replica = http.get("/lru/metrics").text, seen[-1][1]
            assert f'dylora_replica_expert_resident{{expert="1",replica="{replica}"}} 0.0' in metrics
    finally:
        serve.delete("lru")


@pytest.mark.slow
def test_a_dense_router_sends_each_request_to_a_replica_holding_the_whole_pool(cluster, run, tmp_path):
    """While an expert is immature every prompt mixes the whole pool: the request's expert set is the pool, one
    multiplexed id, and the replica that holds it answers as ``dylora serve`` does with the same dense weights."""
    from dylora_moe import DyLoRAMoE
    from dylora_moe.training.progress import MEMORY

    dense = tmp_path / "dense"
    shutil.copytree(run, dense)
    system = dense / "system"
    model = DyLoRAMoE.from_pretrained(system)
    model.router.set_maturity(1, False)  # expert 1 just created: the router mixes densely
    memory = (system / MEMORY).read_bytes()
    model.save_pretrained(system, extra=lambda folder: (folder / MEMORY).write_bytes(memory))
    # deployed as ``serve run configs/ray/serve.yaml`` would, from the file's args with this folder and layout
    (spec,) = ServeDeploySchema(**yaml.safe_load(SERVE_YAML.read_text())).applications
    args = {**spec.args, "system": str(dense), "server": {**spec.args["server"], "model_name": MODEL},
            "ray": asdict(layout(replicas=1, app_name="dense"))}
    module, name = spec.import_path.split(":")
    serve.run(getattr(importlib.import_module(module), name)(args), name="dense", route_prefix="/dense")
    try:
        with httpx.Client(base_url=cluster, timeout=120) as http, \
                TestClient(create_app(dense, server_config(api_key=None))) as single:
            for prompt in ["3+3=", "up cd:", "12+12="]:
                r, want = complete(http, prompt, "/dense"), complete(single, prompt).json()
                assert r.status_code == 200, r.text
                routing = r.json()["routing"]
                assert routing["strategy"] == want["routing"]["strategy"] == "dense"
                assert r.json()["choices"] == want["choices"]
                assert len(routing["experts"]) + routing.get("omitted_experts", 0) == 2  # both mixed
                assert same_weights(routing["experts"], want["routing"]["experts"])
                assert routing.get("omitted_weight") == want["routing"].get("omitted_weight")
            metrics = http.get("/dense/metrics").text
            for expert in (0, 1):
                assert f'dylora_replica_expert_resident{{expert="{expert}",replica="{routing["replica"]}"}} 1.0' \
                    in metrics
    finally:
        serve.delete("dense")


def same_weights(got: list[dict], want: list[dict], tol: float = 1e-4) -> bool:
    return [e["expert_id"] for e in got] == [e["expert_id"] for e in want] and all(
        abs(a["weight"] - b["weight"]) <= tol for a, b in zip(got, want, strict=True))


def traffic(url: str, prompts: list[str], stop: threading.Event, out: list, clients: int = 3) -> list[threading.Thread]:
    def loop(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            n = i
            while not stop.is_set():
                prompt = prompts[n % len(prompts)]
                n += 1
                try:
                    r = complete(http, prompt)
                    out.append((prompt, r.status_code, r.json(), dict(r.headers)))
                except httpx.HTTPError as err:
                    out.append((prompt, 0, {"error": str(err)}, {}))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.slow
def test_a_replica_killed_during_traffic_costs_no_wrong_answer(url, reference):
    want = {p: complete(reference, p).json()["choices"] for p in DIGITS + LETTERS}
    out, stop = [], threading.Event()
    threads = traffic(url, DIGITS + LETTERS, stop, out)
    try:
        time.sleep(3)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "Generator" in a["name"]]
        victim = ray.get_actor(names[0], namespace="serve")
        before = len(out)
        ray.kill(victim, no_restart=True)  # Ray Serve's controller starts a replacement
        time.sleep(8)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert before > 0 and len(out) > before
    for prompt, status, body, headers in out:
        if status == 200:
            assert body["choices"] == want[prompt]  # never another expert's answer, never a partial one
        else:
            assert status == 503 and body["error"]["code"] == "replicas_unavailable" and headers["retry-after"]
    with httpx.Client(base_url=url, timeout=120) as http:
        deadline = time.monotonic() + 60
        while complete(http, "3+3=").status_code != 200 and time.monotonic() < deadline:
            time.sleep(1)
        assert complete(http, "up cd:").status_code == 200


@pytest.mark.slow
def test_a_skill_uploaded_during_traffic_costs_no_error(url, run):
    words = [{"prompt": f"spell {n}:", "response": w} for n, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"] * 3)]
    out, stop = [], threading.Event()
    threads = traffic(url, DIGITS + LETTERS, stop, out)
    try:
        with httpx.Client(base_url=url, timeout=120, headers=AUTH) as http:
            version = complete(http, "3+3=").json()["routing"]["system_version"]
            r = http.post("/skills", json={"name": "words", "examples": words, "chat": False})
            assert r.status_code == 202, r.text
            job = wait(http, r.json()["id"])
            time.sleep(2)  # requests keep coming on the new version
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert job["status"] == "succeeded" and job["result"]["novel"] and job["result"]["expert_id"] == 2, job
    assert out and {status for _, status, _, _ in out} == {200}
    versions = [body["routing"]["system_version"] for _, _, body, _ in out]
    assert versions[0] == version and versions[-1] != version  # served across the swap
    with httpx.Client(base_url=url, timeout=120) as http:
        assert http.get("/health").json()["experts"] == 3
        with TestClient(create_app(run, server_config(api_key=None))) as single:
            for prompt in ["spell 3:", "3+3=", "up cd:"]:
                got, want = complete(http, prompt).json(), complete(single, prompt).json()
                assert got["choices"] == want["choices"]
                routing = {k: v for k, v in got["routing"].items() if k not in ("replica", "system_version")}
                assert routing == want["routing"] and routing["strategy"] == job["result"]["routing_strategy"]


def test_the_serve_config_builder_refuses_unknown_settings_by_name(tmp_path):
    from dylora_moe.serving.ray_app import app_builder

    with pytest.raises(ValueError, match="need 'system'"):
        app_builder({"server": {}})
    with pytest.raises(ValueError, match=r"args.ray has unknown field\(s\) \['replica'\]"):
        app_builder({"system": str(tmp_path), "ray": {"replica": 2}})
    with pytest.raises(ValueError, match="max_replicas=1 is below min_replicas=2"):
        app_builder({"system": str(tmp_path), "ray": {"min_replicas": 2, "max_replicas": 1}})


def test_the_serve_config_builder_checks_the_types_of_settings(tmp_path, monkeypatch):
    from dylora_moe.serving import ray_app

    built = []
    monkeypatch.setattr(ray_app, "build_app", lambda path, config, ray_config, overrides: built.append(
        (config, ray_config)))
    ray_app.app_builder({"system": str(tmp_path), "server": {"max_batch": "8", "body_timeout": "2.5"},
                         "ray": {"replicas": "3"}})  # numbers written as text, as YAML may give them
    (config, ray_config), = built
    assert (config.max_batch, config.body_timeout, ray_config.replicas) == (8, 2.5, 3)
    with pytest.raises(ValueError, match=r"ServerConfig.max_batch must be a number, got 'eight'"):
        ray_app.app_builder({"system": str(tmp_path), "server": {"max_batch": "eight"}})
    with pytest.raises(ValueError, match=r"ServerConfig.max_queue must be a whole number"):
        ray_app.app_builder({"system": str(tmp_path), "server": {"max_queue": 1.5}})
    with pytest.raises(ValueError, match=r"ServerConfig.batching must be text"):
        ray_app.app_builder({"system": str(tmp_path), "server": {"batching": 1}})
    with pytest.raises(ValueError, match=r"RayServeConfig.replica_cpus must be a number"):
        ray_app.app_builder({"system": str(tmp_path), "ray": {"replica_cpus": "two"}})


def test_the_folder_has_one_writer_while_uploads_are_on(url, run):
    from dylora_moe.checkpoint import FolderBusy, writer_lock

    with pytest.raises(FolderBusy, match="dylora serve --ray"), writer_lock(run / "system", wait=0):
        pass
    assert KEY  # the module's deployment takes uploads, so its skill-job actor holds the lock
