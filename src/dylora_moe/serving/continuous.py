"""Continuous (iteration-level) batching: sequences join the running batch at the next decode step and leave it
when done, streaming or not.

A ``RunningBatch`` holds the rows being generated on one model: per row its request, the choice it produces
(a request with ``n`` choices has ``n`` rows), its routing (decided on its own prompt when it joined) and its
KV cache, all rows in one left-padded cache (``kv_cache.GrowingCache``, whose buffers have room to grow, so a
decode step writes its column in place): every row ends at the newest column, shorter rows are padded on the
left and masked. Joining requests are prefilled together in a left-padded pass of their own, in which they are
routed (once: the response reports that same routing), then spliced in: both caches are right-aligned at the
wider one's width in one new buffer. Finished rows are dropped from the cache, and columns that have become
padding in every row are cut. Each row is given its own positions (its count of tokens), so it computes what it
would compute alone, and the cache is never wider than its longest row, which fits the model's positions on its
own (checked before a request joins): absolute position embeddings (GPT-2) never overflow however requests are
combined.

Per decode step: one backbone pass over the [B, 1] newest tokens with the rows' pinned routing (per-token
routing routes each new token in the pass, as ``generate`` does), and one host copy of the chosen tokens (end
of sequence, stop strings and streaming need them).

Axis key: B rows, T prompt tokens, W cache width, V vocabulary, E experts, K experts per row.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import generation
from ..generation import left_pad
from ..model import DyLoRAMoE
from ..routing import RouterOutput
from .config import ServerConfig
from .decoding import choose, eos_ids, finish_choice, first_stop, guard, safe_prefix
from .kv_cache import GrowingCache
from .metrics import Metrics
from .requests import Choice, Generation, GenerationRequest
from .routing_info import describe, summarise


@dataclass
class Row:
    request: GenerationRequest
    index: int  # which of the request's choices
    length: int  # tokens of this row in the cache
    ids: list[int] = field(default_factory=list)  # new tokens kept so far
    sent: str = ""  # text streamed so far
    done: bool = False


@dataclass
class Pending:
    """A running request: its choices as they finish and when it joined."""

    choices: list[Choice | None]
    started: float


class RunningBatch:
    """The rows generated together on ``model``; ``join`` adds requests (already validated, with
    ``prompt_ids``), ``step`` decodes one token for every row and answers the requests that finish."""

    def __init__(self, model: DyLoRAMoE, config: ServerConfig, metrics: Metrics) -> None:
        self.model = model
        self.config = config
        self.metrics = metrics
        self.eos = eos_ids(model)
        self.processors = guard(config)
        self.rows: list[Row] = []
        self.pending: dict[int, Pending] = {}  # id(request) -> its state
        self.cache: GrowingCache | None = None
        self.mask: Tensor | None = None  # [B, W] 1 on each row's tokens
        self.positions: Tensor | None = None  # [B] position of each row's next token
        self.next: Tensor | None = None  # [B] the token each row feeds next
        self.routing: RouterOutput | None = None  # [B, ...] pinned per-row routing (sequence routing)
        self._plan = None  # the mixture plan of ``routing``, built once per change of rows

    @property
    def size(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ joining
    def join(self, requests: list[GenerationRequest]) -> None:
        """Prefill ``requests`` in groups of similar prompt lengths (so padding wastes little of the pass) and
        splice each group into the batch."""
        start = time.perf_counter()
        for group in prefill_groups(requests):
            self._join(group)
        self.metrics.worker_seconds.labels("prefill").inc(time.perf_counter() - start)

    @torch.no_grad()
    def _join(self, requests: list[GenerationRequest]) -> None:
        model, tok = self.model, self.model.tokenizer
        input_ids, mask = left_pad([r.prompt_ids for r in requests], generation.pad_id(tok))
        input_ids, mask = input_ids.to(model.device), mask.to(model.device)
        positions = generation.prompt_positions(mask)  # [b, T] each row counts its own tokens
        cache = GrowingCache()
        with generation.routed(model) as scope:
            logits = model.backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                    cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # [b, V]
            routing = scope.routing if scope is not None else None
        now = time.perf_counter()
        for r, info in zip(requests, describe(model, routing, mask, len(requests)), strict=True):
            self.metrics.observe_routing(info)
            r.routing = summarise(info, self.config.routing_top, self.config.routing_min_weight)
            if r.on_event is not None:
                r.on_event("routing", r.routing)
            self.pending[id(r)] = Pending([None] * r.n, now)
        # n choices: the prompt's row repeated n times (cache, mask, logits and routing alike)
        rep = torch.repeat_interleave(torch.arange(len(requests), device=mask.device),
                                      torch.tensor([r.n for r in requests], device=mask.device))  # [b']
        if len(rep) != len(requests):
            cache.batch_select_indices(rep)
            mask, logits = mask[rep], logits[rep]
            routing = None if routing is None else pick(routing, rep)
        rows = [Row(r, j, len(r.prompt_ids)) for r in requests for j in range(r.n)]
        pinned = routing if routing is not None and routing.weights.dim() == 2 else None
        self._splice(rows, cache, mask, torch.tensor([row.length for row in rows], device=mask.device), pinned)
        first = choose(logits, [row.request for row in rows], self._histories(rows), self.processors)
        self._advance(rows, first, offset=self.size - len(rows))
        self._leave()

    def _splice(self, rows: list[Row], cache: GrowingCache, mask: Tensor, positions: Tensor,
                routing: RouterOutput | None) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.routing = rows, cache, mask, positions, routing
            self.next, self._plan = None, None
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.splice(new, width)  # [B, H, W, D], both right-aligned
        self.mask = torch.cat([left(self.mask, width, 1), left(mask, width, 1)])  # [B, W]
        self.positions = torch.cat([self.positions, positions])
        self.rows = self.rows + rows
        if self.routing is not None and routing is not None:
            self.routing = RouterOutput(*(None if a is None else torch.cat([a, b])
                                          for a, b in zip(self.routing[:4], routing[:4], strict=True)),
                                        routing.strategy)
        self._plan = None

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def step(self) -> None:
        """One new token for every row; rows that finish leave, and their requests are answered when all their
        choices have."""
        model, start = self.model, time.perf_counter()
        self.mask = F.pad(self.mask, (0, 1), value=1)  # [B, W + 1]
        with self._routed():
            logits = model.backbone(input_ids=self.next[:, None], attention_mask=self.mask,
                                    position_ids=self.positions[:, None], cache=self.cache,
                                    use_cache=True).logits[:, -1]  # [B, V]
        self.positions = self.positions + 1
        for row in self.rows:
            row.length += 1
        self.metrics.batch_size.observe(self.size)
        tokens = choose(logits, [row.request for row in self.rows], self._histories(self.rows), self.processors)
        self._advance(self.rows, tokens, offset=0)
        self._leave()
        self.metrics.worker_seconds.labels("decode").inc(time.perf_counter() - start)

    @contextlib.contextmanager
    def _routed(self) -> Iterator[None]:
        model = self.model
        if model.num_experts == 0:
            yield
        elif self.routing is None:  # per-token routing: each new token is routed in the pass
            with generation.routed(model):
                yield
        else:
            with model.routing.scoped(None, pin=True) as scope:
                scope.routing = self.routing
                if self._plan is None:  # which experts are stacked: one host sync per change of rows
                    model.routing.apply(self.routing)
                    self._plan = model.mixture.plan
                model.mixture.set_plan(self._plan)
                yield

    def _histories(self, rows: list[Row]) -> list[list[int]] | None:
        if not self.processors:
            return None
        return [row.request.prompt_ids + row.ids for row in rows]

    def _advance(self, rows: list[Row], tokens: Tensor, offset: int) -> None:
        """Record each row's new token (one host copy for the batch) and decide which rows are done."""
        if self.next is None or offset == 0:
            self.next = tokens
        else:
            self.next = torch.cat([self.next, tokens])
        tok = self.model.tokenizer
        for row, t in zip(rows, tokens.tolist(), strict=True):
            r = row.request
            if t in self.eos:  # kept, so that finish_choice cuts there and reports "stop" rather than "length"
                row.ids.append(t)
                row.done = True
                continue
            row.ids.append(t)
            row.done = r.cancelled or len(row.ids) >= r.max_tokens
            text = None
            if r.stop or r.on_event is not None:
                text = tok.decode(row.ids, skip_special_tokens=True)
                row.done = row.done or first_stop(text, r.stop) is not None
            if r.on_event is not None and not row.done:
                self._stream(row, safe_prefix(text, r.stop))

    def _stream(self, row: Row, text: str) -> None:
        if len(text) > len(row.sent) and text.startswith(row.sent):
            row.request.on_event("delta", (row.index, text[len(row.sent):]))
            row.sent = text

    def _leave(self) -> None:
        if not any(row.done for row in self.rows):
            return
        keep = []
        for i, row in enumerate(self.rows):
            if row.done:
                self._finish(row)
            else:
                keep.append(i)
        self.rows = [self.rows[i] for i in keep]
        self._plan = None
        if not self.rows:
            self.cache = self.mask = self.positions = self.next = self.routing = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.next = self.mask[index], self.positions[index], self.next[index]
        self.routing = None if self.routing is None else pick(self.routing, index)
        cut = self.mask.shape[1] - max(row.length for row in self.rows)  # columns that are padding in every row
        if cut > 0:
            for layer in self.cache.layers:
                layer.trim(cut)
            self.mask = self.mask[:, cut:]

    def _finish(self, row: Row) -> None:
        r = row.request
        choice = finish_choice(self.model.tokenizer, r, row.ids, self.eos)
        if r.on_event is not None:
            self._stream(row, choice.text)
        state = self.pending[id(r)]
        state.choices[row.index] = choice
        if any(c is None for c in state.choices):
            return
        del self.pending[id(r)]
        gen = Generation(state.choices, len(r.prompt_ids), r.routing or {}, time.perf_counter() - state.started)
        self.metrics.observe_generation(gen.prompt_tokens, gen.completion_tokens, gen.seconds)
        if not r.future.done():
            r.future.set_result(gen)

    def fail(self, err: BaseException) -> None:
        """Answer every running request with ``err`` (a failed step leaves the cache in no usable state)."""
        for row in self.rows:
            if not row.request.future.done():
                row.request.future.set_exception(err)
        self.rows, self.pending = [], {}
        self.cache = self.mask = self.positions = self.next = self.routing = None


def prefill_groups(requests: list[GenerationRequest], slack: float = 1.25) -> list[list[GenerationRequest]]:
    """Requests sorted by prompt length, cut into groups whose left-padded pass (count x longest prompt) has at
    most ``slack`` times the tokens of the prompts themselves."""
    groups: list[list[GenerationRequest]] = []
    for r in sorted(requests, key=lambda r: len(r.prompt_ids)):
        group = groups[-1] if groups else None
        n = len(r.prompt_ids)
        if group is not None and n * (len(group) + 1) <= slack * (n + sum(len(q.prompt_ids) for q in group)):
            group.append(r)
        else:
            groups.append([r])
    return groups


def left(x: Tensor, width: int, dim: int) -> Tensor:
    """Pad ``x`` on the left of ``dim`` with zeros to ``width``."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [missing, 0]
    return F.pad(x, pad)


def pick(routing: RouterOutput, index: Tensor) -> RouterOutput:
    """The routing of rows ``index`` of a batch."""
    return RouterOutput(*(None if a is None else a[index] for a in routing[:4]), routing.strategy)
