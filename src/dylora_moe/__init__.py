"""DyLoRA-MoE: continual skill acquisition with a growing pool of LoRA experts on a frozen causal LM."""

from .backbone import DEFAULT_MODEL, load_backbone
from .config import DyLoRAConfig, ExpertConfig, NoveltyConfig, RouterConfig
from .events import EventLog
from .experts import ExpertManager, ExpertMixture
from .model import DyLoRAMoE, DyLoRAOutput
from .novelty import NoveltyDetector, NoveltyResult, SkillLibrary
from .routing import DynamicHybridRouter, RouterOutput

__all__ = [
    "DEFAULT_MODEL",
    "DyLoRAConfig",
    "DyLoRAMoE",
    "DyLoRAOutput",
    "DynamicHybridRouter",
    "EventLog",
    "ExpertConfig",
    "ExpertManager",
    "ExpertMixture",
    "NoveltyConfig",
    "NoveltyDetector",
    "NoveltyResult",
    "RouterConfig",
    "RouterOutput",
    "SkillLibrary",
    "load_backbone",
]
__version__ = "0.1.0"
