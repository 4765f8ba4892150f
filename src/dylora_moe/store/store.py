"""The skill store and expert registry on SQLAlchemy: the only code in the package that writes SQL.

``SkillStore("runs/x/store.db")`` opens (or creates) an embedded SQLite file; any SQLAlchemy URL works the
same (``postgresql+psycopg://user@host/db`` for teams). Every write is one transaction. Opening a store
written by a newer schema, or a database that is not a store, fails with a message and touches nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, create_engine, func, inspect, select
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from .schema import SCHEMA_VERSION, Base, EventRow, ExpertRow, SchemaInfo, SkillDataRow, SkillRow

# version -> function that upgrades a connection from that version to the next one, inside a transaction
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


@dataclass
class DataVersion:
    skill_id: int
    version: int | None  # None: every row was a duplicate, so no version was created
    added: int
    duplicates: int


def content_hash(input_data: str, output_data: str) -> str:
    return hashlib.sha256(json.dumps([input_data, output_data]).encode("utf-8")).hexdigest()


def as_url(target: str | Path) -> str:
    text = str(target)
    return text if "://" in text else f"sqlite:///{Path(text).resolve()}"


class SkillStore:
    def __init__(self, target: str | Path) -> None:
        self.url = as_url(target)
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(self.url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._open()

    # ------------------------------------------------------------ schema
    def _open(self) -> None:
        try:
            tables = set(inspect(self.engine).get_table_names())
        except DatabaseError as err:
            raise ValueError(f"{self.url} is not a database ({err.orig}); restore the store from a copy, or "
                             "move it aside and `dylora train --resume` rebuilds it from the system folder") from err
        if not tables:
            with self._begin() as conn:
                tables = set(inspect(conn).get_table_names())  # another process may have created it meanwhile
                if not tables:
                    Base.metadata.create_all(conn)
                    conn.execute(SchemaInfo.__table__.insert().values(id=1, version=SCHEMA_VERSION))
                    return
        if SchemaInfo.__tablename__ not in tables:
            raise ValueError(f"{self.url} is not a dylora-moe store (it has tables {sorted(tables)} but no "
                             f"{SchemaInfo.__tablename__}); give a new file or the store a run wrote")
        with self.engine.connect() as conn:
            version = conn.execute(select(SchemaInfo.version)).scalar_one_or_none()
        if version is None:
            raise ValueError(f"{self.url} has no schema version in {SchemaInfo.__tablename__} (its creation was cut "
                             "short); move it aside and `dylora train --resume` rebuilds it from the system folder")
        if version > SCHEMA_VERSION:
            raise ValueError(f"{self.url} was written by a newer dylora-moe (schema {version}; this one reads up "
                             f"to {SCHEMA_VERSION}): upgrade dylora-moe to open it")
        if version == SCHEMA_VERSION:
            return
        with self._begin() as conn:
            version = conn.execute(select(SchemaInfo.version)).scalar_one()  # another process may have migrated it
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](conn)
            if version < SCHEMA_VERSION:
                conn.execute(SchemaInfo.__table__.update().values(version=SCHEMA_VERSION))

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A transaction that holds schema changes too, with the database's write lock from its start. The
        SQLite driver begins a transaction only before a data change, so each CREATE or ALTER TABLE would be
        committed on its own; BEGIN IMMEDIATE holds them, and makes a concurrent opener wait for this one."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn

    @property
    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(SchemaInfo.version)).scalar_one()

    def session(self) -> Session:
        return self._session.begin()

    # ------------------------------------------------------------ skills
    def add_skill(self, skill_id: int, name: str, embedding: Sequence[float] | np.ndarray | None = None) -> None:
        blob = None if embedding is None else np.asarray(embedding, dtype="<f4").tobytes()
        with self.session() as s:
            existing = s.get(SkillRow, skill_id)
            if existing is None:
                s.add(SkillRow(skill_id=skill_id, name=name, embedding=blob))
            else:
                existing.name, existing.embedding = name, blob if blob is not None else existing.embedding

    def skills(self) -> list[SkillRow]:
        with self.session() as s:
            return list(s.scalars(select(SkillRow).order_by(SkillRow.skill_id)))

    def skill(self, skill_id: int) -> SkillRow:
        return self._get(SkillRow, skill_id, "skill")

    def _get(self, table, key: int, what: str):
        with self.session() as s:
            row = s.get(table, key)
        if row is None:
            raise KeyError(f"no {what} with id {key} in {self.url}")
        return row

    @staticmethod
    def embedding(row: SkillRow) -> np.ndarray | None:
        return None if row.embedding is None else np.frombuffer(row.embedding, dtype="<f4")

    def add_skill_data(self, skill_id: int, rows: Iterable[tuple[str, str]], expert_id: int | None = None
                       ) -> DataVersion:
        """Store examples as a new version of the skill's data; rows already stored for it are skipped."""
        with self.session() as s:
            if s.get(SkillRow, skill_id) is None:
                raise KeyError(f"no skill with id {skill_id}: add the skill first")
            known = set(s.scalars(select(SkillDataRow.content_hash).where(SkillDataRow.skill_id == skill_id)))
            fresh, dup = [], 0
            for inp, out in rows:
                h = content_hash(inp, out)
                if h in known:
                    dup += 1
                    continue
                known.add(h)
                fresh.append((inp, out, h))
            if not fresh:
                return DataVersion(skill_id, None, 0, dup)
            last = s.scalar(select(func.max(SkillDataRow.version)).where(SkillDataRow.skill_id == skill_id)) or 0
            s.add_all([SkillDataRow(skill_id=skill_id, expert_id=expert_id, input_data=i, output_data=o,
                                    version=last + 1, content_hash=h) for i, o, h in fresh])
            return DataVersion(skill_id, last + 1, len(fresh), dup)

    def skill_data(self, skill_id: int, version: int | None = None) -> list[SkillDataRow]:
        """The skill's rows, all versions up to ``version`` (all when ``None``)."""
        with self.session() as s:
            q = select(SkillDataRow).where(SkillDataRow.skill_id == skill_id)
            if version is not None:
                q = q.where(SkillDataRow.version <= version)
            return list(s.scalars(q.order_by(SkillDataRow.id)))

    def history(self, skill_id: int) -> list[dict]:
        """One entry per data version: rows added, the expert it trained, when."""
        with self.session() as s:
            q = (select(SkillDataRow.version, SkillDataRow.expert_id, func.count(), func.min(SkillDataRow.created_at))
                 .where(SkillDataRow.skill_id == skill_id).group_by(SkillDataRow.version, SkillDataRow.expert_id)
                 .order_by(SkillDataRow.version))
            return [{"version": v, "expert_id": e, "rows": n, "created_at": t} for v, e, n, t in s.execute(q)]

    # ------------------------------------------------------------ experts
    def register_expert(self, expert_id: int, *, skill_id: int | None, lora_config: dict, storage_path: str,
                        rank: int, maturity_state: int = 0, training: dict | None = None,
                        eval_metrics: dict | None = None) -> ExpertRow:
        """Insert or update an expert; call only once its weights are completely written. ``storage_path`` is
        recorded absolute, so the row names the folder whatever directory it is read from."""
        storage_path = str(Path(storage_path).resolve())
        with self.session() as s:
            row = s.get(ExpertRow, expert_id)
            if row is None:
                row = ExpertRow(expert_id=expert_id, skill_id=skill_id, lora_config=lora_config,
                                storage_path=storage_path, rank=rank, maturity_state=maturity_state,
                                training_history=[training] if training else [], eval_metrics=eval_metrics or {})
                s.add(row)
            else:
                row.version += 1
                row.storage_path, row.maturity_state, row.rank = storage_path, maturity_state, rank
                row.training_history = [*row.training_history, training] if training else row.training_history
                row.eval_metrics = eval_metrics or row.eval_metrics
            return row

    def experts(self) -> list[ExpertRow]:
        with self.session() as s:
            return list(s.scalars(select(ExpertRow).order_by(ExpertRow.expert_id)))

    def expert(self, expert_id: int) -> ExpertRow:
        return self._get(ExpertRow, expert_id, "expert")

    def delete_expert(self, expert_id: int) -> None:
        row = self.expert(expert_id)
        with self.session() as s:
            s.delete(s.merge(row))

    # ------------------------------------------------------------ events
    def record_event(self, record: dict) -> None:
        payload = {k: v for k, v in record.items() if k not in ("time", "event")}
        with self.session() as s:
            s.add(EventRow(time=record["time"], event=record["event"], payload=json.loads(json.dumps(payload,
                                                                                                     default=str))))

    def events(self, event: str | None = None) -> list[EventRow]:
        with self.session() as s:
            q = select(EventRow).order_by(EventRow.id)
            if event is not None:
                q = q.where(EventRow.event == event)
            return list(s.scalars(q))
