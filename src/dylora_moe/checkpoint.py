"""Save and load a whole system: experts as standard peft adapter folders, router, skill library, config.

    system/
      dylora.json                      format version, DyLoRAConfig, expert ids, ranks, next id
      router.safetensors               gate weight/bias and expert maturity
      library.json, library.safetensors  skills (names, experts, counts) and their embeddings
      experts/expert_<id>/             adapter_config.json + adapter_model.safetensors: loads with plain
                                       ``PeftModel.from_pretrained(base_model, path)``
      lm_head.safetensors              the untied output head, with ``trainable_lm_head`` only

A save is written to a temporary sibling folder, checked against its manifest, and swapped in by renames,
so a crash leaves either the old or the new checkpoint, never a mixture. Writers of one folder exclude each
other with a lock file beside it (``.<name>.lock``, an advisory ``flock`` that the system releases when its
holder dies, so a killed writer leaves no stale lock; the file names the holder's pid). ``dylora serve``
(with uploads on) and ``dylora train`` hold it for their lifetime (``writer_lock``); a bare
``save_pretrained`` takes it for the save. A second writer is refused with ``FolderBusy``; readers never
wait for it, and ``recover`` leaves the temporary folders of a live writer alone. The swap itself (two
renames and the removal of the old copy) takes a second lock (``.<name>.swap``) exclusively, and a load
holds it shared while it reads, so a reader never sees the folder change under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import DyLoRAConfig, unknown_fields
from .experts.manager import expert_name

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "dylora.json"
HEAD = "lm_head.safetensors"


class FolderBusy(RuntimeError):
    """Another live process is writing this system folder."""


_held: dict[Path, int] = {}  # lock file -> open descriptor, for the folders this process writes


def _lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def writer_lock(path: str | Path, *, who: str = "dylora-moe", wait: float = 5.0) -> Iterator[None]:
    """Hold the exclusive writer lock of the system folder ``path`` (re-entrant within a process). A lock held
    briefly (another process's ``recover``, or a save finishing) is waited for up to ``wait`` seconds; a
    writer that keeps it longer is reported with ``FolderBusy``."""
    lock = _lock_file(Path(path).resolve())
    if lock in _held:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
        owner = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise FolderBusy(f"{path} is being written by {owner}: two writers would lose each other's changes; stop "
                         "it (or wait for it to finish) first, or write to another folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{who} (pid {os.getpid()})".encode())
    _held[lock] = fd
    try:
        yield
    finally:
        del _held[lock]
        os.close(fd)  # releases the flock


def holds_writer_lock(path: str | Path) -> bool:
    """Does this process hold the writer lock of the system folder ``path``?"""
    return _lock_file(Path(path).resolve()) in _held


@contextlib.contextmanager
def _swap_lock(path: Path, *, shared: bool) -> Iterator[None]:
    """Blocking lock around a swap (exclusive) or a read (shared) of the folder ``path``."""
    lock = path.resolve().parent / f".{path.name}.swap"
    if not lock.parent.exists():
        yield
        return
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
        # A reader of a folder it cannot write beside (a read-only mount, another user's folder): share the lock
        # if a writer made it, else no save can run there to swap the folder under it.
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Hold off a concurrent save's swap while several files of the folder ``path`` are read: they all come
    from one checkpoint (what ``from_pretrained`` does for its own reads)."""
    path = Path(path)
    recover(path)
    with _swap_lock(path, shared=True):
        yield


def _writer_alive(path: Path) -> bool:
    """Is another process holding the writer lock of ``path`` right now?"""
    lock = _lock_file(path.resolve())
    if lock in _held or not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def save_pretrained(model, path: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (a ``DyLoRAMoE``) to ``path`` atomically under the folder's writer lock; ``extra(folder)``
    may add files (a training loop's progress) that must change together with the weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(path):
        check_replaceable(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            if extra is not None:
                extra(tmp)
            _write(model, tmp, path)
            verify(tmp)  # the old copy is deleted only once the new one is known complete
            sync_tree(tmp)  # and on disk: a power cut after the swap must not find empty files
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    model.experts.written = dict.fromkeys(model.experts.expert_ids, path.resolve())
    return path


def check_replaceable(path: Path) -> None:
    """A save replaces the folder ``path`` whole: refuse a file, or a folder of other files than a saved system
    (a run or project folder given for its ``system`` subfolder), instead of deleting what it holds."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a system folder: save to a new or empty folder")
    if path.is_dir() and not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise FileExistsError(f"{path} holds files but is not a saved DyLoRA-MoE system (no {MANIFEST}): a save "
                              "replaces its folder whole and would delete them; save to a new or empty folder "
                              f"(e.g. {path / 'system'})")


def verify(folder: Path) -> None:
    """Check a written system folder against its manifest: every file present, every tensor file readable."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: the save did not complete")
    data = read_json(manifest)
    for name in ("router.safetensors", "library.safetensors"):
        load_tensors(folder / name)
    if data["config"].get("trainable_lm_head"):
        load_tensors(folder / HEAD)
    read_json(folder / "library.json")
    for expert_id in data["expert_ids"]:
        check_adapter(folder / "experts" / expert_name(expert_id))


def _write(model, out: Path, dest: Path) -> None:
    """Write ``model`` into ``out``, the temporary folder of a save to ``dest``. An expert whose weights ``dest``
    already holds (loaded from there or saved there, and not trained or edited since) is hard-linked from it
    instead of written again, so a save costs what changed, not the pool size. A trainable expert is always
    written: an optimizer may have stepped it since the last save (a user's loop saving every epoch). An
    offloaded expert is brought back to be written and offloaded again after: a save leaves every expert where
    it was."""
    manager = model.experts
    dest = dest.resolve()
    kept = [e for e in manager.expert_ids
            if e not in manager.trainable_ids and manager.written.get(e) == dest and _link_expert(dest, out, e)]
    changed = [e for e in manager.expert_ids if e not in kept]
    offloaded = [e for e in changed if not manager.is_resident(e)]
    manager.onload(offloaded)
    try:
        if manager.peft_model is not None and changed:
            manager.peft_model.save_pretrained(str(out / "experts"),
                                               selected_adapters=[expert_name(e) for e in changed])
    finally:
        manager.offload(offloaded)
    router = model.router
    save_file({"gate.weight": router.gate.weight.detach().cpu().contiguous(),
               "gate.bias": router.gate.bias.detach().cpu().contiguous(),
               "expert_maturity": router.expert_maturity.cpu().contiguous()}, str(out / "router.safetensors"))
    if model.config.trainable_lm_head:  # trained with the experts: the backbone's file does not hold it
        head = model.backbone.get_output_embeddings()
        save_file({name: t.detach().cpu().contiguous() for name, t in head.state_dict().items()},
                  str(out / HEAD))
    library, tensors = model.library.state_dict()
    save_file(tensors or {"empty": torch.zeros(0)}, str(out / "library.safetensors"))
    (out / "library.json").write_text(json.dumps(library, indent=2), encoding="utf-8")
    manifest = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(),
                "expert_ids": manager.expert_ids, "ranks": {str(k): v for k, v in manager.ranks.items()},
                "next_id": manager.next_id, "lineage": {str(k): v for k, v in manager.lineage.items()}}
    # The manifest goes last: a folder without it is never mistaken for a complete checkpoint.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _link_expert(src: Path, out: Path, expert_id: int) -> bool:
    """Hard-link (or, across file systems, copy) an expert's adapter files from ``src`` into ``out``."""
    folder = src / "experts" / expert_name(expert_id)
    files = [folder / name for name in ("adapter_config.json", "adapter_model.safetensors")]
    if not all(f.is_file() for f in files):
        return False
    target = out / "experts" / expert_name(expert_id)
    target.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file():
            try:
                os.link(f, target / f.name)
            except OSError:
                shutil.copy2(f, target / f.name)
    return True


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a file of this process and thread beside it and a rename: a reader, or
    another writer of the same file, sees the old contents or the new, never a torn file, and a killed writer
    leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _swap_in(tmp: Path, path: Path) -> None:
    with _swap_lock(path, shared=False):
        _restore_old(path)
        if not path.exists():
            os.replace(tmp, path)
            _sync_dir(path.parent)
            return
        old = _old(path)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        _sync_dir(path.parent)  # the renames are durable before the old copy goes
        shutil.rmtree(old, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    """fsync every file this save wrote under ``folder`` and every folder in it (contents and names reach the
    disk). A file with another link is an unchanged expert's, linked from the previous copy, whose save synced
    it: a save still costs what changed."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.stat(path).st_nlink > 1:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(root))


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover(path: str | Path) -> None:
    """Finish what a save killed mid-way left: put back the previous checkpoint if the swap was cut between
    its two renames, and remove half-written temporary folders. Nothing is touched while another process
    holds the folder's writer lock: its temporary folder is a save in progress, not debris."""
    path = Path(path)
    if not path.parent.exists() or _writer_alive(path):
        return
    try:
        with writer_lock(path, who="recovery", wait=0):  # briefly a writer: two recovering readers do not collide
            _restore_old(path)
            for stale in path.parent.glob(f".{path.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
    except (FolderBusy, PermissionError, OSError):
        return  # a writer started meanwhile (or the folder is read-only): its files are not debris


def _restore_old(path: Path) -> None:
    old = _old(path)
    if not path.exists() and (old / MANIFEST).is_file():
        os.replace(old, path)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    recover(path)
    manifest = path / MANIFEST
    for _ in range(50):  # a live writer may be between the two renames of its swap: the folder returns at once
        if manifest.is_file() or not _writer_alive(path):
            break
        time.sleep(0.1)
    if not manifest.is_file():
        raise FileNotFoundError(f"{path} is not a saved DyLoRA-MoE system (no {MANIFEST}); "
                                "give the folder that save_pretrained wrote")
    data = read_json(manifest)
    if not isinstance(data, dict) or not {"config", "expert_ids", "ranks", "next_id"} <= set(data):
        raise ValueError(f"{manifest} is not a complete manifest (it needs config, expert_ids, ranks and next_id); "
                         "restore the folder from a copy or retrain")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version}; this dylora-moe reads version {FORMAT_VERSION}: "
                         "upgrade dylora-moe to load it")
    unranked = [str(e) for e in data["expert_ids"] if str(e) not in data["ranks"]]
    if unranked:
        raise ValueError(f"{manifest} does not fit its experts (no rank for expert(s) {', '.join(unranked)}): it "
                         "is corrupt; restore the file from a copy")
    return data


def load_pretrained(cls, path: str | Path, *, backbone=None, tokenizer=None, **overrides):
    """Rebuild a ``DyLoRAMoE`` saved by ``save_pretrained``; ``overrides`` replace saved config fields."""
    path = Path(path)
    recover(path)
    with _swap_lock(path, shared=True):  # a concurrent save swaps in its folder before or after this read
        return _load(cls, path, backbone, tokenizer, overrides)


def merged_config(saved: dict, overrides: dict) -> dict:
    """The saved config with ``overrides`` applied: a section given as a dict (``router={"top_k": 1}``) changes
    only the fields it names and keeps the saved others; a section given as a config object, or a plain field,
    replaces the saved value."""
    merged = dict(saved)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _load(cls, path: Path, backbone, tokenizer, overrides: dict):
    manifest = read_manifest(path)
    unknown = unknown_fields(manifest["config"])
    if unknown:
        raise ValueError(f"{path / MANIFEST} has config field(s) this dylora-moe does not know ({', '.join(unknown)}): "
                         "the system was saved by a newer dylora-moe; upgrade dylora-moe to load it")
    saved = merged_config(manifest["config"], overrides)
    if isinstance(saved.get("novelty", {}), dict) and "method" not in saved.get("novelty", {}):
        # Saved before the calibrated methods existed: keep deciding as it was built to (cosine threshold).
        saved["novelty"] = {**saved.get("novelty", {}), "method": "cosine"}
        logger.info("%s predates per-example skill statistics: its novelty decision stays 'cosine'", path)
    config = DyLoRAConfig.from_dict(saved)
    model = cls(backbone, tokenizer, config) if backbone is not None else cls.from_config(config)
    ranks = {int(k): v for k, v in manifest["ranks"].items()}
    for expert_id in manifest["expert_ids"]:
        folder = path / "experts" / expert_name(expert_id)
        saved_tensors = check_adapter(folder)
        with _fits(folder / "adapter_model.safetensors", manifest):
            model.experts.load_expert(expert_id, folder, ranks[expert_id])
        check_complete_adapter(model.experts, expert_id, folder, saved_tensors)
    model.experts.next_id = manifest["next_id"]
    model.experts.lineage = {int(k): v for k, v in manifest.get("lineage", {}).items()}
    model.experts.written = dict.fromkeys(manifest["expert_ids"], path.resolve())
    model.experts.disable_adapters()
    model.mixture.sync()
    # Tensors are read onto the CPU; each goes where the live model keeps its kind: the router's state is
    # copied into the gate (on the backbone's device), skill embeddings go beside the embeddings ``embed`` makes.
    router_state = load_tensors(path / "router.safetensors")
    with _fits(path / "router.safetensors", manifest):
        model.router.load_state_dict(router_state)
        if model.router.num_experts != model.num_experts:
            raise RuntimeError(f"the gate has {model.router.num_experts} columns for {model.num_experts} experts")
    if model.config.trainable_lm_head:
        head = model.backbone.get_output_embeddings()
        if (path / HEAD).is_file():
            state = load_tensors(path / HEAD)
            with _fits(path / HEAD, manifest):
                head.load_state_dict({k: v.to(head.weight.dtype) for k, v in state.items()})
        else:
            logger.warning("%s has no %s (saved before the trained head was kept): the head is the backbone's",
                           path, HEAD)
    library = read_json(path / "library.json")
    model.library.load_state_dict(library, load_tensors(path / "library.safetensors"))
    missing = model.library.missing_samples()
    if missing and model.config.novelty.method != "cosine":
        logger.warning("%s was saved without per-example skill embeddings (skills %s): the %r novelty method "
                       "will refuse to decide until it is loaded with novelty={'method': 'cosine'}",
                       path, ", ".join(missing), model.config.novelty.method)
    return model


@contextlib.contextmanager
def _fits(file: Path, manifest: dict) -> Iterator[None]:
    """Name the file and the way out when its saved tensors do not fit the model being rebuilt (torch's size
    mismatch or missing-key error names neither)."""
    try:
        yield
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])
        raise ValueError(f"{file} does not fit this model ({detail}): it was saved on another backbone or is "
                         f"corrupt; load the system on the backbone it was saved with "
                         f"({manifest['config'].get('model')!r}), or restore the file from a copy") from err


