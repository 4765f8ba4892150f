"""Server options: limits on what a request may ask for, batching, and the size of live skill training."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ..config import check_types
from ..training.config import TrainingConfig

API_KEY_ENV = "DYLORA_API_KEY"
BATCHING = ("continuous", "static")


@dataclass
class ServerConfig:
    """How ``dylora serve`` answers requests and learns uploaded skills.

    Args:
        model_name: the id clients put in ``model`` (``/v1/models`` lists it).
        api_key: key that mutating endpoints (``POST /skills``) require as ``Authorization: Bearer KEY``;
            ``None`` reads ``DYLORA_API_KEY``; with neither, those endpoints are refused.
        max_body_bytes: largest request body of a completion request.
        body_timeout: seconds a client has to send its whole request body; a slower one gets 408.
        max_upload_bytes: largest skill upload body.
        max_tokens_cap: largest ``max_tokens`` a request may ask for. default_max_tokens: when it asks none.
        max_prompt_tokens: longest prompt (also capped by the model's context minus ``max_tokens``).
        max_batch: sequences generated together (each still routed on its own prompt); a request with ``n``
            choices takes ``n`` of them.
        batching: ``continuous`` (a request joins the running batch at the next decode step and leaves it when
            done, streaming or not) or ``static`` (the requests that arrived together run as one batch to its
            end, a streaming request alone): the older scheme, kept to compare against.
        join_batch, join_wait_steps: continuous batching prefills joining requests together: while other rows
            are decoding, arrived requests wait until ``join_batch`` sequences are waiting (or as many as the
            batch has room for) or the oldest has waited ``join_wait_steps`` decode steps, then join in one
            prefill pass. A pass has a fixed cost (every weight is read once), and every running row waits for
            it, so fewer, fuller passes keep the long requests' latency down; an idle batch admits at once.
            ``join_wait_steps=0`` admits at every step.
        prefill_share: continuous batching: the largest share of the worker's time spent prefilling joiners
            while other rows decode. Every prompt that joins stalls every running row, so under steady traffic
            a long request pays for the prompts of all the short ones that come and go during its lifetime;
            a time budget (each decode step earns ``share / (1 - share)`` of its seconds for prefill, a pass
            spends what it took, joiners wait while the budget is spent) bounds that cost at
            ``1 / (1 - share)`` times its own decoding, on any hardware and model. 0.5, the default, lets
            prefill take as much of the worker as decoding, no more (README, "Serving"); 1.0: no limit.
        routing_top, routing_min_weight: the routing a response reports lists at most ``routing_top`` experts,
            those of weight at least ``routing_min_weight`` (always the heaviest one); dense routing gives every
            expert some weight, and the rest is summed up as ``omitted_experts`` / ``omitted_weight``.
        max_queue: requests waiting for generation; beyond it a request is refused with 429 and ``Retry-After``.
        max_upload_examples, max_example_chars: caps on a skill upload.
        max_pending_jobs: skill jobs queued or running at once; more are refused with 429.
        repetition_penalty, no_repeat_ngram_size: a decoding guard against greedy loops, applied to every
            request (``transformers``' CTRL-style penalty on tokens already in the sequence, and a ban on
            repeating any n-gram of that size); 1.0 and 0 turn it off, the default: the experts themselves are
            trained not to loop (see ``TrainingConfig.kl_weight``), and a penalty also hurts code, which repeats
            tokens legitimately.
        training: how an uploaded skill is learned (steps, batch, sequence length); small by default.
    """

    model_name: str = "dylora-moe"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0
    max_upload_bytes: int = 8 << 20
    max_tokens_cap: int = 512
    default_max_tokens: int = 64
    max_prompt_tokens: int = 4096
    max_batch: int = 8
    batching: str = "continuous"
    join_batch: int = 4
    join_wait_steps: int = 4
    prefill_share: float = 0.5
    routing_top: int = 4
    routing_min_weight: float = 0.01
    max_queue: int = 64
    max_upload_examples: int = 2000
    max_example_chars: int = 20_000
    max_pending_jobs: int = 4
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        seed_steps=8, consolidation_steps=40, batch_size=4, max_length=256, router_fit_steps=200,
        report_to=["none"], logging_steps=4))

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        check_types(self)  # a serve config file's "8" becomes 8; "eight" is refused by name
        for name in ("max_body_bytes", "max_upload_bytes", "max_tokens_cap", "default_max_tokens",
                     "max_prompt_tokens", "max_batch", "max_upload_examples", "max_example_chars",
                     "max_pending_jobs", "max_queue", "routing_top", "join_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.join_wait_steps < 0:
            raise ValueError(f"join_wait_steps must be >= 0, got {self.join_wait_steps}")
        if not 0 < self.prefill_share <= 1:
            raise ValueError(f"prefill_share must be in (0, 1], got {self.prefill_share}")
        if not self.body_timeout > 0:
            raise ValueError(f"body_timeout must be > 0 seconds, got {self.body_timeout}")
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if not 0 <= self.routing_min_weight <= 1:
            raise ValueError(f"routing_min_weight must be in [0, 1], got {self.routing_min_weight}")
        if not 0 < self.repetition_penalty < math.inf or self.no_repeat_ngram_size < 0:  # "not": NaN fails
            raise ValueError(f"repetition_penalty must be a finite number > 0 and no_repeat_ngram_size >= 0, got "
                             f"{self.repetition_penalty} and {self.no_repeat_ngram_size}")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens_cap="
                             f"{self.max_tokens_cap}: lower it or raise the cap")
        if isinstance(self.training, dict):
            self.training = TrainingConfig.from_dict({"report_to": ["none"], **self.training})
