"""The device audit of ``benchmarks/device_audit.py`` on a tiny bf16 model: on the CPU, and on the GPU when
there is one (skipped otherwise)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_tiny_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from device_audit import audit


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_whole_cycle_in_bf16_keeps_every_tensor_in_place(tmp_path, device):
    write_tiny_run(tmp_path)
    result = audit(str(tmp_path / "model"), device=device, dtype="bfloat16", work=tmp_path / "audit",
                   say=lambda msg: None)
    assert result["ok"], {name: s["problems"] for name, s in result["stages"].items()}
    assert result["device"].startswith(device)
    assert list(result["stages"]) == ["create", "train", "save", "load", "add_skill", "generate"]
    shapes = result["stages"]["generate"]["shapes"]
    assert shapes["beams"][0] == shapes["sampling"][0] == 4 and shapes["greedy"][0] == 2
    assert all(loss is not None for loss in result["stages"]["train"]["losses"][-1])
