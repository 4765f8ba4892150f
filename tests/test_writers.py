"""Concurrent writers and readers of one system folder: a save in one process while another loads and
recovers in a loop, two writers on one folder, and a writer killed mid-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig
from dylora_moe.checkpoint import FolderBusy, recover, writer_lock
from dylora_moe.cli import main
from dylora_moe.store import SkillStore
from tests.conftest import char_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def saved(tmp_path: Path) -> Path:
    """A saved system with two experts on a tiny model folder (so other processes can load it too)."""
    tiny_llama().save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    model = DyLoRAMoE.from_config(DyLoRAConfig(model=str(tmp_path / "model"), expert=ExpertConfig(rank=4),
                                               device="cpu"))
    model.create_expert(4)
    model.create_expert(4)
    model.save_pretrained(tmp_path / "system")
    return tmp_path / "system"


def child(script: str, *args: str) -> subprocess.Popen:
    """A Python process running ``script`` with the repository on its path (prints "ready" when set)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


HOLD = """
    import sys, time
    from dylora_moe.checkpoint import writer_lock
    with writer_lock(sys.argv[1], who="a test writer"):
        print("ready", flush=True)
        time.sleep(60)
"""

SAVE_LOOP = """
    import sys, time
    from dylora_moe import DyLoRAMoE
    model = DyLoRAMoE.from_pretrained(sys.argv[1])
    print("ready", flush=True)
    end = time.monotonic() + float(sys.argv[2])
    saves = 0
    while time.monotonic() < end:
        model.save_pretrained(sys.argv[1])
        saves += 1
    print(saves, flush=True)
"""


def test_loading_and_recovering_during_saves_never_sees_a_broken_folder(tmp_path):
    system = saved(tmp_path)
    writer = child(SAVE_LOOP, str(system), "6")
    loads = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        recover(system)  # as a second server or `train --resume` would, while the other process saves
        model = DyLoRAMoE.from_pretrained(system)
        assert model.experts.expert_ids == [0, 1]
        loads += 1
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert int(out.split()[-1]) >= 2 and loads >= 2  # both really ran side by side
    assert DyLoRAMoE.from_pretrained(system).experts.expert_ids == [0, 1]


def test_a_second_writer_is_refused_and_a_killed_writer_leaves_no_lock(tmp_path, capsys):
    system = saved(tmp_path)
    SkillStore(tmp_path / "store.db")  # a run folder: system and registry
    holder = child(HOLD, str(system))
    try:
        with pytest.raises(FolderBusy, match="a test writer"):
            DyLoRAMoE.from_pretrained(system).save_pretrained(system)
        assert main(["experts", "delete", str(tmp_path), "1"]) == 2  # refused before it reads anything
        assert "being written by a test writer" in capsys.readouterr().err
        assert DyLoRAMoE.from_pretrained(system).experts.expert_ids == [0, 1]  # readers are not blocked
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with writer_lock(system):  # the dead writer's lock went with it
        DyLoRAMoE.from_pretrained(system).save_pretrained(system)


def test_recover_leaves_a_live_writers_temporary_folder_alone(tmp_path):
    system = saved(tmp_path)
    holder = child(HOLD, str(system))
    partial = system.parent / f".{system.name}.tmp-live"
    partial.mkdir()
    try:
        recover(system)
        assert partial.exists()  # a save in progress, not debris
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    recover(system)
    assert not partial.exists()


def test_a_save_is_verified_before_the_old_copy_goes(tmp_path, monkeypatch):
    import dylora_moe.checkpoint as checkpoint

    system = saved(tmp_path)
    real = checkpoint._write

    def loses_an_expert(model, out, dest):
        real(model, out, dest)
        (out / "experts" / "expert_1" / "adapter_model.safetensors").unlink()

    monkeypatch.setattr(checkpoint, "_write", loses_an_expert)
    with pytest.raises(FileNotFoundError, match="expert weights are incomplete"):
        DyLoRAMoE.from_pretrained(system).save_pretrained(system)
    monkeypatch.undo()
    assert DyLoRAMoE.from_pretrained(system).experts.expert_ids == [0, 1]  # the good copy is still there
