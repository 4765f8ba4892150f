"""Training cost of one optimizer step as the pool grows, against a plain peft single-LoRA step in the same run.

    python benchmarks/train_cost.py                                   # default model, batch 4 x 128 tokens
    python benchmarks/train_cost.py --experts 1,8 --repeats 2 --out /tmp/tc.json   # a quick look

For each pool size N, one expert trains while N-1 frozen experts (random weights, mature) sit in the pool:

- ``new``: a new skill's expert (immature, so routing is dense; the seeding and the consolidation phase of a
  new skill differ only in their learning rate), the gate training with it;
- ``new-whole-pool``: the same with ``dense_top_m=None``, every frozen expert mixed in (the spec's dense
  phase over the whole pool), to show what ``dense_top_m`` saves;
- ``recognised``: a recognised skill's expert continuing at the consolidation rate (every expert mature,
  top-1; a random gate that sends some samples of the batch to the trained expert and others elsewhere:
  the gathered path).

A step is forward with labels, backward and an AdamW step, as the Trainer does; ``ratio`` is its median
seconds / the single-LoRA step's (same batch, rank, targets). Prints a table and writes JSON.

``--kl-weight W`` (W > 0) times the step the trainer runs by default (``TrainingConfig.kl_weight``): the task
loss plus W x KL(frozen || trained expert) on a batch of anchor prompts (``--batch`` x ``--anchor-len`` tokens;
``training/distill.py``'s ``kl_on_anchors``: one frozen pass, one pass with the trained expert forced). The
baseline then does the same with plain peft: the frozen logits from the same model with its adapter
disabled, the KL in the same function.

    python benchmarks/train_cost.py --kl-weight 0.5 --out results/train_cost_kl.json
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model

from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig, RouterConfig, load_backbone
from dylora_moe.backbone import resolve_device
from dylora_moe.training.distill import kl_on_anchors, kl_to_frozen
from forward_cost import cost_arguments, grow_to, randomise, timed
from results import ratio_table, write_json

MODES = ("new", "new-whole-pool", "recognised")


def parse_args(argv=None) -> argparse.Namespace:
    p = cost_arguments(__doc__)
    p.add_argument("--dense-top-m", type=int, default=RouterConfig.dense_top_m,
                   help="established experts mixed with a new one in the 'new' mode (RouterConfig.dense_top_m)")
    p.add_argument("--kl-weight", type=float, default=0.0,
                   help="> 0: each step adds the KL to the frozen model on an anchor batch (the default recipe)")
    p.add_argument("--anchor-len", type=int, default=64, help="tokens per anchor prompt with --kl-weight")
    p.add_argument("--out", default="results/train_cost.json", help="JSON result")
    return p.parse_args(argv)


def training_step(model, params, inputs, anchor_kl=None, kl_weight: float = 0.0):
    """One optimizer step; ``anchor_kl()`` -> the KL term, added with ``kl_weight`` when given."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        if anchor_kl is not None:
            loss = loss + kl_weight * anchor_kl()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def single_lora_step(args, lora_config, inputs, anchors=None, device=None, times=None) -> float:
    backbone, _ = load_backbone(args.model, device=str(device or "cpu"))
    peft_model = get_peft_model(backbone, lora_config, adapter_name="single").train()
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    randomise(params)

    def anchor_kl() -> torch.Tensor:
        with torch.no_grad(), peft_model.disable_adapter():
            frozen = peft_model(**anchors).logits
        return kl_to_frozen(peft_model(**anchors).logits, frozen, anchors["attention_mask"])

    kl = anchor_kl if anchors is not None else None
    return timed(training_step(peft_model, params, inputs, kl, args.kl_weight), args.repeats, device, times)


