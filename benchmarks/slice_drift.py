"""Is a later slice of a source the same skill as an earlier one? The novelty decision on slices in the file's
order against the same slices of a seeded random order (the stream source's ``shuffle``).

    python benchmarks/slice_drift.py --data-dir ../shared/data        # NL2Bash 0-300 then 400-700, as long-code

A stream that brings a skill back as a later slice of the same file (``start``/``stop``) expects the detector to
recognise it. That holds only if the file is in no meaningful order: NL2Bash is sorted by its descriptions, so
its records 400-700 are mostly ``chmod`` and ``find`` commands. For each size, the known skill is the first
``n`` examples of the first slice and the new batch the first ``n`` of the second, once in the file's order and
once for each ``--seeds`` seed in that seed's random order (the second slice then a disjoint random sample of
the source, like the first). Prints the detector's statistic against its boundary and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.backbone import resolve_model
from dylora_moe.config import NoveltyConfig
from dylora_moe.data.stream import SkillSpec, load_examples
from novelty import decide
from results import write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--source", default="nl2bash", help="builtin source name")
    p.add_argument("--first", default="0:300", help="the skill's first slice, START:STOP")
    p.add_argument("--second", default="400:700", help="the slice it returns with, START:STOP")
    p.add_argument("--sizes", default="16,64", help="examples per side")
    p.add_argument("--seeds", default="0,1,2,3,4", help="shuffle seeds of the random orders")
    p.add_argument("--out", default="results/slice_drift.json")
    return p.parse_args(argv)


def slice_examples(args, span: str, shuffle: int | None, n: int) -> list:
    start, stop = (int(v) for v in span.split(":"))
    source = {"type": "builtin", "name": args.source, "start": start, "stop": stop, "shuffle": shuffle}
    return load_examples(SkillSpec(args.source, source=source), args.data_dir)[:n]


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    novelty = NoveltyConfig(max_examples=max(sizes))
    model = DyLoRAMoE.from_config(DyLoRAConfig(model=resolve_model(args.model), novelty=novelty)).eval()
    rows = []
    for n in sizes:
        for shuffle in [None, *seeds]:
            known = model.embed_sample(slice_examples(args, args.first, shuffle, n))
            new = model.embed_sample(slice_examples(args, args.second, shuffle, n))
            d = decide(novelty.method, known, new)
            rows.append({"n": n, "shuffle": shuffle, "statistic": float(d.statistic), "boundary": float(d.boundary),
                         "p_value": d.p_value, "novel": bool(d.is_novel)})
            order = "file order" if shuffle is None else f"shuffle {shuffle}"
            print(f"n={n:3d} {order:10s} statistic {d.statistic:.3f} boundary {d.boundary:.3f} "
                  f"-> {'novel' if rows[-1]['novel'] else 'recognised'}", flush=True)
    summary = {}
    for n in sizes:
        shuffled = [r for r in rows if r["n"] == n and r["shuffle"] is not None]
        file_order = next(r for r in rows if r["n"] == n and r["shuffle"] is None)
        summary[str(n)] = {"file_order": file_order["statistic"],
                           "shuffled_median": statistics.median(r["statistic"] for r in shuffled),
                           "shuffled_max": max(r["statistic"] for r in shuffled),
                           "shuffled_novel": sum(r["novel"] for r in shuffled), "seeds": len(shuffled)}
    result = {"source": args.source, "first": args.first, "second": args.second, "model": args.model,
              "method": novelty.method, "rows": rows, "summary": summary}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
