"""The running batch's KV cache: a ``DynamicCache`` whose layers keep their keys and values in buffers with room
to grow, so a decode step writes its new column in place.

transformers' ``DynamicLayer`` concatenates every new token onto its keys and values, copying the whole cache of
every layer at every step: at 16 rows of about 200 tokens on SmolLM2 that copy was 29% of a decode step on one
CPU thread (``torch.cat`` in a profile of ``RunningBatch.step``). Here ``keys``/``values`` are views
``buffer[:, :, start:end]`` of a buffer with free columns after ``end``; a step writes column ``end`` and
widens the view, and the buffer is reallocated (with as much room again as it holds, so copies are amortised)
only when it is full. What the running batch does between steps keeps the buffers too: ``batch_select_indices``
(rows leaving) indexes the buffer, ``trim`` (left columns that became padding in every row) moves ``start``,
and ``splice`` (rows joining) writes both batches into one new buffer. Anything else that assigns ``keys`` is
still correct: the next ``update`` sees the view was replaced and adopts the new tensor into a fresh buffer.

Axis key: B rows, H key/value heads, W cache width, D head size, T new columns.
"""

from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

__all__ = ["GrowingCache", "GrowingLayer"]

MIN_ROOM = 32  # free columns a new buffer gets at least


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values [B, H, W, D] are views of buffers [B, H, capacity, D]."""

    # No buffers until the first update (a layer the model never updates, e.g. under KV sharing, stays so).
    # After ``reset`` the keys are no longer this layer's views, so the next update starts new buffers.
    _buffers: tuple[Tensor, Tensor] | None = None
    _views: tuple[Tensor | None, Tensor | None] = (None, None)
    _start = _end = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        if not self._owns() or self._end + t > self._buffers[0].shape[-2]:
            self._reserve(key_states, value_states, t)
        kbuf, vbuf = self._buffers
        kbuf[:, :, self._end:self._end + t] = key_states
        vbuf[:, :, self._end:self._end + t] = value_states
        self._end += t
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep rows ``indices`` (a copy of the buffer's rows, room included)."""
        if not self._owns():
            super().batch_select_indices(indices)
            return
        kbuf, vbuf = self._buffers
        self._buffers = (kbuf[indices], vbuf[indices])
        self._view()

    def trim(self, columns: int) -> None:
        """Drop the ``columns`` oldest (leftmost) columns of every row, without copying."""
        if not self._owns():
            self.keys, self.values = self.keys[:, :, columns:], self.values[:, :, columns:]
            return
        self._start += columns
        self._view()

    def splice(self, other: DynamicLayer, width: int) -> None:
        """Append ``other``'s rows below this layer's, both right-aligned at ``width`` columns (zeros on the left
        of the narrower), into one new buffer with room to grow."""
        keys, values = self.keys, self.values
        b, h, _, d = keys.shape
        rows = b + other.keys.shape[0]
        kbuf = keys.new_zeros(rows, h, width + room(width), d)
        vbuf = values.new_zeros(rows, h, width + room(width), values.shape[-1])
        for buf, mine, theirs in ((kbuf, keys, other.keys), (vbuf, values, other.values)):
            buf[:b, :, width - mine.shape[-2]:width] = mine
            buf[b:, :, width - theirs.shape[-2]:width] = theirs
        self._buffers, self._start, self._end = (kbuf, vbuf), 0, width
        self._view()

    # ------------------------------------------------------------------ internals
    def _owns(self) -> bool:
        """Whether ``keys``/``values`` are still the views this layer made (nothing assigned them since)."""
        return self._buffers is not None and self.keys is self._views[0] and self.values is self._views[1]

    def _reserve(self, key_states: Tensor, value_states: Tensor, t: int) -> None:
        """New buffers holding the current keys/values (none at the first update) with room for ``t`` more
        columns and as many again."""
        width = self.keys.shape[-2] if self.keys.dim() == 4 else 0  # the first update finds an empty tensor
        b, h, _, d = key_states.shape
        capacity = width + t + room(width + t)
        kbuf = key_states.new_empty(b, h, capacity, d)
        vbuf = value_states.new_empty(b, h, capacity, value_states.shape[-1])
        if width:
            kbuf[:, :, :width], vbuf[:, :, :width] = self.keys, self.values
        self._buffers, self._start, self._end = (kbuf, vbuf), 0, width

    def _view(self) -> None:
        kbuf, vbuf = self._buffers
        self.keys, self.values = kbuf[:, :, self._start:self._end], vbuf[:, :, self._start:self._end]
        self._views = (self.keys, self.values)


def room(width: int) -> int:
    """Free columns for a buffer holding ``width``: as many again (amortised growth), at least ``MIN_ROOM``."""
    return max(MIN_ROOM, width)


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of ``GrowingLayer``s, one per decoder layer, created as the model first updates them."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
