"""``benchmarks/forward_cost.py`` (whose timer and options ``train_cost.py`` shares): the timer waits for the
device's queued work before it reads the clock, and the benchmark runs on the device it is given."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from tests.conftest import char_tokenizer, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import forward_cost


def test_the_timer_synchronises_an_accelerator_before_each_clock_read(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(forward_cost.time, "perf_counter", lambda: events.append("clock") or 0.0)
    forward_cost.timed(lambda: events.append("work"), 2, torch.device("cuda"))
    # warm-up, then per repeat: clock, work, sync, clock (the sync lands before the stop time is read)
    assert events == ["work", "sync"] + ["clock", "work", "sync", "clock"] * 2
    events.clear()
    forward_cost.timed(lambda: events.append("work"), 1, torch.device("cpu"))
    assert "sync" not in events


def tiny_run(tmp_path, experts: int, repeats: int) -> dict:
    """The benchmark's JSON for a tiny model on the CPU, ``experts`` in the pool, ``repeats`` per cell."""
    tiny_llama().save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "fc.json"
    forward_cost.main(["--model", str(tmp_path / "model"), "--experts", str(experts), "--repeats", str(repeats),
                       "--batch", "2", "--seq-len", "8", "--decode-tokens", "2", "--decode-prompt", "4",
                       "--decode-experts", str(experts), "--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text())


def test_the_run_uses_and_records_the_device_it_is_given(tmp_path):
    saved = tiny_run(tmp_path, experts=2, repeats=1)
    assert saved["device"] == "cpu"
    assert [(r["experts"], r["mode"]) for r in saved["rows"]] == [(2, m) for m in ("reference", "dense", "top1")]


def test_every_cell_records_the_repeats_its_median_is_taken_of(tmp_path):
    saved = tiny_run(tmp_path, experts=1, repeats=3)
    assert saved["repeats"] == 3 and len(saved["single_lora_times"]) == 3
    assert saved["single_lora_s"] == statistics.median(saved["single_lora_times"])
    for row in saved["rows"]:
        assert len(row["times"]) == 3 and row["seconds"] == statistics.median(row["times"])
