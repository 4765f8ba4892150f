"""What the generation worker is asked for and what it answers: a request, its choices, its result."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

# Below this a temperature is greedy decoding: logits divided by it overflow to inf and sampling fails.
MIN_TEMPERATURE = 1e-4


@dataclass
class GenerationRequest:
    """One prompt to complete with ``n`` choices. ``on_event(kind, payload)`` (streaming) receives
    ``("routing", dict)`` before the first token and ``("delta", (choice index, text))`` as text arrives; the
    result always comes through ``future``."""

    prompt: str
    max_tokens: int
    temperature: float | None = None  # None, 0 or below MIN_TEMPERATURE: greedy
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    chat: bool = False  # the prompt is a rendered chat template (no BOS added)
    param: str = "prompt"  # the request field errors about the prompt name
    n: int = 1
    on_event: Callable[[str, object], None] | None = None
    future: Future = field(default_factory=Future)
    cancelled: bool = False  # set when the client goes away: generation stops at the next token
    prompt_ids: list[int] = field(default_factory=list)
    routing: dict | None = None

    @property
    def sampling(self) -> tuple[float, float] | None:
        if not self.temperature or self.temperature < MIN_TEMPERATURE:
            return None
        return float(self.temperature), float(self.top_p or 1.0)


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    tokens: int  # new tokens kept


@dataclass
class Generation:
    choices: list[Choice]
    prompt_tokens: int
    routing: dict
    seconds: float

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def completion_tokens(self) -> int:  # every choice counts, as OpenAI bills them
        return sum(c.tokens for c in self.choices)
