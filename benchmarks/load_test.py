"""Load test of `dylora serve`, continuous against static batching in one run: 16 clients (half streaming),
mixed prompt and output lengths, each batching mode serving alone and while a skill upload trains.

    python benchmarks/load_test.py                                  # 16 clients, 3 repeats x 2 modes x 2 phases of 40 s
    python benchmarks/load_test.py --duration 5 --repeats 1         # a quick check
    python benchmarks/load_test.py --system runs/demo/system        # serve a copy of a saved system instead
    python benchmarks/load_test.py --ray                            # dylora serve vs Ray Serve (ray_load.py)

The server is `dylora serve` as users run it, a process of its own on 127.0.0.1 (a free port), started for each
(repeat, mode) on a fresh copy of the system folder and stopped afterwards; the clients are threads of this
process. No traffic leaves the machine. Without --system, a fresh system on the default model
(SmolLM2-135M-Instruct) in a temporary folder first learns one skill through `POST /skills` (the 32 shortest
HumanEval problems; not timed), so requests are routed to a real expert. Each client sends requests until the
phase's time is up and every request started is awaited: client i streams when i is odd, alternates
completions and chat, and cycles through prompts of 6 to about 200 tokens and --max-tokens values (greedy).
Phase 1 only serves; phase 2 starts with `POST /skills` (the 32 shortest VerilogEval problems, a new skill)
and serves while the job trains. Modes alternate in order between repeats (continuous first on even repeats).
Per phase: completion tokens per second (all tokens of all requests over the phase's wall time), requests,
p50/p99 latency of whole requests (a streamed one until its last event), p50 time to first token of streamed
requests, errors (any status but 200, or a stream without [DONE]), and what the server counted (its
worker's seconds in prefill and decode, prompt and generated tokens). The summary gives per mode and phase the
median over repeats of tokens/s, p50, p99 and streamed first-token p50, the errors and requests of all repeats,
and the continuous/static ratios per repeat with their median, min and max. JSON goes to results/load_test.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
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
from dylora_moe.serving.config import ServerConfig  # noqa: E402

MODEL = "dylora-moe"
_DOC = ('    """Return a list of the words of sentence in reverse order, keeping punctuation attached to the word it '
        'follows.\n    Words are separated by single spaces; an empty sentence gives an empty list.\n    >>> '
        'reverse_words("hello world")\n    [\'world\', \'hello\']\n    """\n')
PROMPTS = (  # about 6 to 200 tokens
    "def is_prime(n: int) -> bool:\n",
    "module and_gate(input a, input b, output y);",
    "Write a Python function that returns the largest element of a list.",
    "Implement a 4-bit synchronous counter in Verilog with an active-high reset and an enable input. The counter "
    "wraps around to zero after fifteen and holds its value while enable is low.",
    "def reverse_words(sentence: str) -> list[str]:\n" + _DOC * 3,
    "Write a Verilog module that implements a 2-to-1 multiplexer. " * 8,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", type=Path, default=None,
                   help="a saved system folder to serve copies of (default: a fresh default-model system)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (the odd-numbered ones stream)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds per phase")
    p.add_argument("--repeats", type=int, default=3, help="runs of each mode")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[8, 16, 32, 64],
                   help="output lengths the requests cycle through")
    p.add_argument("--max-batch", type=int, default=16, help="sequences the server generates together (both modes)")
    p.add_argument("--modes", nargs="+", default=["continuous", "static"], choices=["continuous", "static"])
    p.add_argument("--join-batch", type=int, default=ServerConfig.join_batch, help="the server's --join-batch")
    p.add_argument("--join-wait-steps", type=int, default=ServerConfig.join_wait_steps,
                   help="the server's --join-wait-steps (0 admits joiners at every decode step)")
    p.add_argument("--prefill-share", type=float, default=ServerConfig.prefill_share,
                   help="the server's --prefill-share (1: no limit)")
    p.add_argument("--seed-steps", type=int, default=2, help="the server's --seed-steps for the uploads' training")
    p.add_argument("--consolidation-steps", type=int, default=4,
                   help="the server's --consolidation-steps for the uploads' training")
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


