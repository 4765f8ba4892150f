"""One process of the 2-process DDP test (run by torchrun from test_distributed.py, not by pytest).

    torchrun --nproc_per_node 2 tests/training/ddp_worker.py STREAM.yaml OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dylora_moe.data.stream import load_stream
from dylora_moe.training import ContinualLearner, TrainingConfig
from tests.conftest import build, decide_by_cosine


def digest(model) -> dict[str, str]:
    state = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n or n.startswith("router.")}
    state["router.expert_maturity"] = model.router.expert_maturity
    return {n: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for n, t in sorted(state.items())}


def main(stream_path: str, out: str) -> None:
    state = PartialState(cpu=True)
    torch.manual_seed(0)
    model = build()
    decide_by_cosine(model, 0.999)
    stream = load_stream(stream_path)
    # A different seed per process: without DDP's initial broadcast and gradient averaging the processes
    # would start from different experts and see different batches, and end with different weights.
    training = TrainingConfig(seed_steps=2, consolidation_steps=2, batch_size=2, max_length=32,
                              report_to=["none"], logging_steps=1, seed=state.process_index,
                              rehearsal_per_skill=1000)  # keep every sample: no seeded subsampling
    ContinualLearner(model, stream, training, out).run()
    Path(out, f"rank{state.process_index}.json").write_text(json.dumps(
        {"world": state.num_processes, "experts": model.experts.expert_ids, "digest": digest(model)}))
    if state.is_main_process:
        model.save_pretrained(Path(out) / "system")
    state.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
