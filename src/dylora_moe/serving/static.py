"""Static batching, the older scheme (``--batching static``), kept to compare against continuous batching: the
requests that arrived together run as one ``generate`` call to the end of the longest, a streaming request
alone. Requests are grouped by sampling settings, and a group is split so that its longest prompt (left
padding) plus its largest ``max_tokens`` fits the model's positions, in batches of at most ``max_batch``
sequences (``fitting``). The routing each row gets is
read from the generation's own first pass, before its first token is streamed.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .. import generation
from ..generation import left_pad
from ..model import DyLoRAMoE
from .config import ServerConfig
from .decoding import eos_ids, finish_choice, first_stop, safe_prefix
from .metrics import Metrics
from .requests import Generation, GenerationRequest
from .routing_info import describe, summarise


def fitting(group: list[GenerationRequest], context: int, max_rows: int | None = None) -> list[list[GenerationRequest]]:
    """Split a group so that every batch fits the model's positions: a batch runs its longest prompt (left
    padding) plus its largest ``max_tokens``, which each request alone fits but two together may not; and so
    that it has at most ``max_rows`` sequences (a request's ``n`` choices each take one; one with more runs
    alone)."""
    parts: list[list[GenerationRequest]] = []
    for r in sorted(group, key=lambda r: len(r.prompt_ids)):
        last = parts[-1] if parts else None
        if last is not None and len(r.prompt_ids) + max(r.max_tokens, *(q.max_tokens for q in last)) <= context \
                and (max_rows is None or r.n + sum(q.n for q in last) <= max_rows):
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
    cfg.pad_token_id = generation.pad_id(tok)
    cfg.eos_token_id = sorted(eos_ids(model)) or None
    sampling = group[0].sampling
    cfg.do_sample = sampling is not None
    cfg.temperature, cfg.top_p, cfg.top_k = (sampling[0], sampling[1], None) if sampling else (None, None, None)
    cfg.num_beams, cfg.num_return_sequences = 1, 1  # n choices are rows of their own
    return cfg


def generate_static(model: DyLoRAMoE, group: list[GenerationRequest], config: ServerConfig,
                    metrics: Metrics) -> None:
    """One ``generate`` call for ``group`` (validated requests of one sampling setting); answers each request."""
    tok = model.tokenizer
    rows = [(r, j) for r in group for j in range(r.n)]
    input_ids, mask = left_pad([r.prompt_ids for r, _ in rows], generation.pad_id(tok))
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)
    width = input_ids.shape[1]
    start = time.perf_counter()
    with generation.routed(model) as scope:
        announce = _Announce(model, scope, mask, group, config, metrics)
        stop = _RowStop(width, [r for r, _ in rows], tok, announce)
        streamer = _Deltas(tok, rows, announce) if group[0].on_event is not None else None
        out = model.backbone.generate(input_ids=input_ids, attention_mask=mask,
                                      generation_config=generation_config(model, group, config),
                                      stopping_criteria=StoppingCriteriaList([stop]), streamer=streamer)
    announce()
    seconds = time.perf_counter() - start
    metrics.worker_seconds.labels("generate").inc(seconds)
    metrics.batch_size.observe(len(rows))
    eos = eos_ids(model)
    choices: dict[int, list] = {id(r): [] for r in group}
    for i, (r, j) in enumerate(rows):
        choice = finish_choice(tok, r, out[i, width:].tolist()[: stop.stopped_at[i]], eos)
        choices[id(r)].append(choice)
        sent = streamer.sent[i] if streamer is not None else ""
        if streamer is not None and choice.text.startswith(sent) and len(choice.text) > len(sent):
            r.on_event("delta", (j, choice.text[len(sent):]))
    for r in group:
        gen = Generation(choices[id(r)], len(r.prompt_ids), r.routing or {}, seconds)
        metrics.observe_generation(gen.prompt_tokens, gen.completion_tokens, seconds)
        r.future.set_result(gen)


class _Announce:
    """Reads the routing of the generation's first pass (once) and tells each request before its first token."""

    def __init__(self, model: DyLoRAMoE, scope, mask: torch.Tensor, group: list[GenerationRequest],
                 config: ServerConfig, metrics: Metrics) -> None:
        self.model, self.scope, self.mask, self.group = model, scope, mask, group
        self.config, self.metrics = config, metrics
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        routing = self.scope.routing if self.scope is not None else None
        infos = describe(self.model, routing, self.mask, self.mask.shape[0])
        row = 0
        for r in self.group:  # a request's n rows share its prompt and its routing
            info = infos[row]
            row += r.n
            self.metrics.observe_routing(info)
            r.routing = summarise(info, self.config.routing_top, self.config.routing_min_weight)
            if r.on_event is not None:
                r.on_event("routing", r.routing)


class _RowStop(StoppingCriteria):
    """Per-row stop: the row's own ``max_tokens``, its stop strings, or a client that went away. Records how
    many new tokens each row had when it stopped (later positions hold padding)."""

    def __init__(self, start: int, rows: list[GenerationRequest], tokenizer, announce: _Announce) -> None:
        self.start = start
        self.rows = rows
        self.tokenizer = tokenizer
        self.announce = announce
        self.stopped_at: list[int | None] = [None] * len(rows)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.announce()
        n = input_ids.shape[1] - self.start
        new_tokens = None  # read from the device once per step, only when a live row has stop strings
        for i, r in enumerate(self.rows):
            if self.stopped_at[i] is not None:
                continue
            hit = n >= r.max_tokens or r.cancelled
            if not hit and r.stop:
                if new_tokens is None:
                    new_tokens = input_ids[:, self.start:].tolist()
                text = self.tokenizer.decode(new_tokens[i], skip_special_tokens=True)
                hit = first_stop(text, r.stop) is not None
            if hit:
                self.stopped_at[i] = n
        return torch.tensor([s is not None for s in self.stopped_at], dtype=torch.bool, device=input_ids.device)


class _Deltas(BaseStreamer):
    """Streams the decoded text of each row of one request, holding back what may start a stop string."""

    def __init__(self, tokenizer, rows: list[tuple[GenerationRequest, int]], announce: _Announce) -> None:
        self.tokenizer = tokenizer
        self.rows = rows
        self.announce = announce
        self.ids: list[list[int]] = [[] for _ in rows]
        self.sent = [""] * len(rows)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        self.announce()  # the first pass has run: its routing goes out before the first token
        for i, t in enumerate(value.flatten().tolist()):
            r, j = self.rows[i]
            self.ids[i].append(t)
            text = safe_prefix(self.tokenizer.decode(self.ids[i], skip_special_tokens=True), r.stop)
            if len(text) > len(self.sent[i]) and text.startswith(self.sent[i]):
                r.on_event("delta", (j, text[len(self.sent[i]):]))
                self.sent[i] = text

    def end(self) -> None:
        pass
