"""The generation worker: one thread owns the model (and its tokenizer) and answers requests in batches.

Requests wait in a queue; the worker takes what has arrived (up to ``max_batch``), validates each prompt,
and generates compatible ones together (same sampling settings; a streaming request runs alone). Every
sequence of a batch is routed on its own prompt (``DyLoRAMoE.generate`` pins that routing for the new
tokens), so batching never changes which experts a request gets. The worker holds the system's lock for
the whole batch: a swap to a newly trained system waits for the batch and the next batch runs on the new
system. Async endpoints only await futures and queues, so the event loop is never blocked.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..model import DyLoRAMoE
from .config import ServerConfig
from .errors import APIError
from .metrics import Metrics
from .system import ServedSystem

logger = logging.getLogger("dylora_moe.serving")

# Below this a temperature is greedy decoding: logits divided by it overflow to inf and sampling fails.
MIN_TEMPERATURE = 1e-4


@dataclass
class GenerationRequest:
    """One prompt to complete. ``on_event(kind, payload)`` (streaming) receives ``("routing", dict)`` before
    the first token and ``("delta", text)`` as text arrives; the result always comes through ``future``."""

    prompt: str
    max_tokens: int
    temperature: float | None = None  # None, 0 or below MIN_TEMPERATURE: greedy
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    chat: bool = False  # the prompt is a rendered chat template (no BOS added)
    param: str = "prompt"  # the request field errors about the prompt name
    on_event: Callable[[str, object], None] | None = None
    future: Future = field(default_factory=Future)
    cancelled: bool = False  # set when a streaming client goes away: generation stops early
    prompt_ids: list[int] = field(default_factory=list)
    routing: dict | None = None

    @property
    def sampling(self) -> tuple[float, float] | None:
        if not self.temperature or self.temperature < MIN_TEMPERATURE:
            return None
        return float(self.temperature), float(self.top_p or 1.0)


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    routing: dict
    seconds: float


class Engine:
    def __init__(self, system: ServedSystem, config: ServerConfig, metrics: Metrics) -> None:
        self.system = system
        self.config = config
        self.metrics = metrics
        self._queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=config.max_queue)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dylora-generate", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Future:
        if self._closed.is_set():
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise APIError(429, f"the server has {self.config.max_queue} requests waiting for generation: retry in a "
                                "moment", code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return request.future

    def close(self, timeout: float = 30.0) -> None:
        self._closed.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
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

    def _serve(self, batch: list[GenerationRequest]) -> None:
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
                for part in fitting(group, context):
                    self._generate(model, part)

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

    def _generate(self, model: DyLoRAMoE, group: list[GenerationRequest]) -> None:
        tok = model.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(r.prompt_ids) for r in group)
        input_ids = torch.full((len(group), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, r in enumerate(group):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        input_ids, mask = input_ids.to(model.device), mask.to(model.device)
        for r, info in zip(group, routing_info(model, input_ids, mask), strict=True):
            r.routing = info
            self.metrics.observe_routing(info)
            if r.on_event is not None:
                r.on_event("routing", info)
        stop = _RowStop(width, group, tok)
        streamer = _Deltas(tok, group[0]) if group[0].on_event is not None else None
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=mask,
                             generation_config=generation_config(model, group, self.config),
                             stopping_criteria=StoppingCriteriaList([stop]), streamer=streamer)
        seconds = time.perf_counter() - start
        self.metrics.batch_size.observe(len(group))
        for i, r in enumerate(group):
            new = out[i, width:].tolist()[: stop.stopped_at[i]]
            gen = finish(tok, r, new, eos_ids(model), seconds)
            self.metrics.observe_generation(gen.prompt_tokens, gen.completion_tokens, seconds)
            if streamer is not None and gen.text.startswith(streamer.sent) and len(gen.text) > len(streamer.sent):
                r.on_event("delta", gen.text[len(streamer.sent):])
            r.future.set_result(gen)


def fitting(group: list[GenerationRequest], context: int) -> list[list[GenerationRequest]]:
    """Split a group so that every batch fits the model's positions: a batch runs its longest prompt (left
    padding) plus its largest ``max_tokens``, which each request alone fits but two together may not."""
    parts: list[list[GenerationRequest]] = []
    for r in sorted(group, key=lambda r: len(r.prompt_ids)):
        last = parts[-1] if parts else None
        if last is not None and len(r.prompt_ids) + max(r.max_tokens, *(q.max_tokens for q in last)) <= context:
            last.append(r)
        else:
            parts.append([r])
    return parts


def generation_config(model: DyLoRAMoE, group: list[GenerationRequest], server: ServerConfig | None = None):
    cfg = copy.deepcopy(model.backbone.generation_config)
    if server is not None:  # the optional decoding guard (ServerConfig)
        cfg.repetition_penalty = server.repetition_penalty
        cfg.no_repeat_ngram_size = server.no_repeat_ngram_size
    tok = model.tokenizer
    cfg.max_new_tokens = max(r.max_tokens for r in group)
    cfg.max_length = None
    cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg.eos_token_id = sorted(eos_ids(model)) or None
    sampling = group[0].sampling
    cfg.do_sample = sampling is not None
    cfg.temperature, cfg.top_p, cfg.top_k = (sampling[0], sampling[1], None) if sampling else (None, None, None)
    cfg.num_beams, cfg.num_return_sequences = 1, 1
    return cfg


def eos_ids(model: DyLoRAMoE) -> set[int]:
    ids = model.backbone.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


def finish(tok, r: GenerationRequest, new: list[int], eos: set[int], seconds: float) -> Generation:
    """Cut the new tokens at end-of-sequence, the request's ``max_tokens`` and its first stop string."""
    kept, reason = [], "length"
    for t in new:
        if t in eos:
            reason = "stop"
            break
        kept.append(t)
        if len(kept) >= r.max_tokens:
            break
    text = tok.decode(kept, skip_special_tokens=True)
    cut = first_stop(text, r.stop)
    if cut is not None:
        text, reason = text[:cut], "stop"
    return Generation(text, reason, len(r.prompt_ids), len(kept), r.routing or {}, seconds)


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def routing_info(model: DyLoRAMoE, input_ids: torch.Tensor, mask: torch.Tensor) -> list[dict]:
    """How each prompt of the batch is routed: ``{"strategy", "granularity", "experts": [{"expert_id",
    "skill", "weight"}]}`` with experts of non-zero weight, heaviest first (per-token routing: the mean weight
    over the prompt's tokens)."""
    granularity = model.config.router.granularity
    if model.num_experts == 0:
        return [{"strategy": "none", "granularity": granularity, "experts": []} for _ in range(input_ids.shape[0])]
    out = model.route(input_ids, mask)
    weights = out.weights.float()  # [B, E] or [B, T, E]
    if weights.dim() == 3:
        m = mask.to(weights.dtype).unsqueeze(-1)  # [B, T, 1]
        weights = (weights * m).sum(1) / m.sum(1).clamp(min=1)  # [B, E]
    skills: dict[int, list[str]] = {}
    for s in model.library.skills.values():
        skills.setdefault(s.expert_id, []).append(s.name)
    ids = model.experts.expert_ids
    rows = []
    for row in weights.cpu().tolist():
        experts = [{"expert_id": ids[c], "skill": ", ".join(skills.get(ids[c], [])) or None, "weight": round(w, 6)}
                   for c, w in enumerate(row) if w > 0]
        experts.sort(key=lambda e: -e["weight"])
        rows.append({"strategy": out.strategy, "granularity": granularity, "experts": experts})
    return rows


