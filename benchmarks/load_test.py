"""Load test of `dylora serve` on loopback: concurrent clients for a fixed time, then the same while a skill
upload trains in the background.

    python benchmarks/load_test.py                                  # 16 clients x 60 s per phase, default model
    python benchmarks/load_test.py --duration 5 --clients 4         # a quick check
    python benchmarks/load_test.py --system runs/demo               # serve a `dylora train` output instead
    python benchmarks/load_test.py --ray                            # dylora serve vs Ray Serve (ray_load.py)

The server runs in this process (uvicorn in a thread on 127.0.0.1, a free port) and stops by itself; no
traffic leaves the machine. Without --system, a fresh system on the default model (SmolLM2-135M-Instruct)
in a temporary folder first learns one skill through `POST /skills` (the 32 shortest HumanEval problems;
not timed), so requests are routed to a real expert. Each client is a thread that sends completions and
chat completions (alternately, prompts of both skills, greedy, --max-tokens new tokens) until the phase's
time is up; every request started is awaited. Phase 1 only serves; phase 2 starts with `POST /skills`
(the 32 shortest VerilogEval problems, a new skill) and serves while the job trains, then waits for the
job (--job-timeout) and checks where a Verilog prompt is routed. Uploaded skills train with the small
sizes below (--seed-steps, --consolidation-steps; batch 2, 256 tokens). Prints per phase
`requests=N errors=E p50_ms=... p99_ms=...` and writes JSON (results/load_test.json).
"""

from __future__ import annotations

import argparse
import itertools
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from results import write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dylora_moe import DyLoRAConfig, DyLoRAMoE  # noqa: E402
from dylora_moe.cli import quiet_libraries  # noqa: E402
from dylora_moe.data.sources import Example, humaneval, verilogeval  # noqa: E402
from dylora_moe.serving import BackgroundServer, ServerConfig, create_app  # noqa: E402
from dylora_moe.training.config import TrainingConfig  # noqa: E402

