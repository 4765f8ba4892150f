"""The load of ``load_test.py`` against ``dylora serve`` and against the Ray Serve deployment, one after the
other in one run, on the same system and the same machine.

    python benchmarks/load_test.py --ray                            # 16 clients x 40 s per server
    python benchmarks/load_test.py --ray --duration 60 --max-tokens 16 --max-batch 8   # the README's run
    python benchmarks/load_test.py --ray --duration 10 --clients 4  # a quick check

A fresh default-model system first learns two skills through ``dylora serve`` (the 32 shortest HumanEval and
VerilogEval problems; not timed), so requests are routed to two real experts. Then the clients (completions
and chat, greedy, --max-tokens new tokens, prompts of both skills) load ``dylora serve`` as users run it, a
process of its own (the clients are threads of this one), which is stopped, then the Ray Serve app on a local Ray
cluster (--replicas generation replicas holding --experts-per-replica experts each, an ingress; same batch,
token cap and scheduler options). Both servers get the same untimed warm-up requests first. Writes both
phases (requests, errors, p50/p99, throughput), the requests each replica answered, and a paper extrapolation
from the measured per-replica throughput to N replicas on N machines (results/load_test_ray.json).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from pathlib import Path

import httpx

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.data.sources import humaneval, verilogeval
from dylora_moe.serving import BackgroundServer, ServerConfig, create_app
from dylora_moe.training.config import TrainingConfig

SCALE = (1, 2, 4, 8, 16, 32)  # replicas (one per machine) in the extrapolation


def learn_skills(system: Path, config: ServerConfig, key: str, job_timeout: float) -> None:
    from load_test import shortest, upload, wait_job

    app = create_app(system, config)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60.0,
                                                        headers={"Authorization": f"Bearer {key}"}) as http:
        for name, examples in (("python", humaneval()), ("verilog", verilogeval())):
            start = time.perf_counter()
            job = wait_job(http, upload(http, name, shortest(examples))["id"], job_timeout)
            print(f"setup: skill {name} {job['status']} in {time.perf_counter() - start:.0f}s")
            if job["status"] != "succeeded":
                raise RuntimeError(f"setup failed: {job['error']}")


def warm_up(url: str, args, requests: int) -> None:
    """The same untimed requests before either server's measured phase (a Ray replica loads its experts)."""
    from load_test import request_body

    with httpx.Client(base_url=url, timeout=300.0) as http:
        for i in range(requests):
            path, body = request_body(i, 1, args.max_tokens)
            http.post(path, json=body).raise_for_status()


def single_process(system: Path, args, log: Path) -> dict:
    """``dylora serve`` as users run it: a process of its own (read-only), the clients in this one."""
    from load_test import phase, served

    with served(system, "continuous", args, None, log) as url:
        warm_up(url, args, 4 * args.replicas)
        return phase(url, args.clients, args.duration, args.max_tokens)


def on_ray(system: Path, config: ServerConfig, args) -> tuple[dict, dict[str, int]]:
    import ray
    from ray import serve

    from dylora_moe.serving.ray_app import build_app
    from dylora_moe.serving.ray_config import RayServeConfig
    from load_test import phase

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # logical CPUs: the replicas share the machine's cores with the ingress, as they would not on a cluster
        layout = RayServeConfig(replicas=args.replicas, experts_per_replica=args.experts_per_replica,
                                replica_cpus=0.8 * cpus / args.replicas, ingress_cpus=0.2 * cpus)
        serve.run(build_app(system, config, layout), name="dylora", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        warm_up(url, args, 4 * args.replicas)  # every replica loads its experts first
        before = answered(url)
        result = phase(url, args.clients, args.duration, args.max_tokens)
        after = answered(url)
        return result, {replica: n - before.get(replica, 0) for replica, n in after.items()}
    finally:
        serve.shutdown()
        ray.shutdown()


def answered(url: str) -> dict[str, int]:
    """Completions answered so far by each replica, from the ingress's metrics."""
    counts: dict[str, int] = {}
    metrics = httpx.get(f"{url}/metrics").text
    for replica, n in re.findall(r'dylora_replica_requests_total\{expert="[^"]+",replica="([^"]+)"} (\S+)', metrics):
        counts[replica] = counts.get(replica, 0) + int(float(n))
    return counts


def extrapolate(ray_result: dict, replicas: int) -> dict:
    """N replicas on N machines, each answering what one replica answered here, the ingress not the limit."""
    per_replica = ray_result["requests_per_second"] / replicas
    return {"per_replica_requests_per_second": round(per_replica, 3),
            "replicas": {str(n): round(n * per_replica, 2) for n in SCALE}}


def compare(args) -> int:
    from load_test import line
    from results import write_json

    key = "bench-key"
    training = TrainingConfig(seed_steps=args.seed_steps, consolidation_steps=args.consolidation_steps,
                              batch_size=2, max_length=256, router_fit_steps=100, report_to=["none"],
                              instruction_views=False, raw_copies=False)  # the recipe it was measured with
    config = ServerConfig(model_name="dylora-moe", api_key=key, max_batch=args.max_batch, training=training)
    # Ray's servers get what `dylora serve` gets on its command line (load_test.served).
    serving = ServerConfig(model_name="dylora-moe", api_key=None, max_batch=args.max_batch, training=training,
                           max_tokens_cap=max(args.max_tokens), default_max_tokens=min(64, max(args.max_tokens)),
                           join_batch=args.join_batch, join_wait_steps=args.join_wait_steps,
                           prefill_share=args.prefill_share)
    with tempfile.TemporaryDirectory(prefix="dylora-ray-load-") as tmp:
        system = Path(tmp) / "system"
        print("building a fresh system on the default model")
        DyLoRAMoE.from_config(DyLoRAConfig(model="default")).save_pretrained(system)
        learn_skills(system, config, key, args.job_timeout)
        single = single_process(system, args, Path(tmp) / "serve.log")
        print(f"dylora serve: {line(single)} ({single['requests_per_second']} req/s)")
        ray_result, per_replica = on_ray(system, serving, args)
        print(f"ray, {args.replicas} replicas: {line(ray_result)} ({ray_result['requests_per_second']} req/s; "
              f"per replica {per_replica})")
    for result in (single, ray_result):
        result.pop("ends")
    paper = extrapolate(ray_result, args.replicas)
    write_json(args.out, {
        "system": "fresh default-model system + python and verilog skills", "clients": args.clients,
        "duration_s": args.duration, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "cpus": os.cpu_count(), "torch_threads_per_process": os.environ.get("OMP_NUM_THREADS"),
        "dylora_serve": single, "ray": {**ray_result, "replicas": args.replicas,
                                        "experts_per_replica": args.experts_per_replica,
                                        "requests_per_replica": per_replica},
        "extrapolation": paper,
    })
    return 0 if single["errors"] == ray_result["errors"] == 0 else 1
