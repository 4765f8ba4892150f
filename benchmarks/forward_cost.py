"""Forward and decode cost of the mixture against a single peft LoRA, on the same machine in the same run.

    python benchmarks/forward_cost.py                      # default model, batch 4 x 128 tokens
    python benchmarks/forward_cost.py --experts 1,4 --repeats 1 --out /tmp/fc.json   # a quick look

For each pool size N it times one inference forward (routing included) in three modes: ``reference`` (the
spec's output-level mixing, one full pass per expert), ``dense`` (fused, every expert immature) and
``top1`` (fused, every expert mature, top-1). ``ratio`` is seconds / the single-LoRA forward measured in
this run. Decode times greedy generation with the KV cache at batch 1. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model

from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig, RouterConfig, load_backbone
from dylora_moe.backbone import resolve_device
from results import ratio_table, write_json


def cost_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every cost benchmark shares: model, batch shape, pool sizes, repeats, expert shape."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="HF id, local path or 'default'")
    p.add_argument("--batch", type=int, default=4, help="sequences per timed batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (random ids, no padding)")
    p.add_argument("--experts", default="1,4,8,16,32", help="comma-separated pool sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per cell after a warm-up (median)")
    p.add_argument("--rank", type=int, default=ExpertConfig.rank, help="LoRA rank of every expert and the baseline")
    p.add_argument("--targets", default=ExpertConfig.target_modules, help="attention | mlp | all-linear")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N | mps")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = cost_arguments(__doc__)
    p.add_argument("--decode-tokens", type=int, default=32, help="new tokens per greedy decode (all of them forced)")
    p.add_argument("--decode-prompt", type=int, default=32, help="prompt length for the decode test")
    p.add_argument("--decode-experts", type=int, default=8, help="pool size for the decode test")
    p.add_argument("--route-layer", type=int, default=RouterConfig.route_layer,
                   help="decoder layer whose input the gate reads (RouterConfig.route_layer)")
    p.add_argument("--route-pass", default=RouterConfig.route_pass, choices=("inline", "separate"),
                   help="separate: the gate's layer from a frozen prefix pass, experts on every layer")
    p.add_argument("--out", default="results/forward_cost.json", help="JSON result")
    return p.parse_args(argv)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` (an accelerator runs kernels asynchronously of the host)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device is not None and device.type == "mps":
        torch.mps.synchronize()


def timed(fn, repeats: int, device: torch.device | str | None = None, times: list[float] | None = None) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after a warm-up call, the device synchronised before each
    clock read so that the time covers the work ``fn`` queued. ``times`` (a list) receives every repeat's
    seconds, for the spread."""
    fn()  # warm-up: allocations, stacked-weight caches
    synchronize(device)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        runs.append(time.perf_counter() - start)
    if times is not None:
        times.extend(runs)
    return statistics.median(runs)


def randomise(params) -> None:
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)


def single_lora_baseline(args, model: DyLoRAMoE, inputs, prompt, times: list[float]) -> tuple[float, float]:
    backbone, _ = load_backbone(args.model, device=str(model.device))
    lora = model.experts.lora_config(args.rank)
    peft_model = get_peft_model(backbone, lora, adapter_name="single").eval()
    randomise(p for n, p in peft_model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        forward = timed(lambda: peft_model(**inputs), args.repeats, model.device, times)
    decode = decode_rate(lambda **kw: peft_model.generate(**kw), prompt, args, model.device)
    return forward, decode


def decode_rate(generate, prompt, args, device=None) -> float:
    kwargs = dict(max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False,
                  pad_token_id=0, use_cache=True)
    with torch.no_grad():
        seconds = timed(lambda: generate(**prompt, **kwargs), args.repeats, device)
    return args.decode_tokens / seconds


def grow_to(model: DyLoRAMoE, n: int) -> None:
    while model.num_experts < n:
        e = model.create_expert()
        randomise(model.experts.parameters(e))
    model.experts.touch()


def set_maturity(model: DyLoRAMoE, mature: bool) -> None:
    for e in model.experts.expert_ids:
        model.mark_mature(e, mature)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    config = DyLoRAConfig(model=args.model, device=str(device),
                          expert=ExpertConfig(rank=args.rank, target_modules=args.targets, dropout=0.0),
                          router=RouterConfig(top_k=1, route_layer=args.route_layer, route_pass=args.route_pass))
    model = DyLoRAMoE.from_config(config).eval()
    vocab = model.backbone.config.vocab_size
    ids = torch.randint(100, vocab, (args.batch, args.seq_len)).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    prompt_ids = torch.randint(100, vocab, (1, args.decode_prompt)).to(device)
    prompt = {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids)}

    base_times: list[float] = []
    base_s, base_decode = single_lora_baseline(args, model, inputs, prompt, base_times)
    print(f"single LoRA forward {args.batch}x{args.seq_len}: {base_s:.3f}s; decode {base_decode:.1f} tok/s")
    rows = []
    for n in [int(x) for x in args.experts.split(",")]:
        grow_to(model, n)
        for mode in ("reference", "dense", "top1"):
            model.config.mixing = "reference" if mode == "reference" else "fused"
            set_maturity(model, mode == "top1")
            times: list[float] = []
            with torch.no_grad():
                seconds = timed(lambda: model(**inputs), args.repeats, device, times)
            rows.append({"experts": n, "mode": mode, "seconds": seconds, "ratio": seconds / base_s, "times": times})
            print(f"  N={n:<3d} {mode:<9s} {seconds:7.3f}s  ratio {seconds / base_s:5.2f}", flush=True)

    model.config.mixing = "fused"
    while model.num_experts > args.decode_experts:
        model.delete_expert(model.experts.expert_ids[-1])
    grow_to(model, args.decode_experts)
    set_maturity(model, False)
    dense = decode_rate(model.generate, prompt, args, device)
    set_maturity(model, True)
    top1 = decode_rate(model.generate, prompt, args, device)
    result = {
        "model": args.model, "batch": args.batch, "seq_len": args.seq_len, "single_lora_s": base_s,
        "single_lora_times": base_times, "repeats": args.repeats,
        "rank": args.rank, "targets": args.targets, "route_layer": args.route_layer,
        "route_pass": args.route_pass, "device": str(device),
        "threads": torch.get_num_threads(), "rows": rows,
        "decode": {"experts": args.decode_experts, "tokens": args.decode_tokens,
                   "single_lora_tok_s": base_decode, "dense_tok_s": dense, "top1_tok_s": top1},
    }
    print_table(result)
    write_json(args.out, result)
    return result


def print_table(result: dict) -> None:
    print(f"\nforward {result['batch']}x{result['seq_len']}, ratio to single LoRA ({result['single_lora_s']:.3f}s)")
    print(ratio_table(result["rows"], ("reference", "dense", "top1")))
    d = result["decode"]
    print(f"\ndecode, batch 1, {d['experts']} experts: single LoRA {d['single_lora_tok_s']:.1f} tok/s, "
          f"dense {d['dense_tok_s']:.1f} ({d['dense_tok_s'] / d['single_lora_tok_s']:.2f}x), "
          f"top1 {d['top1_tok_s']:.1f} ({d['top1_tok_s'] / d['single_lora_tok_s']:.2f}x)")


if __name__ == "__main__":
    main()
