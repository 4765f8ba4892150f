"""Structured logs: one JSON object per line (spec 6.2).

Fields come from three places: the record itself (time, level, logger, message), ``extra={"fields": {...}}``
given by the caller, and messages that are already a JSON object (the system's ``EventLog`` logs each
event that way: expert creation, routing strategy changes, recognised skills, errors), which are merged in.
"""

from __future__ import annotations

import json
import logging
import sys

LOGGERS = ("dylora_moe", "uvicorn", "uvicorn.error")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        message = record.getMessage()
        parsed = _json_object(message)
        if parsed is not None:
            parsed.pop("time", None)
            out.update(parsed)
        else:
            out["message"] = message
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _json_object(text: str) -> dict | None:
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def configure(level: int = logging.INFO, stream=None) -> logging.Handler:
    """Send the package's and the server's logs to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.getLogger("uvicorn.access").disabled = True  # the server logs each request itself, as JSON
    logging.captureWarnings(True)  # library warnings become JSON lines too
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    return handler


def log(logger: logging.Logger, message: str, level: int = logging.INFO, **fields) -> None:
    logger.log(level, message, extra={"fields": fields})
