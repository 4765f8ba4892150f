"""Skill uploads for ``POST /skills``: a JSON object or JSON lines, validated, never executed.

    {"name": "sql", "examples": [{"prompt": "...", "response": "..."}, ...], "chat": true}
    POST /skills?name=sql   Content-Type: application/x-ndjson   one {"prompt": ..., "response": ...} per line

The data is only tokenised (for novelty detection and training); any problem is a 4xx naming the example.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from ..data.sources import Example
from .config import ServerConfig
from .errors import APIError, validation_message
from .schemas import SKILL_NAME, SkillUpload, UploadExample, parse, parse_json

JSON_TYPES = ("application/json", "")
JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines", "application/jsonlines")


@dataclass
class Upload:
    name: str
    examples: list[Example]
    chat: bool


def read_upload(raw: bytes, content_type: str, params: dict[str, str], config: ServerConfig) -> Upload:
    kind = content_type.split(";")[0].strip().lower()
    if kind in JSON_TYPES:
        body = parse(SkillUpload, raw)
        upload = Upload(body.name, [Example(e.prompt, e.response) for e in body.examples], body.chat)
    elif kind in JSONL_TYPES:
        if "name" not in params:
            raise APIError(400, "a JSON-lines upload names its skill in the query: POST /skills?name=...",
                           param="name")
        chat = params.get("chat", "true").lower()
        if chat not in ("true", "false"):
            raise APIError(400, f"chat must be true or false, got {params['chat']!r}", param="chat")
        upload = Upload(params["name"], read_lines(raw), chat == "true")
    else:
        raise APIError(415, f"unsupported Content-Type {content_type!r}: send application/json or "
                            f"application/x-ndjson (JSON lines)", code="unsupported_media_type")
    check(upload, config)
    return upload


def read_lines(raw: bytes) -> list[Example]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"the upload is not UTF-8 text: {err}", code="invalid_upload") from err
    examples = []
    # JSON lines are separated by "\n" only: str.splitlines would also split on U+2028 or U+0085 inside a string
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line.encode("utf-8"))
            if not isinstance(record, dict):
                raise APIError(400, f"expected a JSON object, got {type(record).__name__}")
            item = UploadExample.model_validate(record)
        except APIError as err:
            raise APIError(400, f"line {number}: {err.message}", param="examples", code="invalid_upload") from err
        except ValidationError as err:
            message, _ = validation_message(err.errors())
            raise APIError(400, f"line {number}: {message}", param="examples", code="invalid_upload") from err
        examples.append(Example(item.prompt, item.response))
    return examples


def check(upload: Upload, config: ServerConfig) -> None:
    if not SKILL_NAME.match(upload.name):
        raise APIError(400, f"skill name {upload.name[:80]!r} is not allowed: use 1-64 letters, digits, spaces, "
                            "'.', '_' or '-'", param="name", code="invalid_upload")
    if not upload.examples:
        raise APIError(400, "the upload has no examples: give at least one {\"prompt\", \"response\"} pair",
                       param="examples", code="invalid_upload")
    if len(upload.examples) > config.max_upload_examples:
        raise APIError(413, f"the upload has {len(upload.examples)} examples; this server takes at most "
                            f"{config.max_upload_examples} per upload: split it", param="examples",
                       code="upload_too_large")
    for i, e in enumerate(upload.examples):
        if not e.response.strip():
            raise APIError(400, f"example {i}: response is empty; every example needs the text the skill should "
                                "produce", param=f"examples.{i}.response", code="invalid_upload")
        longest = max(len(e.prompt), len(e.response))
        if longest > config.max_example_chars:
            raise APIError(413, f"example {i} has a field of {longest} characters; the limit is "
                                f"{config.max_example_chars}", param=f"examples.{i}", code="upload_too_large")
