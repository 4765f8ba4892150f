"""Tables of the expert registry and skill store (spec 5.2, extended with versions, hashes and history).

The ``dylora_schema`` table holds the schema version; ``store.py`` creates, checks and migrates it.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 1


def now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class SchemaInfo(Base):
    __tablename__ = "dylora_schema"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class SkillRow(Base):
    __tablename__ = "skills"
    skill_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32 little-endian
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class SkillDataRow(Base):
    __tablename__ = "skill_data"
    __table_args__ = (UniqueConstraint("skill_id", "content_hash", name="uq_skill_content"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    skill_id: Mapped[int] = mapped_column(ForeignKey("skills.skill_id"), index=True)
    expert_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    input_data: Mapped[str] = mapped_column(Text)
    output_data: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class ExpertRow(Base):
    __tablename__ = "experts"
    expert_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    skill_id: Mapped[int | None] = mapped_column(ForeignKey("skills.skill_id"), nullable=True)
    lora_config: Mapped[dict] = mapped_column(JSON)
    storage_path: Mapped[str] = mapped_column(Text)
    maturity_state: Mapped[int] = mapped_column(Integer, default=0)
    rank: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer, default=1)
    training_history: Mapped[list] = mapped_column(JSON, default=list)
    eval_metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[float] = mapped_column(Float)
    event: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[dict] = mapped_column(JSON)
