"""The expert pool on peft and the fused mixture layer."""

from .fused import ExpertMixture, MixturePlan
from .manager import ExpertManager, expert_name
from .targets import decoder_layers, detect_target_modules, expert_rank

__all__ = [
    "ExpertManager",
    "ExpertMixture",
    "MixturePlan",
    "decoder_layers",
    "detect_target_modules",
    "expert_name",
    "expert_rank",
]
