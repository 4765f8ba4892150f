"""What batching held-out examples by length saves in the loss matrix's evaluation, and that it changes no loss.

    python benchmarks/eval_order.py --stream configs/streams/shared-code.yaml --data-dir ../shared/data \\
        --out results/eval_order.json

For every step of the stream, its held-out set is scored twice in one process by ``training.measure.token_losses``:
in the dataset's order (every ``--batch-size`` consecutive examples padded to the longest of them, as
evaluation batched before) and in length order (``length_batches``, what it batches now), once each untimed
(warm-up), then alternating ``--repeats`` times. Reports per step the padded tokens of each batching, the
median seconds of each and their ratio, and the largest difference of any example's summed loss between them.
The model is the frozen backbone: the cost of a pass does not depend on which expert a top-1 route picks.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.data.stream import load_stream
from dylora_moe.training.config import TrainingConfig
from dylora_moe.training.loop import ContinualLearner
from dylora_moe.training.measure import length_batches, token_losses
from results import write_json


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    """Tokens a right-padded pass over ``batches`` (row indices) computes: each batch at its longest row."""
    return sum(max(lengths[k] for k in b) * len(b) for b in batches)


def in_dataset_order(model: DyLoRAMoE, dataset, batch_size: int) -> list[torch.Tensor]:
    """The losses batched as consecutive rows: one call per batch of ``batch_size`` consecutive examples."""
    rows = []
    for i in range(0, len(dataset), batch_size):
        rows += token_losses(model, dataset.select(range(i, min(i + batch_size, len(dataset)))), batch_size)
    return rows


def time_both(model: DyLoRAMoE, data, batch_size: int, repeats: int) -> tuple[dict, list, list]:
    """Seconds of ``repeats`` alternating scorings in dataset order and in length order, after one untimed
    scoring of each (warm-up: the first passes' allocations and one-time set-up are not timed), and the
    losses of each."""
    in_dataset_order(model, data, batch_size)
    token_losses(model, data, batch_size)
    seconds: dict[str, list[float]] = {"dataset_order": [], "length_order": []}
    before = after = []
    for _ in range(repeats):
        start = time.perf_counter()
        before = in_dataset_order(model, data, batch_size)
        seconds["dataset_order"].append(time.perf_counter() - start)
        start = time.perf_counter()
        after = token_losses(model, data, batch_size)
        seconds["length_order"].append(time.perf_counter() - start)
    return seconds, before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="configs/streams/shared-code.yaml", help="stream YAML to score")
    parser.add_argument("--data-dir", default=None, help="data directory for the stream's data-dir sources")
    parser.add_argument("--model", default="default", help="HF id, local path or 'default'")
    parser.add_argument("--batch-size", type=int, default=TrainingConfig.eval_batch_size, help="examples per pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed scorings of each batching (median)")
    parser.add_argument("--out", default="results/eval_order.json", help="JSON result")
    args = parser.parse_args()

    stream = load_stream(args.stream)
    model = DyLoRAMoE.from_config(DyLoRAConfig(model=args.model))
    training = TrainingConfig(**{**stream.training, "report_to": ["none"]})
    learner = ContinualLearner(model, stream, training, tempfile.mkdtemp(prefix="eval-order-"), data_dir=args.data_dir)
    rows = []
    for skill in learner.skills:
        data = learner.prepare(skill).eval_set
        lengths = [len(ids) for ids in data["input_ids"]]
        size = args.batch_size
        consecutive = [list(range(i, min(i + size, len(data)))) for i in range(0, len(data), size)]
        seconds, before, after = time_both(model, data, args.batch_size, args.repeats)
        diff = max(abs(a.sum().item() - b.sum().item()) for a, b in zip(before, after, strict=True))
        median = {k: statistics.median(v) for k, v in seconds.items()}
        row = {"skill": skill.name, "examples": len(data), "tokens": sum(lengths),
               "padded_dataset_order": padded_tokens(lengths, consecutive),
               "padded_length_order": padded_tokens(lengths, length_batches(data, args.batch_size)),
               "seconds": seconds, "median_seconds": median,
               "ratio": median["length_order"] / median["dataset_order"], "max_abs_loss_diff": diff}
        rows.append(row)
        print(f"{skill.name:28s} n={len(data):3d} padded {row['padded_dataset_order']} -> "
              f"{row['padded_length_order']} tokens, {median['dataset_order']:.1f} s -> "
              f"{median['length_order']:.1f} s (x{row['ratio']:.2f}), max |loss diff| {diff:.2e}", flush=True)
    total = {k: sum(r["median_seconds"][k] for r in rows) for k in ("dataset_order", "length_order")}
    result = {"stream": args.stream, "model": args.model, "batch_size": args.batch_size, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "steps": rows, "total_median_seconds": total,
              "ratio": total["length_order"] / total["dataset_order"]}
    print(f"all steps: {total['dataset_order']:.1f} s -> {total['length_order']:.1f} s (x{result['ratio']:.2f})")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
