"""Device and dtype audit of the whole cycle: create, train, save, load, add a skill, generate.

    python benchmarks/device_audit.py                          # default model in bf16, on the GPU when present
    python benchmarks/device_audit.py --device cpu --dtype float32 --out /tmp/audit.json

A bf16 backbone (by default) learns two small synthetic skills through the continual loop (one optimizer step
per phase, training precision ``auto``: bf16 autocast on a capable GPU), is saved, loaded back from disk, grows
by a third skill, recognises a repeat of the first, and generates (greedy, beam search and sampling with
several returns, batch 2). After every stage each tensor the system holds (backbone, experts, gate, maturity,
skill embeddings, routing memory rows when rehearsed) is checked to live on the model's device, and the
adapters in fp32 as peft keeps them. Prints one line per stage and writes JSON; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig
from dylora_moe.backbone import resolve_device
from dylora_moe.data.stream import StreamSpec
from dylora_moe.training import ContinualLearner, TrainingConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="HF id, local path or 'default'")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="bfloat16", help="backbone dtype: bfloat16 | float16 | float32")
    p.add_argument("--precision", default="auto", help="training autocast: auto | fp32 | bf16 | fp16")
    p.add_argument("--out", default="results/device_audit.json")
    return p.parse_args(argv)


def skill_rows(name: str, n: int = 24) -> list[dict]:
    if name == "sums":
        return [{"prompt": f"{i} plus {i} is", "response": f" {2 * i}."} for i in range(n)]
    if name == "shout":
        return [{"prompt": f"Shout the word {w}:", "response": f" {w.upper()}!"}
                for w in ("apple pear plum fig lime kiwi date lemon melon mango guava peach " * 2).split()[:n]]
    return [{"prompt": f"SELECT column {i} FROM", "response": f" table_{i};"} for i in range(n)]


def write_stream(folder: Path, names: list[str]) -> StreamSpec:
    skills = []
    for name in names:
        path = folder / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in skill_rows(name)), encoding="utf-8")
        skills.append({"name": name, "source": {"type": "file", "path": str(path)}, "format": {"chat": False}})
    return StreamSpec("device-audit", skills)


def placement(model: DyLoRAMoE, memory=None) -> list[str]:
    """Every tensor the system holds that is not where it should be, as readable lines (empty: all good)."""
    device, problems = model.device, []

    def check(what: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        if tensor.device != device:
            problems.append(f"{what} on {tensor.device}, model on {device}")
        if dtype is not None and tensor.dtype != dtype:
            problems.append(f"{what} is {tensor.dtype}, expected {dtype}")

    for name, p in model.backbone.named_parameters():
        check(f"backbone {name}", p)
    for expert_id in model.experts.expert_ids:
        model.experts.onload([expert_id])
        for p in model.experts.parameters(expert_id):
            check(f"expert {expert_id} weight", p, torch.float32)
    check("gate weight", model.router.gate.weight)
    check("expert maturity", model.router.expert_maturity)
    for skill in model.library.skills.values():
        check(f"skill {skill.name!r} embedding", skill.embedding, torch.float32)
    if memory is not None and memory.batch(model.experts.expert_ids, device) is not None:
        check("rehearsal rows", memory.batch(model.experts.expert_ids, device)[0])
    return problems


def generations(model: DyLoRAMoE) -> dict[str, list[int]]:
    """Greedy, beam search and sampling with two returns, on a batch of two prompts: output shapes."""
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = ["3 plus 3 is", "Shout the word apple:"]
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    shapes = {}
    for mode, kwargs in {"greedy": dict(do_sample=False), "beams": dict(num_beams=3, num_return_sequences=2),
                         "sampling": dict(do_sample=True, num_return_sequences=2)}.items():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=pad, **kwargs)
        shapes[mode] = list(out.shape)
    shapes["complete"] = [len(model.complete(prompts, max_new_tokens=4, chat=False))]
    return shapes


def audit(model_name: str, device: str = "auto", dtype: str = "bfloat16", precision: str = "auto",
          work: Path | None = None, say=print) -> dict:
    """Run the cycle; returns per stage its seconds and placement problems, and ``ok``."""
    work = Path(work or tempfile.mkdtemp(prefix="dylora-audit-"))
    work.mkdir(parents=True, exist_ok=True)
    config = DyLoRAConfig(model=model_name, dtype=dtype, device=str(resolve_device(device)),
                          expert=ExpertConfig(rank=4, dropout=0.05))
    training = TrainingConfig(seed_steps=1, consolidation_steps=1, batch_size=2, max_length=48,
                              rehearsal_per_skill=8, router_fit_steps=5, eval_batch_size=4, report_to=["none"],
                              precision=precision)
    stages, start = {}, time.perf_counter()

    def stage(name: str, model: DyLoRAMoE, memory=None, **extra) -> None:
        problems = placement(model, memory)
        stages[name] = {"seconds": round(time.perf_counter() - start, 2), "problems": problems, **extra}
        say(f"{name:<10} {'ok' if not problems else 'FAILED'} on {model.device} "
            f"({model.backbone.dtype}, {model.num_experts} experts)" + "".join(f"\n  {p}" for p in problems))

    model = DyLoRAMoE.from_config(config)
    stage("create", model)
    learner = ContinualLearner(model, write_stream(work, ["sums", "shout"]), training, work / "run")
    records = learner.run(lambda msg: None)
    stage("train", model, learner.memory, losses=[r.losses for r in records])
    model.save_pretrained(work / "system")
    stage("save", model)
    loaded = DyLoRAMoE.from_pretrained(work / "system")
    stage("load", loaded)
    novel = loaded.add_new_skill([r["prompt"] + r["response"] for r in skill_rows("sql")], name="sql")
    again = loaded.add_new_skill([r["prompt"] + r["response"] for r in skill_rows("sums")], name="sums again")
    stage("add_skill", loaded, novel=novel.is_novel, recognised_as=again.expert_id)
    stage("generate", loaded, shapes=generations(loaded))
    ok = all(not s["problems"] for s in stages.values())
    return {"model": model_name, "device": str(loaded.device), "dtype": dtype, "precision": precision,
            "cuda_available": torch.cuda.is_available(), "stages": stages, "ok": ok}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = audit(args.model, args.device, args.dtype, args.precision)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print(f"{'all checks passed' if result['ok'] else 'placement problems found'}: {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
