"""The event log: records go to memory, the file and the sinks; held records only once committed."""

from __future__ import annotations

import json

import pytest

from dylora_moe.events import EXPERT_CREATED, SKILL_RECOGNISED, EventLog


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_events_reach_the_file_and_every_sink(tmp_path):
    log, seen = EventLog(tmp_path / "events.jsonl"), []
    log.subscribe(seen.append)
    log.emit(EXPERT_CREATED, expert_id=0)
    assert [r["expert_id"] for r in lines(tmp_path / "events.jsonl")] == [0]
    assert seen == log.records and log.of(EXPERT_CREATED)[0]["expert_id"] == 0


def test_held_events_are_published_on_commit_only(tmp_path):
    log, seen = EventLog(tmp_path / "events.jsonl"), []
    log.subscribe(seen.append)
    log.hold()
    log.emit(EXPERT_CREATED, expert_id=1)
    log.emit(SKILL_RECOGNISED, skill_id=0)
    assert lines(tmp_path / "events.jsonl") == [] and seen == []
    assert len(log.records) == 2  # visible in memory, to the change itself
    assert log.commit() == 2
    assert [r["event"] for r in lines(tmp_path / "events.jsonl")] == [EXPERT_CREATED, SKILL_RECOGNISED]
    assert [r["event"] for r in seen] == [EXPERT_CREATED, SKILL_RECOGNISED]
    log.emit(EXPERT_CREATED, expert_id=2)  # not held any more
    assert len(lines(tmp_path / "events.jsonl")) == 3


def test_discarded_events_are_never_published(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.emit(EXPERT_CREATED, expert_id=0)
    log.hold()
    log.emit(EXPERT_CREATED, expert_id=1)
    assert log.discard() == 1
    assert [r["expert_id"] for r in log.records] == [0]
    assert [r["expert_id"] for r in lines(tmp_path / "events.jsonl")] == [0]


def test_a_failing_sink_on_commit_is_raised_after_every_sink_saw_every_event(tmp_path):
    log, seen = EventLog(tmp_path / "events.jsonl"), []

    def broken(record):
        raise OSError("database is locked")

    log.subscribe(broken)
    log.subscribe(seen.append)
    log.hold()
    log.emit(EXPERT_CREATED, expert_id=1)
    log.emit(EXPERT_CREATED, expert_id=2)
    with pytest.raises(OSError, match="locked"):
        log.commit()
    assert len(seen) == 2 and len(lines(tmp_path / "events.jsonl")) == 2