# ---------------------------------------------------------------------- the server process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(folder: Path, mode: str, args: argparse.Namespace, key: str | None, log: Path):
    """`dylora serve folder` in its own process; yields its URL once /health answers. ``key``: the API key
    that allows uploads (None: a read-only server)."""
    port = free_port()
    dylora = Path(sys.executable).with_name("dylora")
    cmd = [str(dylora)] if dylora.exists() else [sys.executable, "-m", "dylora_moe.cli"]
    cmd += ["serve", str(folder), "--port", str(port), "--batching", mode, "--max-batch", str(args.max_batch),
            "--max-tokens-cap", str(max(args.max_tokens)), "--seed-steps", str(args.seed_steps),
            "--consolidation-steps", str(args.consolidation_steps), "--train-batch-size", "2"]
    cmd += ["--join-batch", str(args.join_batch), "--join-wait-steps", str(args.join_wait_steps),
            "--prefill-share", str(args.prefill_share)]
    env = {k: v for k, v in os.environ.items() if k != "DYLORA_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    if key is not None:
        env["DYLORA_API_KEY"] = key
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def shortest(examples: list[Example], n: int = 32) -> list[dict]:
    ranked = sorted(examples, key=lambda e: len(e.prompt) + len(e.response))[:n]
    return [{"prompt": e.prompt, "response": e.response} for e in ranked]


def upload(http: httpx.Client, name: str, examples: list[dict]) -> dict:
    r = http.post("/skills", json={"name": name, "examples": examples})
    r.raise_for_status()
    return r.json()


def wait_job(http: httpx.Client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


# ---------------------------------------------------------------------- clients
def request_body(i: int, client: int, max_tokens: list[int]) -> tuple[str, dict]:
    prompt = PROMPTS[(i + client) % len(PROMPTS)]
    body = {"model": MODEL, "max_tokens": max_tokens[(i // len(PROMPTS) + client) % len(max_tokens)]}
    if client % 2:
        body.update(stream=True, stream_options={"include_usage": True})
    if (i + client // 2) % 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


def send(http: httpx.Client, path: str, body: dict) -> tuple[int, int, float | None]:
    """(status, completion tokens, seconds to the first token of a stream); status 0: no complete answer."""
    start = time.perf_counter()
    if not body.get("stream"):
        r = http.post(path, json=body)
        return r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0, None
    first, tokens, done = None, 0, False
    with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, 0, None
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return 500, 0, None
            if first is None and any((c.get("delta") or {}).get("content") or c.get("text")
                                     for c in chunk["choices"]):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (200 if done else 0), tokens, first


def phase(url: str, clients: int, duration: float, max_tokens: list[int]) -> dict:
    """``clients`` threads send requests until ``duration`` seconds have passed, each awaiting its answers."""
    records: list[tuple[float, float, int, int, float | None]] = []  # (end, ms, status, tokens, first token s)
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def client_loop(client: int) -> None:
        with httpx.Client(base_url=url, timeout=600.0) as http:
            for i in itertools.count():
                if time.monotonic() >= deadline:
                    break
                path, body = request_body(i, client, max_tokens)
                start = time.perf_counter()
                try:
                    status, tokens, first = send(http, path, body)
                except (httpx.HTTPError, ValueError, KeyError):
                    status, tokens, first = 0, 0, None
                with lock:
                    records.append((time.time(), (time.perf_counter() - start) * 1000, status, tokens, first))

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    ms = np.array([r[1] for r in records])
    firsts = [r[4] * 1000 for r in records if r[4] is not None]
    tokens = sum(r[3] for r in records)
    return {"requests": len(records), "errors": int(sum(r[2] != 200 for r in records)),
            "completion_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 2), "requests_per_second": round(len(records) / seconds, 3),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "stream_first_token_p50_ms": round(float(np.percentile(firsts, 50)), 1) if firsts else None,
            "ends": [r[0] for r in records]}


def counters(url: str) -> dict[str, float]:
    """The server's worker time by stage and its token counters (from /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "dylora_generation_seconds_total":
                out[f"{sample.labels['stage']}_s"] = sample.value
            elif sample.name in ("dylora_prompt_tokens_total", "dylora_generated_tokens_total"):
                out[sample.name.removeprefix("dylora_").removesuffix("_total")] = sample.value
    return out


def measured(url: str, clients: int, duration: float, max_tokens: list[int]) -> dict:
    """``phase`` plus what the server counted meanwhile: worker seconds by stage, prompt and generated tokens."""
    before = counters(url)
    result = phase(url, clients, duration, max_tokens)
    after = counters(url)
    result["server"] = {k: round(after[k] - before.get(k, 0.0), 2) for k in sorted(after)}
    return result


def line(result: dict) -> str:
    return (f"tokens/s={result['tokens_per_second']:.1f} requests={result['requests']} errors={result['errors']} "
            f"p50_ms={result['p50_ms']:.0f} p99_ms={result['p99_ms']:.0f}")


# ---------------------------------------------------------------------- one run, the summary
def run_mode(base: Path, mode: str, args: argparse.Namespace, key: str, tmp: Path, tag: str) -> dict:
    folder = tmp / tag
    shutil.copytree(base, folder)
    with served(folder, mode, args, key, tmp / f"{tag}.log") as url, \
            httpx.Client(base_url=url, timeout=60.0, headers={"Authorization": f"Bearer {key}"}) as http:
        serving = measured(url, args.clients, args.duration, args.max_tokens)
        print(f"{tag} serving: {line(serving)}", flush=True)
        job = upload(http, "verilog", shortest(verilogeval()))
        with_upload = measured(url, args.clients, args.duration, args.max_tokens)
        job = wait_job(http, job["id"], args.job_timeout)
        finished = job["finished"] or time.time()
        during = sum(job["started"] is not None and job["started"] <= t <= finished for t in with_upload["ends"])
        print(f"{tag} serving + upload: {line(with_upload)}; job {job['status']} in "
              f"{finished - (job['started'] or finished):.0f}s, {during} requests answered while it trained",
              flush=True)
        experts = len(http.get("/experts").json()["data"])
    shutil.rmtree(folder, ignore_errors=True)
    for result in (serving, with_upload):
        result.pop("ends")
    return {"serving": serving, "serving_with_upload": with_upload, "experts_after": experts,
            "upload_job": {"status": job["status"], "seconds": round(finished - (job["started"] or finished), 1),
                           "requests_answered_while_training": during, "error": job["error"]}}


def median_of(values) -> float | None:
    """The median of the values that were measured (a phase without a streamed answer has none)."""
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else None


def summary(runs: list[dict], modes: list[str]) -> dict:
    out: dict = {}
    for ph in ("serving", "serving_with_upload"):
        per = {m: [r[m][ph] for r in runs] for m in modes}
        out[ph] = {m: {k: float(np.median([x[k] for x in per[m]])) for k in ("tokens_per_second", "p50_ms", "p99_ms")}
                   | {"stream_first_token_p50_ms": median_of(x["stream_first_token_p50_ms"] for x in per[m]),
                      "errors": sum(x["errors"] for x in per[m]), "requests": sum(x["requests"] for x in per[m])}
                   for m in modes}
        if set(modes) == {"continuous", "static"}:
            for k in ("tokens_per_second", "p50_ms", "p99_ms"):
                ratios = [c[k] / s[k] for c, s in zip(per["continuous"], per["static"], strict=True)]
                out[ph][f"{k}_ratio"] = {"median": round(float(np.median(ratios)), 3),
                                         "min": round(min(ratios), 3), "max": round(max(ratios), 3),
                                         "per_repeat": [round(x, 3) for x in ratios]}
    return out


def build_base(tmp: Path, args: argparse.Namespace, key: str) -> tuple[Path, dict | None]:
    if args.system is not None:
        return args.system, None
    base = tmp / "base"
    print("building a fresh system on the default model", flush=True)
    DyLoRAMoE.from_config(DyLoRAConfig(model="default")).save_pretrained(base)
    with served(base, "continuous", args, key, tmp / "setup.log") as url, \
            httpx.Client(base_url=url, timeout=60.0, headers={"Authorization": f"Bearer {key}"}) as http:
        start = time.perf_counter()
        setup = wait_job(http, upload(http, "python", shortest(humaneval()))["id"], args.job_timeout)
        print(f"setup: skill python {setup['status']} in {time.perf_counter() - start:.0f}s", flush=True)
    if setup["status"] != "succeeded":
        raise RuntimeError(f"setup failed: {setup['error']}")
    return base, {k: setup[k] for k in ("status", "result")}


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    if args.ray:
        from ray_load import compare

        return compare(args)
    key = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="dylora-load-") as name:
        tmp = Path(name)
        base, setup = build_base(tmp, args, key)
        runs = []
        for rep in range(args.repeats):
            order = args.modes if rep % 2 == 0 else args.modes[::-1]
            runs.append({m: run_mode(base, m, args, key, tmp, f"{m}-{rep}") for m in order})
    result = {"system": str(args.system or "fresh default-model system + python skill"), "clients": args.clients,
              "streaming_clients": args.clients // 2, "duration_s": args.duration, "repeats": args.repeats,
              "max_tokens": args.max_tokens, "max_batch": args.max_batch, "join_batch": args.join_batch,
              "join_wait_steps": args.join_wait_steps, "prefill_share": args.prefill_share,
              "prompts": len(PROMPTS),
              "training": {"seed_steps": args.seed_steps, "consolidation_steps": args.consolidation_steps,
                           "batch_size": 2}, "setup_job": setup, "summary": summary(runs, args.modes), "runs": runs}
    print(json.dumps(result["summary"], indent=2))
    write_json(args.out, result)
    errors = sum(r[m][ph]["errors"] for r in runs for m in args.modes for ph in ("serving", "serving_with_upload"))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
