"""One consistent read of a saved system's routing state, and the version that names it.

A Ray deployment serves one system folder from several processes (the ingress, the generation replicas, the
skill-job actor), possibly on several machines sharing the folder. They agree on what they serve by a version:
a digest of the files a save rewrites (manifest, gate, library, every expert's adapter). A save swaps the whole
folder in at once; a ``Snapshot`` is read under ``checkpoint.reading``, so all its files, and its version, come
from one checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import MANIFEST, load_tensors, read_manifest, reading
from ..experts.manager import expert_name

ADAPTER = "adapter_model.safetensors"


@dataclass
class Snapshot:
    """The routing state of one checkpoint of ``folder``.

    Args:
        manifest: ``dylora.json`` (config, expert ids in gate-column order, ranks).
        router: gate weight [E, H], bias [E] and ``expert_maturity`` [E].
        library, library_tensors: the skill library as ``SkillLibrary.load_state_dict`` takes it.
        digests: file (relative to the folder) -> content digest; ``version`` digests them all.
        stamp: the manifest's inode and modification time: changes with every save, costs one ``stat``.
    """

    folder: Path
    manifest: dict
    router: dict[str, torch.Tensor]
    library: dict
    library_tensors: dict[str, torch.Tensor]
    digests: dict[str, str]
    version: str
    stamp: tuple[int, int]

    @property
    def expert_ids(self) -> list[int]:
        return list(self.manifest["expert_ids"])

    def expert_folder(self, expert_id: int) -> Path:
        return self.folder / "experts" / expert_name(expert_id)


def stamp(folder: Path) -> tuple[int, int]:
    st = os.stat(folder / MANIFEST)
    return st.st_ino, st.st_mtime_ns


def digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def read_snapshot(folder: str | Path) -> Snapshot:
    folder = Path(folder)
    with reading(folder):
        manifest = read_manifest(folder)
        files = [MANIFEST, "router.safetensors", "library.json", "library.safetensors"]
        files += [f"experts/{expert_name(e)}/{name}" for e in manifest["expert_ids"]
                  for name in ("adapter_config.json", ADAPTER)]
        digests = {f: digest(folder / f) for f in files}
        router = load_tensors(folder / "router.safetensors")
        library = json.loads((folder / "library.json").read_text(encoding="utf-8"))
        library_tensors = load_tensors(folder / "library.safetensors")
        version = hashlib.blake2b("\n".join(f"{f}:{d}" for f, d in digests.items()).encode(),
                                  digest_size=6).hexdigest()
        return Snapshot(folder, manifest, router, library, library_tensors, digests, version, stamp(folder))


def expert_digests(snapshot: Snapshot, expert_id: int, *, saved: bool = False) -> dict[str, str]:
    """The digests of one expert's files: as the snapshot recorded them (``saved``; empty for an expert it does
    not have), or as they are on disk now (read under ``reading``) to compare with those."""
    files = [f"experts/{expert_name(expert_id)}/{name}" for name in ("adapter_config.json", ADAPTER)]
    if saved:
        return {f: snapshot.digests[f] for f in files if f in snapshot.digests}
    return {f: digest(snapshot.folder / f) for f in files}
