"""The generation worker: one thread owns the model (and its tokenizer) and answers requests in batches.

Requests wait in a bounded queue (full: 429 with ``Retry-After``). With continuous batching (the default) the
worker keeps one running batch: at every decode step the requests that have arrived join it (up to
``max_batch`` sequences), and a sequence leaves as soon as it is done, streaming or not (``continuous.py``).
With static batching it takes what has arrived and runs it to the end (``static.py``). Either way each prompt
is validated alone, every sequence is routed on its own prompt and keeps that routing for its new tokens, so
batching never changes which experts a request gets, and a client that goes away stops its sequence at the
next token. A running batch keeps the system it started on: after a swap to a newly trained system, requests
wait until that batch has drained and then run on the new one (static batching holds the system's lock for
each batch instead). Async endpoints only await futures and queues, so the event loop is never blocked.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future

import torch

from ..model import DyLoRAMoE
from .config import ServerConfig
from .continuous import RunningBatch
from .errors import APIError
from .metrics import Metrics
from .requests import Generation, GenerationRequest
from .static import fitting, generate_static
from .system import ServedSystem

__all__ = ["Engine", "Generation", "GenerationRequest"]

logger = logging.getLogger("dylora_moe.serving")


class Engine:
    def __init__(self, system: ServedSystem, config: ServerConfig, metrics: Metrics) -> None:
        self.system = system
        self.config = config
        self.metrics = metrics
        self._queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=config.max_queue)
        self._closed = threading.Event()
        self._submitting = threading.Lock()  # a request is queued before close starts, or refused
        self._held = 0  # decode steps run while requests waited to join (continuous batching)
        self._credit = 0.0  # seconds of prefill the running rows allow now (ServerConfig.prefill_share)
        loop = self._continuous if config.batching == "continuous" else self._static
        self._thread = threading.Thread(target=loop, name="dylora-generate", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Future:
        with self._submitting:
            return self._submit(request)

    def _submit(self, request: GenerationRequest) -> Future:
        if self._closed.is_set():
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            try:
                if not self._drop_abandoned():
                    raise queue.Full from None
                self._queue.put_nowait(request)
            except queue.Full:
                raise APIError(429, f"the server has {self.config.max_queue} requests waiting for generation: retry "
                                    "in a moment", code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return request.future

    def _drop_abandoned(self) -> int:
        """Take the requests whose clients went away while they waited (their futures cancelled) out of a full
        queue, so that they do not turn live clients away with 429s; returns how many were dropped."""
        with self._queue.mutex:
            waiting = self._queue.queue
            kept = [r for r in waiting if not r.future.cancelled()]
            dropped = len(waiting) - len(kept)
            if dropped:
                waiting.clear()
                waiting.extend(kept)
                self._queue.unfinished_tasks -= dropped
                self._queue.not_full.notify(dropped)
        return dropped

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests: the running batch ends at its next step, and every request not done gets a
        503, those still queued too (the worker, if it is still busy after ``timeout``, answers its own)."""
        with self._submitting:
            self._closed.set()
        self._thread.join(timeout)
        self._refuse_queued()

    def _refuse_queued(self, *taken: GenerationRequest) -> None:
        """Answer ``taken`` and the requests still in the queue with 503 (the server is shutting down)."""
        gone = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        while True:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                break
            if r.future.set_running_or_notify_cancel():  # not if its client went away meanwhile
                r.future.set_exception(gone)
        for r in taken:
            if not r.future.done():
                r.future.set_exception(gone)

    # ------------------------------------------------------------------ continuous batching
    def _continuous(self) -> None:
        batch: RunningBatch | None = None
        waiting: deque[GenerationRequest] = deque()  # taken from the queue, not running yet
        while not self._closed.is_set():
            if (batch is None or not batch.size) and not waiting:
                try:
                    waiting.append(self._queue.get(timeout=0.1))
                except queue.Empty:
                    continue
            self._take(waiting, batch.size if batch is not None else 0)
            admitting, before = True, len(waiting)
            try:
                batch = self._admit(batch, waiting)
                admitting = False
                if batch.size:
                    start = time.perf_counter()
                    batch.step()
                    self._earn(time.perf_counter() - start)
                    self._held = self._held + 1 if waiting else 0
            except Exception as err:  # a failure of one batch must not stop the worker
                logger.exception("generation failed", extra={"fields": {"event": "error", "kind": type(err).__name__}})
                if batch is not None:
                    batch.fail(err)
                batch = None
                # admitting failed before taking a request: trying again at once would fail the same way, in a
                # loop, so the requests waiting to join get the error
                if admitting and len(waiting) == before:
                    while waiting:
                        r = waiting.popleft()
                        if r.future.set_running_or_notify_cancel():
                            r.future.set_exception(err)
        self._refuse_queued(*waiting, *(row.request for row in (batch.rows if batch is not None else [])))

    def _take(self, waiting: deque[GenerationRequest], running: int) -> None:
        """Move arrived requests from the queue while the batch has room for them (the rest stay queued, so the
        queue's bound still refuses what the server cannot take soon)."""
        while running + sum(r.n for r in waiting) < self.config.max_batch:
            try:
                waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.metrics.queue_depth.set(self._queue.qsize())

    def _admit(self, batch: RunningBatch | None, waiting: deque[GenerationRequest]) -> RunningBatch:
        """Let waiting requests join the running batch (a new one when it has drained and the system changed)."""
        with self.system.lock:
            model = self.system.model
        if batch is None or (not batch.size and batch.model is not model):
            batch = RunningBatch(model, self.config, self.metrics)
        if batch.model is not model:  # a swapped system: the old batch drains first
            return batch
        joining: list[GenerationRequest] = []
        free = self.config.max_batch - batch.size
        if batch.size and not self._due(waiting, free):
            return batch
        decoding = batch.size > 0
        self._held = 0
        # a request with more choices than max_batch runs when the batch is empty, rather than never
        taken: list[GenerationRequest] = []
        try:
            while waiting and (waiting[0].n <= free or not (batch.size or joining)):
                r = waiting.popleft()
                taken.append(r)
                if r.future.set_running_or_notify_cancel() and self._prepare(model, r):
                    joining.append(r)
                    free -= r.n
            if joining:
                start = time.perf_counter()
                batch.join(joining)
                # a pass that stalled running rows spends their budget; the first rows of an idle batch stall none
                self._credit = self._credit - (time.perf_counter() - start) if decoding else 0.0
        except Exception as err:  # the rows already running and the requests still waiting: the caller's
            for r in taken:
                if not r.future.done():
                    r.future.set_exception(err)
            raise
        return batch

    def _earn(self, seconds: float) -> None:
        """A decode step of ``seconds`` earns ``share / (1 - share)`` of them for prefill passes, saved up for at
        most ``join_wait_steps`` such steps (``ServerConfig.prefill_share``)."""
        share = self.config.prefill_share
        if share < 1:
            rate = share / (1 - share)
            self._credit = min(self._credit + rate * seconds, rate * seconds * max(1, self.config.join_wait_steps))

    def _due(self, waiting: deque[GenerationRequest], free: int) -> bool:
        """Whether waiting requests join the running batch now: enough of them to fill a prefill pass (or the
        batch's room), or the oldest has waited ``join_wait_steps`` decode steps (``ServerConfig.join_batch``),
        and the running rows' prefill budget is not spent (``ServerConfig.prefill_share``)."""
        if not waiting or free <= 0:
            return False
        if self.config.prefill_share < 1 and self._credit < 0:
            return False
        return sum(r.n for r in waiting) >= min(free, self.config.join_batch) or \
            self._held >= self.config.join_wait_steps

    # ------------------------------------------------------------------ static batching
    def _static(self) -> None:
        while not self._closed.is_set():
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < self.config.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self.metrics.queue_depth.set(self._queue.qsize())
            try:
                self._serve(batch)
            except Exception as err:  # a failure of one batch must not stop the worker
                logger.exception("generation failed", extra={"fields": {"event": "error", "kind": type(err).__name__}})
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(err)
        self._refuse_queued()

    def _serve(self, batch: list[GenerationRequest]) -> None:
        """Static batching of ``batch``: validated, grouped by sampling settings (a streaming request alone),
        split to fit the model's positions and ``max_batch`` sequences, each part run to its end."""
        # A request whose future was cancelled (its client went away while it waited) is dropped; the others
        # are marked running, so a late cancel can no longer make setting their result fail.
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
        with self.system.lock, torch.no_grad():
            model = self.system.model
            ready = [r for r in batch if self._prepare(model, r)]
            groups: dict[object, list[GenerationRequest]] = {}
            for r in ready:
                key = id(r) if r.on_event is not None else r.sampling
                groups.setdefault(key, []).append(r)
            context = getattr(model.backbone.config, "max_position_embeddings", None) or 1 << 30
            for group in groups.values():
                for part in fitting(group, context, self.config.max_batch):
                    generate_static(model, part, self.config, self.metrics)

    # ------------------------------------------------------------------ both
    def _prepare(self, model: DyLoRAMoE, r: GenerationRequest) -> bool:
        """Tokenise and check the prompt against the limits; a bad one gets its 400 and is dropped."""
        tok = model.tokenizer
        try:
            ids = tok(r.prompt, add_special_tokens=False)["input_ids"]
        except Exception as err:  # e.g. a lone surrogate ("\\ud800" in the JSON): valid JSON, not Unicode text
            r.future.set_exception(APIError(400, f"{r.param} could not be tokenised ({type(err).__name__}): send "
                                                 "valid Unicode text", param=r.param, code="invalid_text"))
            return False
        if not r.chat and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
            ids = [tok.bos_token_id, *ids]
        context = getattr(model.backbone.config, "max_position_embeddings", None) or 1 << 30
        limit = min(self.config.max_prompt_tokens, context - r.max_tokens)
        error = None
        if not ids:
            error = APIError(400, f"{r.param} is empty: give at least one token of text", param=r.param)
        elif r.max_tokens >= context:
            error = APIError(400, f"max_tokens={r.max_tokens} does not fit the model's context of {context} tokens",
                             param="max_tokens", code="context_length_exceeded")
        elif len(ids) > limit:
            error = APIError(400, f"{r.param} has {len(ids)} tokens; with max_tokens={r.max_tokens} it may have at "
                                  f"most {limit} (context {context} tokens, prompt cap {self.config.max_prompt_tokens}"
                                  "): shorten it or lower max_tokens", param=r.param, code="context_length_exceeded")
        if error is not None:
            r.future.set_exception(error)
            return False
        r.prompt_ids = ids
        return True
