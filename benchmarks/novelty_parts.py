"""Can part-wise novelty tell composed data (two known skills at once) from a new skill? A measurement of the
idea before building it into the detector.

    python benchmarks/novelty_parts.py --data-dir ../shared/data --out results/composed/novelty_parts.json

Each response is embedded with the frozen default model (final hidden states, unit-normalised per token, as
``novelty/embedding.py`` does) and cut into parts of ``--window`` tokens (mean-pooled). For a set of known
skills, half of each skill's examples give the library's parts and the other half a reference: the cosine
distance of each held-out known part to its nearest library part. A part of new data is *explained* when its
nearest-part distance is within that reference (conformal p-value > 0.05) and is then assigned to its nearest
part's skill. The rule that would recognise a mixture: few unexplained parts, assigned to two known skills.
The figures printed are the unexplained share and the assignment shares, for the composed pairs
(``data/composed.py``) and for skills the library does not know (which must stay novel).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dylora_moe.config import DyLoRAConfig
from dylora_moe.data.composed import composed
from dylora_moe.data.stream import SkillSource, SkillSpec, load_examples
from dylora_moe.model import DyLoRAMoE
from dylora_moe.novelty.embedding import detector_states
from results import write_json

SOURCES = {
    "python": SkillSource(name="mbpp", stop=300), "sql": SkillSource(name="spider", stop=400),
    "shell": SkillSource(name="nl2bash", stop=400), "javascript": SkillSource(name="humaneval-x", language="js"),
    "cpp": SkillSource(name="humaneval-x", language="cpp"), "java": SkillSource(name="humaneval-x", language="java"),
    "verilog": SkillSource(name="verilogeval"), "general": SkillSource(name="codealpaca"),
}
COMPOSED_START = {"sql-python": 400, "bash-python": 400, "python-js": 0}  # records the single skills do not use
# (known skills, new data asked about): composed pairs of known skills, and unknown skills as controls
CASES = [
    (("python", "sql", "shell"), ("C:sql-python", "C:bash-python", "javascript", "cpp", "java", "verilog", "general")),
    (("python", "javascript"), ("C:python-js", "cpp", "java", "verilog", "sql", "shell", "general")),
]


@torch.no_grad()
def token_states(model: DyLoRAMoE, responses: list[str], max_length: int = 256) -> list[torch.Tensor]:
    """Unit-normalised hidden states [T, H] of each response at the novelty detector's layer (final by default),
    frozen backbone, as ``novelty/embedding.py`` reads them."""
    out = []
    for text in responses:
        enc = model.tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).to(model.device)
        hidden = detector_states(model, enc["input_ids"], enc["attention_mask"])[0]  # the detector's layer, no expert
        out.append(torch.nn.functional.normalize(hidden.float(), dim=-1).cpu())
    return out


def parts(states: list[torch.Tensor], window: int) -> torch.Tensor:
    """Mean of each run of ``window`` tokens [P, H] (a short tail counts when at least half a window)."""
    rows = [s[i : i + window].mean(0) for s in states for i in range(0, s.shape[0], window)
            if i == 0 or s[i : i + window].shape[0] >= max(2, window // 2)]
    return torch.stack(rows).double()


def explained(known: dict[str, tuple[torch.Tensor, torch.Tensor]], new: torch.Tensor,
              level: float = 0.05) -> tuple[float, dict[str, float]]:
    """(share of ``new`` parts not explained by the known skills' parts, share of the explained ones assigned
    to each known skill); ``known[name] = (library parts, held-out reference parts)``."""
    names = list(known)
    library = torch.cat([known[n][0] for n in names])
    labels = torch.cat([torch.full((known[n][0].shape[0],), i) for i, n in enumerate(names)])
    centre = library.mean(0)
    bank = torch.nn.functional.normalize(library - centre, dim=-1)

    def nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sims = torch.nn.functional.normalize(x - centre, dim=-1) @ bank.T
        best, index = sims.max(1)
        return 1 - best, labels[index]

    reference = torch.cat([nearest(known[n][1])[0] for n in names])
    distance, skill = nearest(new)
    p_values = ((reference[None] >= distance[:, None]).sum(1) + 1) / (reference.numel() + 1)
    kept = skill[p_values > level]
    counts = torch.bincount(kept, minlength=len(names)).double()
    return float((p_values <= level).double().mean()), dict(zip(names, (counts / counts.sum().clamp(min=1)).tolist(),
                                                                  strict=True))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--examples", type=int, default=64, help="examples per skill (half library, half reference)")
    p.add_argument("--window", type=int, nargs="+", default=[8, 16, 32], help="tokens per part")
    args = p.parse_args(argv)
    model = DyLoRAMoE.from_config(DyLoRAConfig(model="default")).eval()
    data = {n: load_examples(SkillSpec(n, source=s), args.data_dir)[: args.examples] for n, s in SOURCES.items()}
    for pair, start in COMPOSED_START.items():
        data[f"C:{pair}"] = composed(args.data_dir, pair)[start : start + args.examples]
    states = {n: token_states(model, [e.response for e in ex]) for n, ex in data.items()}
    half = args.examples // 2
    results = []
    for window in args.window:
        split = {n: (parts(s[:half], window), parts(s[half:], window)) for n, s in states.items()}
        for known, asked in CASES:
            for name in asked:
                unexplained, assigned = explained({k: split[k] for k in known}, split[name][1])
                results.append({"window": window, "known": list(known), "data": name,
                                "unexplained_share": unexplained, "assigned": assigned})
                print(f"W={window:2d} known={'+'.join(known):22s} {name:14s} unexplained {unexplained:.2f}  "
                      + " ".join(f"{k} {v:.2f}" for k, v in assigned.items()), flush=True)
    write_json(args.out, {"command": " ".join(["python", "benchmarks/novelty_parts.py", *(argv or sys.argv[1:])]),
                          "examples": args.examples, "results": results})


if __name__ == "__main__":
    main()
