"""Execution-based SQL scoring for Spider: the MySQL dump of the dev databases becomes SQLite files, and a
predicted query matches when it returns the same rows as the gold query.

The dump (``spider/spider_dev_dbs.mysql.sql`` in a data directory) is converted statement by statement:
MySQL directives, locks and secondary keys are dropped, column options SQLite does not know are removed,
and backslash escapes in string literals become SQLite's doubled quotes. Queries run read-only, with ATTACH
refused and a time limit, so a model's output cannot change or reach beyond its database.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from pathlib import Path

_DROP_LINE = re.compile(r"^\s*(KEY|UNIQUE KEY|FULLTEXT KEY|INDEX)\s", re.IGNORECASE)
_COLUMN_NOISE = re.compile(
    r"\s+(COLLATE\s+\w+|CHARACTER SET\s+\w+|AUTO_INCREMENT|unsigned|ON UPDATE CURRENT_TIMESTAMP)", re.IGNORECASE)
_TABLE_TAIL = re.compile(r"\)\s*ENGINE=.*$", re.IGNORECASE | re.DOTALL)


def split_statements(sql: str) -> list[str]:
    """Split on semicolons outside quoted strings; comments and MySQL ``/*! ... */`` directives dropped."""
    statements, current, quote, i = [], [], None, 0
    while i < len(sql):
        ch = sql[i]
        if quote:
            current.append(ch)
            if ch == "\\":
                current.append(sql[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif sql.startswith("/*", i):
            i = sql.index("*/", i) + 1
        elif sql.startswith("--", i) and (i + 2 >= len(sql) or sql[i + 2] in " \t\n"):
            i = sql.find("\n", i)
            i = len(sql) if i < 0 else i
            continue
        elif ch == ";":
            statements.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        i += 1
    statements.append("".join(current).strip())
    return [s for s in statements if s]


def _sqlite_literals(statement: str) -> str:
    """MySQL string literals (backslash escapes) -> SQLite ones (doubled single quotes)."""
    out, i = [], 0
    while i < len(statement):
        ch = statement[i]
        if ch != "'":
            out.append(ch)
            i += 1
            continue
        i += 1
        chars = []
        while statement[i] != "'" or (i + 1 < len(statement) and statement[i + 1] == "'"):
            if statement[i] == "\\":
                nxt = statement[i + 1]
                chars.append({"n": "\n", "t": "\t", "r": "\r", "0": "\0"}.get(nxt, nxt))
                i += 2
                continue
            if statement[i] == "'":  # a doubled quote inside the literal
                chars.append("'")
                i += 2
                continue
            chars.append(statement[i])
            i += 1
        i += 1
        out.append("'" + "".join(chars).replace("'", "''") + "'")
    return "".join(out)


def convert_create(statement: str) -> str:
    body = _TABLE_TAIL.sub(")", statement)
    lines = [_COLUMN_NOISE.sub("", line) for line in body.split("\n") if not _DROP_LINE.match(line)]
    text = re.sub(r"`\(\d+\)", "`", "\n".join(lines))  # key prefix lengths: `col`(255)
    return re.sub(r",\s*\)\s*$", "\n)", text)  # a dropped last KEY line leaves a trailing comma


def mysql_dump_to_sqlite(dump: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write one SQLite file per database of the dump into ``out_dir``; returns database name -> file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    conn = None
    for statement in split_statements(Path(dump).read_text(encoding="utf-8")):
        head = statement.split(None, 2)
        keyword = head[0].upper()
        if keyword == "USE":
            if conn is not None:
                conn.commit()
                conn.close()
            name = head[1].strip("`")
            files[name] = out_dir / f"{name}.sqlite"
            files[name].unlink(missing_ok=True)
            conn = sqlite3.connect(files[name])
        elif conn is None:
            continue
        elif keyword == "CREATE" and statement.upper().startswith("CREATE TABLE"):
            conn.execute(convert_create(statement))
        elif keyword in ("INSERT", "DROP"):
            conn.execute(_sqlite_literals(statement))
        # anything else (SET, LOCK/UNLOCK, CREATE DATABASE/USER, GRANT, FLUSH) means nothing to SQLite
    if conn is not None:
        conn.commit()
        conn.close()
    return files


def run_query(db: str | Path, sql: str, *, timeout: float = 5.0) -> list[tuple]:
    """Rows of ``sql`` on a read-only connection; raises ``sqlite3.Error`` for bad SQL or on timeout."""
    conn = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_ATTACH
                        else sqlite3.SQLITE_OK)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def execution_match(db: str | Path, predicted: str, gold: str, *, timeout: float = 5.0) -> bool:
    """True when ``predicted`` returns the gold rows: in order if the gold query orders them, else as a
    multiset. Any error of the predicted query is a mismatch."""
    expected = run_query(db, gold, timeout=timeout)
    try:
        got = run_query(db, predicted, timeout=timeout)
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return False
    if re.search(r"\border\s+by\b", gold, re.IGNORECASE):
        return got == expected
    return Counter(got) == Counter(expected)
