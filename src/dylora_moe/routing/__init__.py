"""The dynamic hybrid router."""

from .router import DENSE, SPARSE, DynamicHybridRouter, RouterOutput

__all__ = ["DENSE", "SPARSE", "DynamicHybridRouter", "RouterOutput"]