MODEL = "dylora-moe"
PROMPTS = (
    "def reverse_words(sentence: str) -> str:\n    \"\"\"Reverse the order of words in a sentence.\"\"\"\n",
    "Write a Verilog module that implements a 2-to-1 multiplexer.",
    "def is_prime(n: int) -> bool:\n",
    "module and_gate(input a, input b, output y);",
    "Write a Python function that returns the largest element of a list.",
    "Implement a 4-bit synchronous counter in Verilog with an active-high reset.",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", type=Path, default=None,
                   help="a `dylora train` output or saved system folder (default: a fresh default-model system)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8, help="requests the server generates together")
    p.add_argument("--seed-steps", type=int, default=2)
    p.add_argument("--consolidation-steps", type=int, default=4)
    p.add_argument("--job-timeout", type=float, default=600.0, help="seconds to wait for a skill job")
    p.add_argument("--out", default=None, help="JSON result (default results/load_test.json, with --ray "
                                               "results/load_test_ray.json)")
    p.add_argument("--ray", action="store_true",
                   help="the same load against dylora serve and then Ray Serve (benchmarks/ray_load.py)")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: generation replicas")
    p.add_argument("--experts-per-replica", type=int, default=2, help="with --ray: experts a replica keeps loaded")
    args = p.parse_args(argv)
    args.out = args.out or ("results/load_test_ray.json" if args.ray else "results/load_test.json")
    return args


def shortest(examples: list[Example], n: int = 32) -> list[dict]:
    ranked = sorted(examples, key=lambda e: len(e.prompt) + len(e.response))[:n]
    return [{"prompt": e.prompt, "response": e.response} for e in ranked]


def wait_job(client: httpx.Client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def upload(client: httpx.Client, key: str, name: str, examples: list[dict]) -> dict:
    r = client.post("/skills", json={"name": name, "examples": examples},
                    headers={"Authorization": f"Bearer {key}"})
    r.raise_for_status()
    return r.json()


def request_body(i: int, max_tokens: int) -> tuple[str, dict]:
    prompt = PROMPTS[i % len(PROMPTS)]
    if i % 2:
        return "/v1/chat/completions", {"model": MODEL, "max_tokens": max_tokens,
                                        "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}


def phase(url: str, clients: int, duration: float, max_tokens: int) -> dict:
    """``clients`` threads send requests until ``duration`` seconds have passed; returns latencies and errors."""
    records: list[tuple[float, float, int]] = []  # (end time, ms, status; 0 = no response)
    lock = threading.Lock()
    counter = itertools.count()
    deadline = time.monotonic() + duration

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=300.0) as http:
            while time.monotonic() < deadline:
                path, body = request_body(next(counter), max_tokens)
                start = time.perf_counter()
                try:
                    status = http.post(path, json=body).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    records.append((time.time(), (time.perf_counter() - start) * 1000, status))

    started = time.time()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array([r[1] for r in records])
    errors = sum(r[2] != 200 for r in records)
    seconds = time.time() - started
    return {"requests": len(records), "errors": int(errors), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "seconds": round(seconds, 2),
            "requests_per_second": round(len(records) / seconds, 3), "ends": [r[0] for r in records]}


def line(result: dict) -> str:
    return (f"requests={result['requests']} errors={result['errors']} p50_ms={result['p50_ms']:.0f} "
            f"p99_ms={result['p99_ms']:.0f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    if args.ray:
        from ray_load import compare

        return compare(args)
    key = secrets.token_hex(16)
    training = TrainingConfig(seed_steps=args.seed_steps, consolidation_steps=args.consolidation_steps,
                              batch_size=2, max_length=256, router_fit_steps=100, report_to=["none"])
    config = ServerConfig(model_name=MODEL, api_key=key, max_batch=args.max_batch, training=training)
    with tempfile.TemporaryDirectory(prefix="dylora-load-") as tmp:
        system = args.system
        if system is None:
            system = Path(tmp) / "system"
            print("building a fresh system on the default model")
            DyLoRAMoE.from_config(DyLoRAConfig(model="default")).save_pretrained(system)
        app = create_app(system, config)
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60.0,
                                                            headers={"Authorization": f"Bearer {key}"}) as http:
            print(f"serving {system} at {server.url}")
            setup = None
            if args.system is None:
                start = time.perf_counter()
                setup = wait_job(http, upload(http, key, "python", shortest(humaneval()))["id"],
                                 args.job_timeout)
                print(f"setup: skill python {setup['status']} in {time.perf_counter() - start:.0f}s")
                if setup["status"] != "succeeded":
                    print(f"setup failed: {setup['error']}")
                    return 1
            experts_before = len(http.get("/experts").json()["data"])

            serving = phase(server.url, args.clients, args.duration, args.max_tokens)
            print(f"serving: {line(serving)}")

            job = upload(http, key, "verilog", shortest(verilogeval()))
            with_upload = phase(server.url, args.clients, args.duration, args.max_tokens)
            state_at_end = http.get(f"/jobs/{job['id']}").json()
            print(f"serving + upload: {line(with_upload)} (job {state_at_end['status']} at the end of the phase, "
                  f"{state_at_end['progress']['steps_done']}/{state_at_end['progress']['steps_total']} steps)")
            job = wait_job(http, job["id"], args.job_timeout)
            finished = job["finished"] or time.time()
            during = sum(job["started"] is not None and job["started"] <= t <= finished for t in with_upload["ends"])
            routed = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 1}).json()
            experts_after = len(http.get("/experts").json()["data"])
            print(f"skill job {job['status']} in {finished - (job['started'] or finished):.0f}s "
                  f"(result {job['result']}, error {job['error']}); {during} requests answered while it ran; "
                  f"experts {experts_before} -> {experts_after}; a Verilog prompt routes to {routed['routing']}")
    for result in (serving, with_upload):
        result.pop("ends")
    write_json(args.out, {
        "system": str(args.system or "fresh default-model system + python skill"), "clients": args.clients,
        "duration_s": args.duration, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "training": {"seed_steps": args.seed_steps, "consolidation_steps": args.consolidation_steps,
                     "batch_size": 2, "max_length": 256},
        "setup_job": setup and {k: setup[k] for k in ("status", "result", "started", "finished")},
        "serving": serving, "serving_with_upload": with_upload,
        "upload_job": {"status": job["status"], "finished_within_phase": state_at_end["status"] == "succeeded",
                       "seconds": round(finished - (job["started"] or finished), 1), "result": job["result"],
                       "error": job["error"], "requests_answered_while_training": during},
        "experts_before": experts_before, "experts_after": experts_after, "verilog_prompt_routing": routed["routing"],
    })
    return 0 if serving["errors"] == with_upload["errors"] == 0 and job["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