def check_adapter(folder: Path) -> set[str]:
    """Check that an expert's adapter folder is complete and readable; returns the names of its tensors."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"expert weights are incomplete: {folder / name} is missing")
    read_json(folder / "adapter_config.json")
    return tensor_names(folder / "adapter_model.safetensors")


def check_complete_adapter(manager, expert_id: int, folder: Path, saved: set[str]) -> None:
    """Refuse an adapter file that lacks some of the expert's weight tensors: peft would only warn and leave
    those layers at their fresh initialisation, silently replacing the trained expert by a blank one."""
    expected = set(get_peft_model_state_dict(manager.peft_model, adapter_name=expert_name(expert_id)))
    missing = sorted(expected - saved)
    if missing:
        raise ValueError(f"{folder / 'adapter_model.safetensors'} lacks {len(missing)} of the expert's "
                         f"{len(expected)} weight tensors (e.g. {missing[0]}): the file is incomplete or belongs to "
                         "another model; restore it from a copy or retrain the expert")


def read_json(path: Path):
    """A JSON file of a saved system, or an error naming the file and the way out."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt or unreadable ({err}); restore it from a copy or retrain") from err


def tensor_names(path: Path) -> set[str]:
    """The tensor names of a safetensors file, from its header alone (peft reads the weights next); a file
    whose data does not cover what its header lists (a cut-off write) is refused like a corrupt one."""
    try:
        with safe_open(str(path), "pt") as fh:
            return set(fh.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is corrupt or unreadable ({err}); restore it from a copy or retrain") from err


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is corrupt or unreadable ({err}); restore it from a copy or retrain") from err

