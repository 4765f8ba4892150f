"""Save and load a whole system: experts as standard peft adapter folders, router, skill library, config.

    system/
      dylora.json                      format version, DyLoRAConfig, expert ids, ranks, next id
      router.safetensors               gate weight/bias and expert maturity
      library.json, library.safetensors  skills (names, experts, counts) and their embeddings
      experts/expert_<id>/             adapter_config.json + adapter_model.safetensors: loads with plain
                                       ``PeftModel.from_pretrained(base_model, path)``

A save is written to a temporary sibling folder and swapped in by renames, so a crash leaves either the
old or the new checkpoint, never a mixture.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import DyLoRAConfig
from .experts.manager import expert_name

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "dylora.json"


def save_pretrained(model, path: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (a ``DyLoRAMoE``) to ``path`` atomically; ``extra(folder)`` may add files (a training
    loop's progress) that must change together with the weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        if extra is not None:
            extra(tmp)
        _write(model, tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write(model, out: Path) -> None:
    manager = model.experts
    manager.onload(manager.expert_ids)
    if manager.peft_model is not None and manager.expert_ids:
        manager.peft_model.save_pretrained(str(out / "experts"), selected_adapters=manager.names())
    router = model.router
    save_file({"gate.weight": router.gate.weight.detach().cpu().contiguous(),
               "gate.bias": router.gate.bias.detach().cpu().contiguous(),
               "expert_maturity": router.expert_maturity.cpu().contiguous()}, str(out / "router.safetensors"))
    library, tensors = model.library.state_dict()
    save_file(tensors or {"empty": torch.zeros(0)}, str(out / "library.safetensors"))
    (out / "library.json").write_text(json.dumps(library, indent=2), encoding="utf-8")
    manifest = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(),
                "expert_ids": manager.expert_ids, "ranks": {str(k): v for k, v in manager.ranks.items()},
                "next_id": manager.next_id}
    # The manifest goes last: a folder without it is never mistaken for a complete checkpoint.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _swap_in(tmp: Path, path: Path) -> None:
    _restore_old(path)
    if not path.exists():
        os.replace(tmp, path)
        return
    old = _old(path)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover(path: str | Path) -> None:
    """Finish what a save killed mid-way left: put back the previous checkpoint if the swap was cut between
    its two renames, and remove half-written temporary folders."""
    path = Path(path)
    _restore_old(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _restore_old(path: Path) -> None:
    old = _old(path)
    if not path.exists() and (old / MANIFEST).is_file():
        os.replace(old, path)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    recover(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{path} is not a saved DyLoRA-MoE system (no {MANIFEST}); "
                                "give the folder that save_pretrained wrote")
    data = json.loads(manifest.read_text(encoding="utf-8"))
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version}; this dylora-moe reads version {FORMAT_VERSION}: "
                         "upgrade dylora-moe to load it")
    return data


def load_pretrained(cls, path: str | Path, *, backbone=None, tokenizer=None, **overrides):
    """Rebuild a ``DyLoRAMoE`` saved by ``save_pretrained``; ``overrides`` replace saved config fields."""
    path = Path(path)
    manifest = read_manifest(path)
    saved = dict(manifest["config"])
    if "method" not in saved.get("novelty", {}) and "novelty" not in overrides:
        # Saved before the calibrated methods existed: keep deciding as it was built to (cosine threshold).
        saved["novelty"] = {**saved.get("novelty", {}), "method": "cosine"}
        logger.info("%s predates per-example skill statistics: its novelty decision stays 'cosine'", path)
    config = DyLoRAConfig.from_dict({**saved, **overrides})
    model = cls(backbone, tokenizer, config) if backbone is not None else cls.from_config(config)
    ranks = {int(k): v for k, v in manifest["ranks"].items()}
    for expert_id in manifest["expert_ids"]:
        folder = path / "experts" / expert_name(expert_id)
        check_adapter(folder)
        model.experts.load_expert(expert_id, folder, ranks[expert_id])
    model.experts.next_id = manifest["next_id"]
    model.experts.disable_adapters()
    model.mixture.sync()
    # Tensors are read onto the CPU; each goes where the live model keeps its kind: the router's state is
    # copied into the gate (on the backbone's device), skill embeddings go beside the embeddings ``embed`` makes.
    router_state = _load_tensors(path / "router.safetensors")
    model.router.load_state_dict(router_state)
    library = json.loads((path / "library.json").read_text(encoding="utf-8"))
    model.library.load_state_dict(library, _load_tensors(path / "library.safetensors"))
    missing = model.library.missing_samples()
    if missing and model.config.novelty.method != "cosine":
        logger.warning("%s was saved without per-example skill embeddings (skills %s): the %r novelty method "
                       "will refuse to decide until it is loaded with novelty={'method': 'cosine'}",
                       path, ", ".join(missing), model.config.novelty.method)
    return model


def check_adapter(folder: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"expert weights are incomplete: {folder / name} is missing")
    _load_tensors(folder / "adapter_model.safetensors")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is corrupt or unreadable ({err}); restore it from a copy or retrain") from err