def mixed_gate(model: DyLoRAMoE, inputs, trained: int) -> None:
    """A random gate under which the batch goes to the trained expert and to others (the gathered path, with
    a gradient for the trained expert), as a recognised skill's batch may."""
    column = model.column(trained)
    generator = torch.Generator().manual_seed(0)
    for _ in range(1000):
        with torch.no_grad():
            model.router.gate.weight.copy_(torch.randn(model.router.gate.weight.shape, generator=generator))
            chosen = model.route(**inputs).indices.flatten().tolist()
        if column in chosen and len(set(chosen)) > 1:
            return
    raise RuntimeError("no random gate sends the batch to the trained expert and to another one")


def pool_step(model: DyLoRAMoE, mode: str, repeats: int, inputs, anchors=None, kl_weight: float = 0.0,
              times: list[float] | None = None) -> float:
    trained = model.experts.expert_ids[-1]
    for e in model.experts.expert_ids:
        model.mark_mature(e, mode == "recognised" or e != trained)
    if mode == "recognised" and model.num_experts > 1:
        mixed_gate(model, inputs, trained)
    model.router.dense_top_m = None if mode == "new-whole-pool" else model.config.router.dense_top_m
    model.set_trainable([trained], router=mode != "recognised")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    kl = None
    if anchors is not None:
        def kl() -> torch.Tensor:
            return kl_on_anchors(model, anchors["input_ids"], anchors["attention_mask"], trained)[0]
    try:
        return timed(training_step(model, params, inputs, kl, kl_weight), repeats, model.device, times)
    finally:
        model.set_trainable([], router=False)
        model.eval()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    config = DyLoRAConfig(model=args.model, device=str(device),
                          expert=ExpertConfig(rank=args.rank, target_modules=args.targets, dropout=0.0),
                          router=RouterConfig(top_k=1, dense_top_m=args.dense_top_m))
    model = DyLoRAMoE.from_config(config)
    vocab = model.backbone.config.vocab_size
    ids = torch.randint(100, vocab, (args.batch, args.seq_len)).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    anchors = None
    if args.kl_weight > 0:
        anchor_ids = torch.randint(100, vocab, (args.batch, args.anchor_len)).to(device)
        anchors = {"input_ids": anchor_ids, "attention_mask": torch.ones_like(anchor_ids)}
    with torch.no_grad():
        model.router.gate.weight.normal_(0, 1.0)  # a random gate spreads a batch over the experts

    base_times: list[float] = []
    base_s = single_lora_step(args, model.experts.lora_config(args.rank), inputs, anchors, device, base_times)
    kl = f" + KL on {args.batch}x{args.anchor_len} anchors" if anchors is not None else ""
    print(f"single LoRA training step {args.batch}x{args.seq_len}{kl}: {base_s:.3f}s", flush=True)
    rows = []
    for n in [int(x) for x in args.experts.split(",")]:
        grow_to(model, n)
        with torch.no_grad():
            model.router.gate.weight.normal_(0, 1.0)
        for mode in MODES:
            times: list[float] = []
            seconds = pool_step(model, mode, args.repeats, inputs, anchors, args.kl_weight, times)
            rows.append({"experts": n, "mode": mode, "seconds": seconds, "ratio": seconds / base_s, "times": times})
            print(f"  N={n:<3d} {mode:<15s} {seconds:7.3f}s  ratio {seconds / base_s:5.2f}", flush=True)
    result = {"model": args.model, "batch": args.batch, "seq_len": args.seq_len, "rank": args.rank,
              "targets": args.targets, "dense_top_m": args.dense_top_m, "single_lora_step_s": base_s,
              "single_lora_step_times": base_times, "repeats": args.repeats,
              "kl_weight": args.kl_weight, "anchor_len": args.anchor_len if anchors is not None else None,
              "device": str(device), "threads": torch.get_num_threads(), "rows": rows}
    print_table(result)
    write_json(args.out, result)
    return result


def print_table(result: dict) -> None:
    print(f"\ntraining step {result['batch']}x{result['seq_len']}, ratio to a single LoRA step "
          f"({result['single_lora_step_s']:.3f}s)")
    print(ratio_table(result["rows"], MODES))


if __name__ == "__main__":
    main()