class _RowStop(StoppingCriteria):
    """Per-row stop: the row's own ``max_tokens``, its stop strings, or a client that went away. Records how
    many new tokens each row had when it stopped (later positions hold padding)."""

    def __init__(self, start: int, group: list[GenerationRequest], tokenizer) -> None:
        self.start = start
        self.group = group
        self.tokenizer = tokenizer
        self.stopped_at: list[int | None] = [None] * len(group)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        n = input_ids.shape[1] - self.start
        for i, r in enumerate(self.group):
            if self.stopped_at[i] is not None:
                continue
            hit = n >= r.max_tokens or r.cancelled
            if not hit and r.stop:
                text = self.tokenizer.decode(input_ids[i, self.start:], skip_special_tokens=True)
                hit = first_stop(text, r.stop) is not None
            if hit:
                self.stopped_at[i] = n
        return torch.tensor([s is not None for s in self.stopped_at], dtype=torch.bool, device=input_ids.device)


class _Deltas(BaseStreamer):
    """Streams decoded text of a single sequence, holding back what may be the start of a stop string."""

    def __init__(self, tokenizer, request: GenerationRequest) -> None:
        self.tokenizer = tokenizer
        self.request = request
        self.ids: list[int] = []
        self.sent = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        text = safe_prefix(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.request.stop)
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.request.on_event("delta", text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        pass


def safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of ``text`` that is final: before any stop string, without a trailing partial stop string or
    an incomplete multi-byte character."""
    cut = first_stop(text, stops)
    if cut is not None:
        return text[:cut]
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]
