"""Structured events: expert creation, routing strategy changes, recognised skills, errors.

Every component that does something an operator should see emits an event through the system's
``EventLog``. Events go to ``logging`` (logger ``dylora_moe.events``, message is one JSON object), are kept
in memory for inspection, and are appended to a JSON-lines file when one is attached.

A change that may still be abandoned (a skill job working on a copy of the served system) ``hold``s its
events: they are kept in memory only, and reach the log, the file and the sinks on ``commit`` once the change
is saved, or never (``discard``). The event log then never claims what did not happen on disk.
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
EXPERTS_MERGED = "experts_merged"
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
        self._held: list[dict[str, Any]] | None = None  # events of a change not yet committed

    def attach_file(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def subscribe(self, sink: Callable[[dict[str, Any]], None]) -> None:
        self._sinks.append(sink)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": time.time(), "event": event, **fields}
        self.records.append(record)
        del self.records[: -self.keep]
        if self._held is not None:
            self._held.append(record)
            return record
        self._publish([record])
        for sink in self._sinks:
            sink(record)
        return record

    def _publish(self, records: list[dict[str, Any]]) -> None:
        lines = [json.dumps(r, default=str) for r in records]
        for record, line in zip(records, lines, strict=True):
            logger.log(logging.ERROR if record["event"] == ERROR else logging.INFO, line)
        if self.path is not None and lines:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in lines))

    def hold(self) -> None:
        """Keep the next events back until ``commit`` (or drop them with ``discard``)."""
        self._held = [] if self._held is None else self._held

    def discard(self) -> int:
        """Forget the held events (the change they describe was abandoned); returns how many."""
        held, self._held = self._held or [], None
        self.records = [r for r in self.records if not any(r is h for h in held)]
        return len(held)

    def commit(self) -> int:
        """Publish the held events to the log and the file, then to every sink. Every sink sees every event
        even when one fails; the first failure is raised afterwards (the change itself stands). Returns how
        many were published."""
        held, self._held = self._held or [], None
        self._publish(held)
        failure: Exception | None = None
        for record in held:
            for sink in self._sinks:
                try:
                    sink(record)
                except Exception as err:
                    failure = failure or err
        if failure is not None:
            raise failure
        return len(held)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == event]
