"""The two-phase learning-rate schedule: seeding at a high rate, then consolidation at a low one.

One ``LambdaLR`` drives both phases; each parameter group has its own factor, so the gate can keep its
own constant rate while the expert moves from the seeding to the consolidation rate.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def two_phase_factor(seed_steps: int, seed_lr: float, consolidation_lr: float):
    """Multiplier of a group whose base rate is ``seed_lr``: 1 during seeding, then the consolidation ratio."""
    ratio = consolidation_lr / seed_lr

    def factor(step: int) -> float:
        return 1.0 if step < seed_steps else ratio

    return factor


def two_phase_scheduler(optimizer: Optimizer, *, seed_steps: int, seed_lr: float, consolidation_lr: float,
                        constant_groups: tuple[int, ...] = ()) -> LambdaLR:
    """Expert groups follow the two phases; groups listed in ``constant_groups`` keep their base rate."""
    phased = two_phase_factor(seed_steps, seed_lr, consolidation_lr)
    factors = [(lambda _: 1.0) if i in constant_groups else phased for i in range(len(optimizer.param_groups))]
    return LambdaLR(optimizer, factors)
