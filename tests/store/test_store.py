"""The store on SQLite (always) and on PostgreSQL (when a server can be started): schema, versions, errors."""

from __future__ import annotations

import sqlite3
import uuid

import pytest
from sqlalchemy import create_engine, text

from dylora_moe.store import SCHEMA_VERSION, SkillStore


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A fresh, empty store location: a SQLite file, or a new database on the module's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    template = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(template.format(db="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return template.format(db=name)


def test_new_store_has_the_current_schema(url):
    store = SkillStore(url)
    assert store.schema_version == SCHEMA_VERSION
    assert SkillStore(url).schema_version == SCHEMA_VERSION  # reopening changes nothing


def test_skill_data_is_versioned_and_deduplicated(url):
    store = SkillStore(url)
    store.add_skill(0, "python", [0.5, -1.0])
    first = store.add_skill_data(0, [("a", "1"), ("b", "2"), ("a", "1")], expert_id=0)
    assert (first.version, first.added, first.duplicates) == (1, 2, 1)
    second = store.add_skill_data(0, [("b", "2"), ("c", "3")], expert_id=0)
    assert (second.version, second.added, second.duplicates) == (2, 1, 1)
    nothing = store.add_skill_data(0, [("c", "3")])
    assert nothing.version is None and nothing.added == 0
    assert [r.input_data for r in store.skill_data(0, version=1)] == ["a", "b"]
    assert [r.input_data for r in store.skill_data(0)] == ["a", "b", "c"]
    assert [(h["version"], h["rows"]) for h in store.history(0)] == [(1, 2), (2, 1)]
    assert store.embedding(store.skill(0)).tolist() == [0.5, -1.0]
    with pytest.raises(KeyError, match="add the skill first"):
        store.add_skill_data(7, [("x", "y")])


def test_expert_registry(url):
    store = SkillStore(url)
    store.add_skill(0, "python")
    store.register_expert(0, skill_id=0, lora_config={"r": 8}, storage_path="experts/expert_0", rank=8,
                          training={"steps": 24})
    store.register_expert(0, skill_id=0, lora_config={"r": 8}, storage_path="experts/expert_0", rank=8,
                          maturity_state=1, training={"steps": 16}, eval_metrics={"loss": 0.5})
    row = store.expert(0)
    assert (row.version, row.maturity_state, len(row.training_history)) == (2, 1, 2)
    assert row.eval_metrics == {"loss": 0.5}
    store.delete_expert(0)
    assert store.experts() == []
    with pytest.raises(KeyError, match="no expert with id 0"):
        store.expert(0)


def test_events_are_recorded(url):
    store = SkillStore(url)
    store.record_event({"time": 1.0, "event": "expert_created", "expert_id": 3})
    assert [(e.event, e.payload) for e in store.events()] == [("expert_created", {"expert_id": 3})]


def test_newer_schema_is_refused_and_untouched(tmp_path):
    path = tmp_path / "store.db"
    SkillStore(path)
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE dylora_schema SET version = :v"), {"v": SCHEMA_VERSION + 1})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="newer dylora-moe"):
        SkillStore(path)
    assert path.read_bytes() == before


def test_foreign_database_is_refused_and_untouched(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="not a dylora-moe store"):
        SkillStore(path)
    assert path.read_bytes() == before


def test_older_schema_is_migrated_in_one_transaction(tmp_path, monkeypatch):
    import dylora_moe.store.store as store_module

    path = tmp_path / "store.db"
    SkillStore(path).add_skill(0, "python")
    ran = []

    def add_note_column(conn):
        conn.execute(text("ALTER TABLE skills ADD COLUMN note TEXT"))
        ran.append(True)

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(store_module, "MIGRATIONS", {SCHEMA_VERSION: add_note_column})
    migrated = SkillStore(path)
    assert ran == [True] and migrated.schema_version == SCHEMA_VERSION + 1
    assert [s.name for s in migrated.skills()] == ["python"]  # data survives the migration
    SkillStore(path)
    assert ran == [True]  # already at the new version: nothing runs again


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path):
    path = tmp_path / "store.db"
    path.write_bytes(b"not sqlite at all\n" * 64)
    with pytest.raises(ValueError, match=r"is not a database.*restore the store"):
        SkillStore(path)
    assert path.read_bytes() == b"not sqlite at all\n" * 64


def test_a_creation_cut_short_leaves_an_empty_file_that_opens_as_a_new_store(tmp_path, monkeypatch):
    from dylora_moe.store.schema import Base

    path = tmp_path / "store.db"
    create_all = Base.metadata.create_all

    def killed(conn, **kwargs):  # the process dies after the tables, before the schema row
        create_all(conn, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Base.metadata, "create_all", killed)
        with pytest.raises(KeyboardInterrupt):
            SkillStore(path)
    assert SkillStore(path).schema_version == SCHEMA_VERSION


def test_two_first_opens_at_once_both_open_the_store(tmp_path, monkeypatch):
    import threading
    import time

    from dylora_moe.store.schema import Base

    path = tmp_path / "store.db"
    create_all, created = Base.metadata.create_all, threading.Event()

    def slow(conn, **kwargs):  # the first open is between its tables and its schema row while the second starts
        create_all(conn, **kwargs)
        created.set()
        time.sleep(0.5)

    monkeypatch.setattr(Base.metadata, "create_all", slow)
    results: list[object] = []

    def open_store() -> None:
        try:
            results.append(SkillStore(path).schema_version)
        except Exception as err:
            results.append(err)

    first = threading.Thread(target=open_store)
    first.start()
    assert created.wait(10)
    open_store()
    first.join(10)
    assert results == [SCHEMA_VERSION, SCHEMA_VERSION]


def test_a_store_left_without_its_schema_row_is_refused_with_a_message(tmp_path):
    path = tmp_path / "store.db"
    SkillStore(path)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM dylora_schema")
    with pytest.raises(ValueError, match="no schema version"):
        SkillStore(path)
