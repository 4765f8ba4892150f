"""The routing memory: a memory saved with a run's progress and loaded on resume batches as the original."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from dylora_moe.training.rehearsal import RoutingMemory, mixture_key


def test_a_memory_loaded_from_its_file_gives_the_batch_of_the_original(tmp_path):
    """Twelve skills and a mixture: the file orders the entries by name ("skill_10" before "skill_2", the
    mixture's negative key first), so a batch in arrival order would change on resume, and with it the gate
    fitted on it."""
    g = torch.Generator().manual_seed(0)
    memory = RoutingMemory(4)
    ids = list(range(12))
    for s in ids:
        memory.add(s, s, torch.randn(4, 8, generator=g))
    memory.add(mixture_key([0, 1]), [0, 1], torch.randn(4, 8, generator=g))
    save_file(memory.tensors(), str(tmp_path / "memory.safetensors"))
    resumed = RoutingMemory(4)
    resumed.load_tensors(load_file(str(tmp_path / "memory.safetensors")))
    for a, b in zip(memory.batch(ids), resumed.batch(ids), strict=True):
        assert torch.equal(a, b)
