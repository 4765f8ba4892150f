"""The expert registry and versioned skill store (SQLAlchemy; SQLite by default, any URL)."""

from .schema import SCHEMA_VERSION
from .store import DataVersion, SkillStore, content_hash

__all__ = ["SCHEMA_VERSION", "DataVersion", "SkillStore", "content_hash"]
