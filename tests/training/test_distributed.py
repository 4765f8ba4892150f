"""The continual loop under DDP: 2 CPU processes (gloo) end with identical experts and router, saved once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_two_processes_agree_and_save_once(tmp_path):
    def letters(i):
        return {"prompt": f"up {chr(97 + i % 26)}{i}:", "response": f"{chr(65 + i % 26)}!"}

    for name, make in (("digits", lambda i: {"prompt": f"{i}+{i}=", "response": f"{2 * i}"}), ("letters", letters)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(make(i)) for i in range(40)))
    (tmp_path / "s.yaml").write_text(
        "skills:\n"
        "  - {name: digits, source: {type: file, path: digits.jsonl}, format: {chat: false}}\n"
        "  - {name: letters, source: {type: file, path: letters.jsonl}, format: {chat: false}}\n")
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(worker), str(tmp_path / "s.yaml"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["experts"] == [0, 1]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert any("lora_B" in n for n in ranks[0]["digest"])
    saved = [p for p in (tmp_path / "out").iterdir() if p.is_dir() and "system" in p.name]
    assert [p.name for p in saved] == ["system"]
    assert sorted(p.name for p in (tmp_path / "out" / "system" / "experts").iterdir() if p.is_dir()) == [
        "expert_0", "expert_1"]
