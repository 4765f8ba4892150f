"""Does the gate route as well from an early layer as from the spec's final hidden states?

    python benchmarks/routing_source.py                                   # HumanEval + VerilogEval
    python benchmarks/routing_source.py --data-dir ../shared/data         # + MBPP, HumanEval-X JS, Spider, NL2Bash

For every skill, a deterministic split gives training and held-out examples. One pass of the frozen
default model yields the hidden states of every layer; for each candidate routing source (the input of
decoder layer L, or the final hidden states) the gate is fitted on the masked-mean features of the
training examples (``routing.fit.fit_gate``, the same fit the system uses) and scored on the held-out
examples: top-1 routing accuracy. Python skills from different datasets (HumanEval, MBPP) count as
distinct classes here, which makes the test harder than the system needs. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import time

import torch

from dylora_moe import DyLoRAConfig, DyLoRAMoE, DynamicHybridRouter
from dylora_moe.data import humaneval, humaneval_x, mbpp, nl2bash, spider, verilogeval
from dylora_moe.routing.fit import fit_gate
from results import write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--data-dir", default=None, help="folder with mbpp/, humaneval-x/, spider/, nl2bash/")
    p.add_argument("--per-skill", type=int, default=80, help="examples per skill (train + held out)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--layers", default="0,4,8,15,22", help="decoder layers whose input is tried")
    p.add_argument("--out", default="results/routing_source.json")
    return p.parse_args(argv)


def skills(data_dir: str | None, per_skill: int) -> dict[str, list[str]]:
    found = {"humaneval": humaneval(), "verilogeval": verilogeval()}
    if data_dir:
        found.update({"mbpp": mbpp(data_dir), "humaneval-x-js": humaneval_x(data_dir, "js"),
                      "spider": spider(data_dir), "nl2bash": nl2bash(data_dir)})
    return {name: [e.text for e in rows[:per_skill]] for name, rows in found.items()}


@torch.no_grad()
def pooled_states(model: DyLoRAMoE, texts: list[str], max_length: int, batch_size: int = 8) -> torch.Tensor:
    """Masked-mean hidden states of every layer input plus the final (normed) states: [L + 1, N, H]."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = model.tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_length)
        hs = model.backbone.base_model(**enc, output_hidden_states=True).hidden_states  # L + 1 x [B, T, H]
        mask = enc["attention_mask"][..., None].float()
        out.append(torch.stack([(h * mask).sum(1) / mask.sum(1) for h in hs]))  # [L + 1, B, H]
    return torch.cat(out, dim=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = DyLoRAMoE.from_config(DyLoRAConfig(model=args.model, device="cpu")).eval()
    data = skills(args.data_dir, args.per_skill)
    states, labels, held = [], [], []
    start = time.perf_counter()
    for label, (name, texts) in enumerate(data.items()):
        print(f"encoding {name}: {len(texts)} examples", flush=True)
        states.append(pooled_states(model, texts, args.max_length))
        labels.append(torch.full((len(texts),), label))
        held.append(torch.arange(len(texts)) % 5 == 0)  # every fifth example is held out
    states, labels, held = torch.cat(states, 1), torch.cat(labels), torch.cat(held)
    # hidden_states[L] is the input of decoder layer L; hidden_states[-1] is the final normed output.
    sources = {f"layer {layer}": layer for layer in map(int, args.layers.split(","))}
    sources["final (spec)"] = states.shape[0] - 1
    rows = []
    for source, index in sources.items():
        router = DynamicHybridRouter(states.shape[-1])
        for _ in data:
            router.add_expert()
        fit_gate(router, states[index][~held], labels[~held], steps=300)
        with torch.no_grad():
            pred = router(states[index][held]).weights.argmax(-1)
        acc = (pred == labels[held]).float().mean().item()
        per = {n: (pred[labels[held] == i] == i).float().mean().item() for i, n in enumerate(data)}
        rows.append({"source": source, "accuracy": acc, "per_skill": per})
        print(f"  {source:<14s} held-out routing accuracy {acc:.3f}", flush=True)
    result = {"model": args.model, "skills": list(data), "per_skill_examples": args.per_skill,
              "held_out": int(held.sum()), "encode_seconds": time.perf_counter() - start, "rows": rows}
    print("\n| routing source | accuracy | " + " | ".join(data) + " |")
    print("|---|---:|" + "---:|" * len(data))
    for r in rows:
        per_skill = " | ".join(f"{v:.2f}" for v in r["per_skill"].values())
        print(f"| {r['source']} | {r['accuracy']:.3f} | {per_skill} |")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
