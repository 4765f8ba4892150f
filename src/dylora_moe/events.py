"""Structured events: expert creation, routing strategy changes, recognised skills, errors.

Every component that does something an operator should see emits an event through the system's
``EventLog``. Events go to ``logging`` (logger ``dylora_moe.events``, message is one JSON object), are kept
in memory for inspection, and are appended to a JSON-lines file when one is attached.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("dylora_moe.events")

EXPERT_CREATED = "expert_created"
EXPERT_DELETED = "expert_deleted"
EXPERT_MATURED = "expert_matured"
ROUTING_STRATEGY_CHANGED = "routing_strategy_changed"
SKILL_RECOGNISED = "skill_recognised"
ERROR = "error"


class EventLog:
    """Collects events; ``subscribe`` adds sinks (metrics exporters, trackers)."""

    def __init__(self, path: str | Path | None = None, keep: int = 10_000) -> None:
        self.records: list[dict[str, Any]] = []
        self.keep = keep
        self.path = Path(path) if path is not None else None
        self._sinks: list[Callable[[dict[str, Any]], None]] = []

    def attach_file(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def subscribe(self, sink: Callable[[dict[str, Any]], None]) -> None:
        self._sinks.append(sink)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": time.time(), "event": event, **fields}
        self.records.append(record)
        del self.records[: -self.keep]
        line = json.dumps(record, default=str)
        logger.log(logging.ERROR if event == ERROR else logging.INFO, line)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        for sink in self._sinks:
            sink(record)
        return record

    def of(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == event]
