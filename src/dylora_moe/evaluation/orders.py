"""One stream in several orders: seeded permutations of its steps, and each method's metrics over the orders.

A stream's order decides which skills are old when a new one arrives, so one order is one sample of what a
method does. ``permutation`` draws the orders (order 0 is the file's own; every later one is a seeded shuffle
in which each skill's steps keep their file order, so a recurrence still comes after its skill's first
appearance), ``permuted`` applies one to a stream, and ``aggregate`` reduces the per-order metrics of
``benchmark.results_from`` to their mean and spread (sample standard deviation, minimum, maximum).
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Sequence

from ..data.stream import StreamSpec

# The per-order figures reported with their mean and spread, in ``results.json`` method entries' names (novelty
# precision and recall flattened out of their ``novelty`` dict).
ORDER_METRICS = ("acc", "bwt", "forgetting", "fwt", "max_transient_forgetting", "routing_accuracy",
                 "novelty_precision", "novelty_recall", "experts", "trainable_params", "train_seconds",
                 "stream_seconds")


def permutation(labels: Sequence[str], order: int) -> list[int]:
    """Step indices in the order ``order`` runs them: the identity for order 0; otherwise a uniform draw (seeded
    by ``order``) among the orders in which the steps of each label keep their relative file order. Shuffling
    every step and then handing each label's drawn positions back to its steps in file order gives every such
    order the same probability."""
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    steps = list(range(len(labels)))
    if order == 0:
        return steps
    random.Random(order).shuffle(steps)
    by_label: dict[str, list[int]] = {}
    for step in range(len(labels)):
        by_label.setdefault(labels[step], []).append(step)
    positions: dict[str, list[int]] = {}
    for position, step in enumerate(steps):
        positions.setdefault(labels[step], []).append(position)
    result = [0] * len(labels)
    for label, members in by_label.items():
        for position, step in zip(positions[label], members, strict=True):
            result[position] = step
    return result


def permuted(stream: StreamSpec, order: int) -> StreamSpec:
    """``stream`` with its steps in order ``order`` (named ``NAME-orderK`` unless it is order 0)."""
    if order == 0:
        return stream
    if stream.chunks:
        raise ValueError(f"stream {stream.name!r} is mixed (chunks): its orders are its chunks', not its skills'")
    steps = permutation([s.label for s in stream.skills], order)
    return dataclasses.replace(stream, name=f"{stream.name}-order{order}", skills=[stream.skills[i] for i in steps])


def order_metrics(entry: dict) -> dict[str, float | None]:
    """The ``ORDER_METRICS`` of one method entry of ``results.json`` (``None`` where not measured)."""
    novelty = entry.get("novelty") or {}
    flat = {**entry, "novelty_precision": novelty.get("precision"), "novelty_recall": novelty.get("recall")}
    return {name: flat.get(name) for name in ORDER_METRICS}


def spread(values: Sequence[float | None]) -> dict[str, float | int] | None:
    """Mean, sample standard deviation (0 for one value), minimum, maximum and count of the measured values;
    ``None`` when none was measured. A non-finite value (a diverged order) makes every statistic NaN, so that
    it shows instead of being averaged away or stopping the aggregation."""
    known = [float(v) for v in values if v is not None]
    if not known:
        return None
    if not all(math.isfinite(v) for v in known):
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": len(known)}
    return {"mean": statistics.fmean(known), "std": statistics.stdev(known) if len(known) > 1 else 0.0,
            "min": min(known), "max": max(known), "n": len(known)}


def aggregate(per_order: Sequence[dict[str, dict]]) -> dict[str, dict[str, dict | None]]:
    """Per method, per ``ORDER_METRICS`` name: the ``spread`` over the orders that ran the method.

    ``per_order[k]`` is order k's ``results.json`` ``methods`` mapping (method -> entry)."""
    names = list(dict.fromkeys(name for methods in per_order for name in methods))
    out = {}
    for name in names:
        rows = [order_metrics(methods[name]) for methods in per_order if name in methods]
        out[name] = {metric: spread([row[metric] for row in rows]) for metric in ORDER_METRICS}
    return out
