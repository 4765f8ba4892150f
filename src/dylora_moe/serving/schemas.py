"""Request bodies (pydantic) and their parsing with clear 4xx errors.

Bodies are read and parsed here rather than by FastAPI so that every problem, from malformed JSON to a
wrong field type, is answered in OpenAI's error shape naming the field. Fields OpenAI clients may send
that this server does not use (``user``, penalties, ``seed``...) are accepted and ignored; fields whose
meaning it cannot honour (``logprobs``, ``echo``, tools and structured output) are refused.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .errors import APIError, validation_message

Number = StrictInt | StrictFloat
MAX_CHOICES = 16  # n: every choice is a sequence of the batch


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    logprobs: object = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop takes at most 4 sequences, got {len(stops)}", param="stop")
        return tuple(s for s in stops if s)

    def check_unsupported(self) -> None:
        if not 1 <= self.n <= MAX_CHOICES:
            raise APIError(400, f"n must be between 1 and {MAX_CHOICES} (choices per request), got {self.n}",
                           param="n", code="invalid_value")
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported by this server; leave logprobs unset", param="logprobs")


class CompletionRequest(_Generation):
    prompt: StrictStr | list[StrictStr]
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def text(self) -> str:
        self.check_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported by this server; leave it false", param="echo")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this server", param="suffix")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise APIError(400, f"prompt must be one string (or a list of exactly one), got a list of "
                                    f"{len(self.prompt)}: send one request per prompt", param="prompt")
            return self.prompt[0]
        return self.prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    tools: object = None
    tool_choice: object = None
    functions: object = None
    function_call: object = None
    response_format: object = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(400, f"{name} (function calling) is not supported by this server: the experts "
                                    "were not trained to call tools; leave it unset", param=name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise APIError(400, f"{name} is not supported by this server; leave it unset", param=name)
        kind = self.response_format.get("type") if isinstance(self.response_format, dict) else self.response_format
        if kind not in (None, "text"):
            raise APIError(400, f"response_format {kind!r} is not supported by this server (no constrained "
                                "decoding): leave it unset or use {\"type\": \"text\"}", param="response_format")


class UploadExample(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr = ""
    response: StrictStr


class SkillUpload(BaseModel):
    """``POST /skills`` as JSON; ``chat`` renders prompts with the model's chat template (as training does)."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    examples: list[UploadExample]
    chat: StrictBool = True


SKILL_NAME = re.compile(r"^[\w.\- ]{1,64}\Z")  # \Z: "$" would let a trailing newline through


def parse_json(raw: bytes) -> object:
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as err:
        raise APIError(400, f"the request body is not UTF-8 text: {err}", code="invalid_json") from err
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
                       code="invalid_json") from err
    except RecursionError as err:  # the decoder recurses once per nesting level: "[[[[..." exhausts the stack
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from err
    except ValueError as err:  # e.g. an integer longer than Python's int conversion limit (4300 digits)
        raise APIError(400, f"the request body holds a value this server cannot read: {str(err)[:120]}",
                       code="invalid_json") from err
    try:
        where = _lone_surrogate(data)
    except RecursionError as err:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from err
    if where is not None:  # "\ud800" decodes to a lone surrogate, which no tokenizer or file can take
        raise APIError(400, f"{where or 'the request body'} holds a lone UTF-16 surrogate escape (e.g. \\ud800): "
                            "send valid Unicode text", param=where.split(".")[0] if where else None,
                       code="invalid_json")
    return data


def _lone_surrogate(value: object, path: str = "") -> str | None:
    """The dotted path of the first string (key or value) holding a lone surrogate; ``None`` when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        here = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and _lone_surrogate(key) is not None:
            return here
        found = _lone_surrogate(item, here)
        if found is not None:
            return found
    return None


def parse(model: type[BaseModel], raw: bytes | object) -> BaseModel:
    """Validate a body (raw bytes or already decoded JSON) against ``model``; errors become 400s."""
    data = parse_json(raw) if isinstance(raw, bytes) else raw
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(err.errors())
        raise APIError(400, message, param=param, code="invalid_value") from err
