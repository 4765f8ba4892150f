"""Dotted parameter names and how tuned values overlay a stream's ``system`` and ``training`` sections.

A tunable parameter is named by its place in a stream file: ``training.seed_lr`` (a ``TrainingConfig`` field),
``system.expert.rank`` or ``system.router.temperature`` (fields of the ``DyLoRAConfig`` sections). A tuned
configuration is a flat mapping of such names to values (the ``params:`` section of ``best.yaml``); it is
applied over a stream by ``apply_params``, which ``dylora train --params`` and ``load_stream`` both use.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import typing
from pathlib import Path
from typing import Any

from ..config import DyLoRAConfig
from ..data.stream import read_yaml
from ..training.config import TrainingConfig

# fields that choose what runs, not how well it learns: never tuned
NOT_TUNABLE = {"system.model", "system.device", "training.report_to", "training.logging_steps",
               "training.eval_batch_size"}


def _leaves(instance: Any, prefix: str) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def defaults() -> dict[str, Any]:
    """Every tunable name with its library default (``system.expert.rank`` -> 8, ...)."""
    every = {**_leaves(DyLoRAConfig(), "system."), **_leaves(TrainingConfig(), "training.")}
    return {name: value for name, value in every.items() if name not in NOT_TUNABLE}


def _types(cls: type, prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(_types(kind, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = kind
    return out


@functools.cache
def declared_types() -> dict[str, Any]:
    """Every tunable name with its field's declared type (``system.max_experts`` -> ``int | None``, ...)."""
    every = {**_types(DyLoRAConfig, "system."), **_types(TrainingConfig, "training.")}
    return {name: kind for name, kind in every.items() if name not in NOT_TUNABLE}


def number_kind(name: str) -> type | None:
    """``int`` or ``float`` when the parameter takes numbers (``None`` allowed besides), else ``None``. Read from the
    field's declared type, not its default: a default of ``None`` (``system.max_experts``) says nothing."""
    kinds = set(typing.get_args(declared_types()[name]) or (declared_types()[name],)) - {type(None)}
    if kinds == {int}:
        return int
    return float if kinds and kinds <= {int, float} else None


def check_name(name: str, where: str = "") -> None:
    """Raise a ``ValueError`` naming the unknown parameter and the closest known names."""
    known = defaults()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "names look like training.seed_lr or system.expert.rank"
    raise ValueError(f"{where}unknown parameter {name!r}: {hint} (tunable: {', '.join(sorted(known))})")


def get_value(system: dict[str, Any], training: dict[str, Any], name: str) -> Any:
    """The value ``name`` has in a stream's sections, else the library default."""
    section, *path = name.split(".")
    node: Any = system if section == "system" else training
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return defaults()[name]
        node = node[key]
    return node


def apply_params(system: dict[str, Any], training: dict[str, Any],
                 params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Copies of a stream's ``system`` and ``training`` sections with ``params`` (dotted names) set in them."""
    system, training = copy.deepcopy(system), copy.deepcopy(training)
    for name, value in params.items():
        check_name(name)
        section, *path = name.split(".")
        node = system if section == "system" else training
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return system, training


def build_configs(system: dict[str, Any], training: dict[str, Any]) -> tuple[DyLoRAConfig, TrainingConfig]:
    """The config objects of a stream's sections (their ``__post_init__`` checks run here)."""
    return DyLoRAConfig.from_dict(system), TrainingConfig.from_dict(training)


def load_params(path: str | Path) -> dict[str, Any]:
    """The ``params:`` section of a file ``dylora tune`` wrote (``best.yaml``), names checked."""
    path = Path(path)
    data = read_yaml(path, "params file")
    params = data.get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{path} has no `params:` mapping of tuned values (dotted names such as "
                         "training.seed_lr); `dylora tune` writes one in DIR/best.yaml")
    for name in params:
        check_name(name, where=f"{path}: ")
    return params
