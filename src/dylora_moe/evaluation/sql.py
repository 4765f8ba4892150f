"""Execution-based SQL scoring for Spider: the MySQL dump of the dev databases becomes SQLite files, and a
predicted query matches when it returns the same rows as the gold query.

The dump (``spider/spider_dev_dbs.mysql.sql`` in a data directory) is converted statement by statement:
MySQL directives, locks and secondary keys are dropped, column options SQLite does not know are removed,
and backslash escapes in string literals become SQLite's doubled quotes. Queries run read-only, with ATTACH
refused and a time limit, so a model's output cannot change or reach beyond its database.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

MAX_VALUE_BYTES = 1 << 20  # the largest string or blob a query may build (SQLITE_LIMIT_LENGTH)
MAX_RESULT_BYTES = 64 << 20  # text and blob bytes a query's rows may hold in all
MAX_ROWS = 200_000

_DROP_LINE = re.compile(r"^\s*(KEY|UNIQUE KEY|FULLTEXT KEY|INDEX)\s", re.IGNORECASE)
_COLUMN_NOISE = re.compile(
    r"\s+(COLLATE\s+\w+|CHARACTER SET\s+\w+|AUTO_INCREMENT|unsigned|ON UPDATE CURRENT_TIMESTAMP)", re.IGNORECASE)
_TABLE_TAIL = re.compile(r"\)\s*ENGINE=.*$", re.IGNORECASE | re.DOTALL)


def split_statements(sql: str) -> list[str]:
    """Split on semicolons outside quoted strings; comments and MySQL ``/*! ... */`` directives dropped. Text
    ending inside a quoted string or a ``/*`` comment (a dump cut short) is a ValueError."""
    statements, current, quote, i = [], [], None, 0
    while i < len(sql):
        ch = sql[i]
        if quote:
            current.append(ch)
            if ch == "\\" and i + 1 < len(sql):
                current.append(sql[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                raise ValueError(f"a /* comment opened at character {i} is never closed")
            i = end + 1
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
    if quote:
        raise ValueError(f"the text ends inside a {quote}-quoted string")
    statements.append("".join(current).strip())
    return [s for s in statements if s]


def _sqlite_literals(statement: str) -> str:
    """MySQL string literals (backslash escapes) -> SQLite ones (doubled single quotes); an unclosed literal is a
    ValueError."""
    out, i = [], 0
    while i < len(statement):
        ch = statement[i]
        if ch != "'":
            out.append(ch)
            i += 1
            continue
        start, i = i, i + 1
        chars = []
        while i < len(statement) and (statement[i] != "'" or (i + 1 < len(statement) and statement[i + 1] == "'")):
            if statement[i] == "\\" and i + 1 < len(statement):
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
        if i >= len(statement):
            raise ValueError(f"the string literal opened at character {start} is never closed")
        i += 1
        out.append("'" + "".join(chars).replace("'", "''") + "'")
    return "".join(out)


def convert_create(statement: str) -> str:
    body = _TABLE_TAIL.sub(")", statement)
    lines = [_COLUMN_NOISE.sub("", line) for line in body.split("\n") if not _DROP_LINE.match(line)]
    text = re.sub(r"`\(\d+\)", "`", "\n".join(lines))  # key prefix lengths: `col`(255)
    return re.sub(r",\s*\)\s*$", "\n)", text)  # a dropped last KEY line leaves a trailing comma


def mysql_dump_to_sqlite(dump: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """One SQLite file per database of the dump in ``out_dir``; returns database name -> file. The files are
    built in a private folder and renamed into place (a process scoring with them meanwhile keeps reading whole
    files), and not rebuilt while ``out_dir`` holds those of this very dump (its path, size and time)."""
    dump, out_dir = Path(dump), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = dump.stat()
    source = f"{dump.resolve()}\n{info.st_size}\n{info.st_mtime_ns}\n"
    stamp = out_dir / ".source"
    if stamp.is_file() and stamp.read_text(encoding="utf-8").startswith(source):
        names = stamp.read_text(encoding="utf-8")[len(source):].split()
        if all((out_dir / f"{name}.sqlite").is_file() for name in names):
            return {name: out_dir / f"{name}.sqlite" for name in names}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".building-") as tmp:
        built = _convert(dump, Path(tmp))
        for path in built.values():
            os.replace(path, out_dir / path.name)
    stamp_tmp = out_dir / f".source.{os.getpid()}"
    stamp_tmp.write_text(source + "\n".join(built) + "\n", encoding="utf-8")
    os.replace(stamp_tmp, stamp)
    return {name: out_dir / path.name for name, path in built.items()}


def _convert(dump: Path, out_dir: Path) -> dict[str, Path]:
    """Write one SQLite file per database of the dump into ``out_dir``; returns database name -> file."""
    files: dict[str, Path] = {}
    conn = None
    try:
        statements = split_statements(Path(dump).read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{dump}: {err}: the dump is cut short or not a MySQL dump; put the published file "
                         "there") from None
    for statement in statements:
        head = statement.split(None, 2)
        keyword = head[0].upper()
        if keyword == "USE" and len(head) < 2:
            raise ValueError(f"{dump}: a USE statement names no database: write `USE name;` before its tables")
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
            try:
                conn.execute(_sqlite_literals(statement))
            except ValueError as err:
                raise ValueError(f"{dump}: in the statement starting {statement[:60]!r}: {err}: the dump is not "
                                 "MySQL's own; put the published file there") from None
        # anything else (SET, LOCK/UNLOCK, CREATE DATABASE/USER, GRANT, FLUSH) means nothing to SQLite
    if conn is not None:
        conn.commit()
        conn.close()
    return files


class ResultTooLarge(sqlite3.DataError):
    """A query's rows exceed ``MAX_ROWS`` or ``MAX_RESULT_BYTES`` (a generated query must not exhaust memory)."""


def run_query(db: str | Path, sql: str, *, timeout: float = 5.0) -> list[tuple]:
    """Rows of ``sql`` on a read-only connection; raises ``sqlite3.Error`` for bad SQL, on timeout, for a value
    over ``MAX_VALUE_BYTES`` and for rows over ``MAX_ROWS`` or ``MAX_RESULT_BYTES`` (``ResultTooLarge``): rows are
    fetched in batches and counted, so a query like ``SELECT zeroblob(1e9)`` never reaches this process's memory."""
    conn = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_ATTACH
                        else sqlite3.SQLITE_OK)
    if hasattr(conn, "setlimit"):  # Python 3.11+
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    try:
        cursor, rows, size = conn.execute(sql), [], 0
        while batch := cursor.fetchmany(1000):
            rows += batch
            size += sum(len(v) for row in batch for v in row if isinstance(v, (str, bytes)))
            if len(rows) > MAX_ROWS or size > MAX_RESULT_BYTES or time.monotonic() > deadline:
                raise ResultTooLarge(f"the query's rows exceed {MAX_ROWS} rows, {MAX_RESULT_BYTES} bytes or "
                                     f"{timeout:g} s")
        return rows
    finally:
        conn.close()


def execution_match(db: str | Path, predicted: str, gold: str, *, timeout: float = 5.0) -> bool:
    """True when ``predicted`` returns the gold rows: in order if the gold query orders them, else as a
    multiset. Any error of the predicted query is a mismatch."""
    expected = run_query(db, gold, timeout=timeout)
    try:
        got = run_query(db, predicted, timeout=timeout)
    except (sqlite3.Error, sqlite3.Warning, ValueError, MemoryError, OverflowError):
        return False
    if re.search(r"\border\s+by\b", gold, re.IGNORECASE):
        return got == expected
    return Counter(got) == Counter(expected)
