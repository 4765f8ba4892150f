"""Model-agnostic choice of the layers an expert adapts, and the dynamic rank rule.

Presets name module suffixes per architecture family; detection keeps the ones the model actually has,
so the same ``ExpertConfig`` works on Llama, Qwen, Mistral, GPT-2, GPT-NeoX and Phi.
"""

from __future__ import annotations

import math

from torch import nn
from transformers.pytorch_utils import Conv1D

# Suffixes as peft matches them (module name ends with ".<suffix>"). Qualified where a bare name is
# ambiguous: GPT-2 calls both its attention output and its MLP output ``c_proj``.
ATTENTION_SUFFIXES = (
    "q_proj", "k_proj", "v_proj", "o_proj",  # Llama, Qwen, Mistral, Gemma
    "attn.c_attn", "attn.c_proj",  # GPT-2
    "attention.query_key_value", "attention.dense",  # GPT-NeoX
    "self_attn.dense", "qkv_proj", "Wqkv", "out_proj",  # Phi, Phi-3
)
MLP_SUFFIXES = (
    "gate_proj", "up_proj", "down_proj",  # Llama, Qwen, Mistral
    "mlp.c_fc", "mlp.c_proj",  # GPT-2
    "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",  # GPT-NeoX
    "mlp.fc1", "mlp.fc2", "gate_up_proj",  # Phi, Phi-3
)
PRESETS = {
    "attention": ATTENTION_SUFFIXES,
    "mlp": MLP_SUFFIXES,
    "all-linear": ATTENTION_SUFFIXES + MLP_SUFFIXES,
}


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear | Conv1D)]


def detect_target_modules(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Resolve a preset (or explicit suffixes) to the suffixes present in ``model``.

    Raises ``ValueError`` naming the linear layers the model does have when nothing matches.
    """
    names = linear_module_names(model)
    wanted = PRESETS[targets] if isinstance(targets, str) else tuple(targets)
    found = [s for s in wanted if any(n == s or n.endswith("." + s) for n in names)]
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"no linear layer of {type(model).__name__} matches target_modules={targets!r}; "
            f"its linear layers are named {leaves}: pass some of them as target_modules"
        )
    return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the ``ModuleList`` as long as ``config.num_hidden_layers``."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected {count} blocks)")


def expert_rank(rule: str, base_rank: int, max_rank: int, excess: float | None) -> int:
    """Rank of a new expert.

    ``fixed``: always ``base_rank``.
    ``novelty``: ``base_rank * 2 ** round(log2(1 + excess))`` capped at ``max_rank``, where ``excess`` is how
    far beyond the novelty detector's boundary the nearest known skill lies, in units of the boundary
    (``Decision.excess``: for the default method, separation / granularity - 1). A skill just past the
    boundary gets the base rank; one as far beyond it again as the boundary itself doubles it; the first
    skill (no neighbour) gets the base rank. Ranks stay powers-of-two multiples of the base rank.
    """
    if rule == "fixed" or excess is None:
        return base_rank
    if rule != "novelty":
        raise ValueError(f"rank_rule={rule!r} is not supported; choose fixed or novelty")
    return min(max_rank, base_rank * 2 ** round(math.log2(1.0 + max(0.0, excess))))
