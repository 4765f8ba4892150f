"""How well does the novelty detector's embedding separate skills? Cosine similarity between skill sets.

    python benchmarks/novelty_margin.py                                  # HumanEval halves + VerilogEval
    python benchmarks/novelty_margin.py --data-dir ../shared/data        # + MBPP, HumanEval-X JS, Spider, NL2Bash

Each set is embedded with ``DyLoRAMoE.embed`` (the detector's own embedding) once on the whole example
text (the spec's choice) and once on the response only (the default). For every pair that must be
recognised as the same skill and every pair that must be told apart, the table shows the similarity and
whether the configured threshold decides it right. Prints the matrices and writes JSON.
"""

from __future__ import annotations

import argparse

import torch

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.data import humaneval, humaneval_x, mbpp, nl2bash, spider, verilogeval
from results import write_json

# (set, set, same skill?)
PAIRS = [
    ("humaneval-a", "humaneval-b", True), ("humaneval-a", "verilogeval", False),
    ("mbpp-a", "mbpp-b", True), ("mbpp-a", "humaneval-x-js", False), ("humaneval-a", "humaneval-x-js", False),
    ("mbpp-a", "spider", False), ("mbpp-a", "nl2bash", False), ("humaneval-x-js", "spider", False),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--per-set", type=int, default=48, help="examples embedded per set")
    p.add_argument("--out", default="results/novelty_margin.json")
    return p.parse_args(argv)


def sets(data_dir: str | None, n: int) -> dict:
    he = humaneval()
    found = {"humaneval-a": he[:n], "humaneval-b": he[82 : 82 + n], "verilogeval": verilogeval()[:n]}
    if data_dir:
        rows = mbpp(data_dir)
        found |= {"mbpp-a": rows[:n], "mbpp-b": rows[500 : 500 + n], "humaneval-x-js": humaneval_x(data_dir)[:n],
                  "spider": spider(data_dir)[:n], "nl2bash": nl2bash(data_dir)[:n]}
    return found


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = DyLoRAMoE.from_config(DyLoRAConfig(model=args.model, device="cpu")).eval()
    threshold = model.config.novelty.similarity_threshold
    data = sets(args.data_dir, args.per_set)
    result = {"model": args.model, "threshold": threshold, "per_set": args.per_set, "modes": {}}
    for mode in ("text", "response"):
        model.config.novelty.embed_on = mode
        emb = {name: model.embed(rows)[0] for name, rows in data.items()}
        names = list(emb)
        unit = torch.nn.functional.normalize(torch.stack([emb[n] for n in names]), dim=-1)
        sim = (unit @ unit.T).tolist()
        pairs = []
        for a, b, same in PAIRS:
            if a in emb and b in emb:
                s = sim[names.index(a)][names.index(b)]
                pairs.append({"a": a, "b": b, "same_skill": same, "similarity": s, "right": (s >= threshold) == same})
        result["modes"][mode] = {"sets": names, "similarity": sim, "pairs": pairs}
        print(f"\nembedding on {mode}: threshold {threshold}")
        print("| pair | same skill | similarity | decided right |\n|---|---|---:|---|")
        for p in pairs:
            print(f"| {p['a']} / {p['b']} | {p['same_skill']} | {p['similarity']:.4f} | {p['right']} |")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
