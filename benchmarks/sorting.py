"""How well mixed chunks are sorted into skills, on two backbones, over many skill sequences (no training).

    python benchmarks/sorting.py --data-dir ../shared/data --model default --model gemma3-270m \\
        --out results/sorting.json

The sorting reads only the frozen backbone's embeddings, so it can be measured without training: every
sequence of 4 skills (different languages or domains, drawn with a seed from the shared data and the built-in
sources) runs through the ``SkillSorter`` with the default ``NoveltyConfig`` and the real novelty decision, in
chunks shaped like ``configs/streams/mixed-code.yaml`` (the first skill alone, then each new skill arriving as
40% of a chunk next to the known ones, then all four evenly). A null stream per dataset (five chunks of 30 of one
skill) counts experts that should not exist. Embeddings are those of ``benchmarks/novelty.py`` (same cache).
Reports per backbone: sequences with exactly one expert per skill, purity and adjusted Rand index (mean and
worst), mean novelty delay, and the null streams' extra experts. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from dylora_moe.config import NoveltyConfig
from dylora_moe.evaluation.metrics import adjusted_rand_index, novelty_delay, purity
from dylora_moe.novelty import NoveltyDetector, SkillLibrary, SkillSample
from dylora_moe.novelty.detector import NoveltyResult
from dylora_moe.novelty.sorting import SkillSorter
from novelty import GROUPS, datasets, embed_all
from results import write_json

CHUNK = 48
DOMAINS = {k: v for k, v in GROUPS.items() if v}  # CodeAlpaca (code in every language) is no domain of its own


def plan(skills: list[str]) -> list[dict[str, int]]:
    """mixed-code.yaml's shape for any 4 skills: a, a+b, a+b+c, a+b+c+d (the newest at 40%), then even."""
    a, b, c, d = skills
    return [{a: 48}, {a: 29, b: 19}, {a: 15, b: 14, c: 19}, {a: 10, b: 10, c: 9, d: 19},
            {a: 12, b: 12, c: 12, d: 12}]


class Lab:
    """A library and detector without a model: what ``DyLoRAMoE.add_skill_sample`` does to them."""

    def __init__(self, config: NoveltyConfig) -> None:
        self.library = SkillLibrary(config.capacity)
        self.detector = NoveltyDetector(self.library, config)

    def found(self, sample: SkillSample, name: str) -> NoveltyResult:
        embedding = torch.nn.functional.normalize(sample.mean, dim=0)
        d = self.detector.decide(sample, embedding)
        if not d.is_novel:
            s = self.library.update_skill(d.nearest_skill, embedding, len(sample), sample)
            return NoveltyResult(False, s.skill_id, s.expert_id, d.nearest_skill, None, 0)
        s = self.library.add_skill(embedding, expert_id=len(self.library), name=name, examples=len(sample),
                                   sample=sample)
        return NoveltyResult(True, s.skill_id, s.expert_id, d.nearest_skill, None, 0)


def run(samples: dict[str, SkillSample], chunks: list[dict[str, int]], seed: int) -> dict:
    config = NoveltyConfig()
    lab = Lab(config)
    sorter = SkillSorter(lab.library, config, lab.found)
    used = dict.fromkeys(samples, 0)
    table: dict[int, dict[str, int]] = {}
    founded = []
    for i, mix in enumerate(chunks):
        rows = []
        for name, n in mix.items():
            rows += [(name, j) for j in range(used[name], used[name] + n)]
            used[name] += n
        random.Random(seed + i).shuffle(rows)
        feats = torch.stack([samples[n].features[j] for n, j in rows])
        keys = [int(samples[n].keys[j]) for n, j in rows]
        order = torch.argsort(torch.tensor(keys))
        sample = SkillSample(feats[order], None, torch.tensor(keys)[order])
        result = sorter.sort(i, rows, sample, keys)
        founded.append([lab.library.skills[s].expert_id for s in result.founded])
        for skill_id, items in result.assigned.items():
            expert = lab.library.skills[skill_id].expert_id
            for name, _ in items:
                table.setdefault(expert, {}).setdefault(name, 0)
                table[expert][name] += 1
    delay = novelty_delay(chunks, founded, table)
    return {"experts": len(lab.library), "purity": purity(table), "ari": adjusted_rand_index(table),
            "delay": statistics.mean(delay.values()), "waiting": len(sorter.buffer), "table": table}


def sequences(names: list[str], count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        pick = rng.sample(names, 4)
        if len({DOMAINS[n] for n in pick}) == 4 and pick not in out:
            out.append(pick)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="backbone(s); default: default (SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sequences", type=int, default=24, help="4-skill sequences per backbone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "dylora_moe" / "novelty-bench"))
    p.add_argument("--out", default="results/sorting.json")
    args = p.parse_args(argv)
    data = datasets(args.data_dir)
    names = [n for n in data if n in DOMAINS]
    seqs = sequences(names, args.sequences, args.seed)
    results = {"chunk_plan": "a; a+b; a+b+c; a+b+c+d (newest 40%); even", "sequences": seqs, "backbones": {}}
    for model in args.model or ["default"]:
        start = time.perf_counter()
        samples = embed_all(model, -1, data, 160, Path(args.cache))
        runs = [run(samples, plan(s), args.seed + k) | {"skills": s} for k, s in enumerate(seqs)]
        nulls = {n: run(samples, [{n: 30}] * 5, args.seed)["experts"] - 1 for n in names}
        row = {"exact_expert_count": sum(r["experts"] == 4 for r in runs), "sequences": len(runs),
               "purity_mean": statistics.mean(r["purity"] for r in runs),
               "purity_min": min(r["purity"] for r in runs),
               "ari_mean": statistics.mean(r["ari"] for r in runs), "ari_min": min(r["ari"] for r in runs),
               "delay_mean": statistics.mean(r["delay"] for r in runs),
               "null_extra_experts": nulls, "runs": [{k: v for k, v in r.items() if k != "table"} for r in runs],
               "seconds": time.perf_counter() - start}
        results["backbones"][model] = row
        worst = min(runs, key=lambda r: r["purity"])
        print(f"{model}: {row['exact_expert_count']}/{len(runs)} sequences with one expert per skill; purity "
              f"{row['purity_mean']:.3f} (worst {row['purity_min']:.3f}: {worst['skills']}), ARI "
              f"{row['ari_mean']:.3f} (worst {row['ari_min']:.3f}), novelty delay {row['delay_mean']:.1f} "
              f"examples; null streams: {sum(nulls.values())} extra experts over {len(nulls)} datasets", flush=True)
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
