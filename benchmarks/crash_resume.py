"""Kill a training run at random moments, resume it each time, and compare with an uninterrupted run.

    python benchmarks/crash_resume.py                     # 10 kills on a tiny model, a few minutes
    python benchmarks/crash_resume.py --kills 20 --seed 3

A tiny Llama (built from a config, saved to a temporary folder) learns a 3-step stream of file skills with
`dylora train`. The reference run goes uninterrupted. A crash run is started, SIGKILLed after a random
delay, and resumed with `dylora train --resume`, again and again, until it finishes; then its registry
(expert and skill-data rows), expert weight files (byte for byte) and outputs on a fixed batch are compared
with the reference. Crash runs repeat until the kills add up to --kills. Prints
`kills=N lost=L duplicated=D mismatched=M` and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from results import write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import batch, write_tiny_run  # noqa: E402

from dylora_moe import DyLoRAMoE  # noqa: E402
from dylora_moe.store import SkillStore  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/crash_resume.json")
    return p.parse_args(argv)


def command(work: Path, out: Path) -> list[str]:
    base = [sys.executable, "-m", "dylora_moe.cli", "train"]
    if (out / "run.json").is_file():
        return [*base, "--resume", str(out)]
    return [*base, "--stream", str(work / "stream.yaml"), "--out", str(out), "--model", str(work / "model")]


def run(work: Path, out: Path, kill_after: float | None = None) -> tuple[bool, float]:
    """Run (or resume) to the end, or SIGKILL after ``kill_after`` seconds; returns (finished, seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    proc = subprocess.Popen(command(work, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False, time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {err.decode()[-2000:]}")
    return True, time.perf_counter() - start


def registry(out: Path) -> list[tuple]:
    store = SkillStore(out / "store.db")
    experts = [(e.expert_id, e.skill_id, e.rank, e.version, e.maturity_state) for e in store.experts()]
    data = [(s.skill_id, h["version"], h["rows"]) for s in store.skills() for h in store.history(s.skill_id)]
    return experts + data


def weights(out: Path) -> dict[str, bytes]:
    files = sorted((out / "system" / "experts").glob("*/adapter_model.safetensors"))
    return {p.parent.name: p.read_bytes() for p in files}


@torch.no_grad()
def outputs(out: Path) -> torch.Tensor:
    return DyLoRAMoE.from_pretrained(out / "system").eval()(**batch(bsz=4)).logits


def main(argv=None) -> dict:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="crash-resume-"))
    write_tiny_run(work, n=40, steps=3)
    _, reference_seconds = run(work, work / "reference")
    print(f"reference run: {reference_seconds:.1f}s", flush=True)
    # Each crash run is killed at random moments and resumed until it finishes, then compared with the
    # reference; crash runs repeat until the kills add up to --kills, so every kill is in a compared run.
    kills, moments, lost, duplicated, mismatched, runs = 0, [], 0, 0, 0, 0
    ref_registry, ref_weights = registry(work / "reference"), weights(work / "reference")
    ref_outputs = outputs(work / "reference")
    while kills < args.kills:
        crash = work / f"crash{runs}"
        runs += 1
        while True:
            delay = rng.uniform(0.2, reference_seconds)
            finished, _ = run(work, crash, kill_after=delay)
            if finished:
                break
            kills += 1
            moments.append(round(delay, 2))
            print(f"  run {runs}: kill {kills} after {delay:.1f}s", flush=True)
        crash_registry, crash_weights = registry(crash), weights(crash)
        lost += len(set(ref_weights) - set(crash_weights)) + len(set(ref_registry) - set(crash_registry))
        duplicated += (len(set(crash_weights) - set(ref_weights)) + len(crash_registry) - len(set(crash_registry))
                       + len(set(crash_registry) - set(ref_registry)))
        mismatched += sum(ref_weights[k] != crash_weights[k] for k in set(ref_weights) & set(crash_weights))
        mismatched += int(not torch.allclose(ref_outputs, outputs(crash)))
    result = {"kills": kills, "lost": lost, "duplicated": duplicated, "mismatched": mismatched,
              "crash_runs": runs, "kill_moments_s": moments, "reference_seconds": reference_seconds,
              "work_dir": str(work)}
    print(f"kills={kills} lost={lost} duplicated={duplicated} mismatched={mismatched}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
