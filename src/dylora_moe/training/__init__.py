"""Training: the two-phase schedule, the Trainer subclass, gate rehearsal and the continual loop."""

from .config import TrainingConfig
from .loop import ContinualLearner, StepRecord
from .rehearsal import RoutingMemory
from .schedule import two_phase_scheduler
from .trainer import DyLoRATrainer

__all__ = ["ContinualLearner", "DyLoRATrainer", "RoutingMemory", "StepRecord", "TrainingConfig", "two_phase_scheduler"]
