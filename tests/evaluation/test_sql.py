"""Spider execution scoring: the MySQL dump converts to SQLite, gold queries run, matches are strict."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from dylora_moe.evaluation.sql import execution_match, mysql_dump_to_sqlite, run_query, split_statements

DATA_DIR = Path(os.environ.get("DYLORA_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))
DUMP = DATA_DIR / "spider" / "spider_dev_dbs.mysql.sql"

SMALL_DUMP = r"""
-- a comment; with a semicolon
CREATE DATABASE IF NOT EXISTS `shop` /*!40100 DEFAULT CHARACTER SET utf8mb4 */;
USE `shop`;
/*!40101 SET NAMES utf8 */;
DROP TABLE IF EXISTS `item`;
CREATE TABLE `item` (
  `id` int NOT NULL AUTO_INCREMENT,
  `name` text COLLATE utf8mb4_general_ci,
  `price` double DEFAULT NULL,
  PRIMARY KEY (`id`,`name`(255)),
  KEY `item_name` (`name`(20))
) ENGINE=InnoDB AUTO_INCREMENT=3 DEFAULT CHARSET=utf8mb4;
LOCK TABLES `item` WRITE;
INSERT INTO `item` VALUES (1,'O\'Brien; \"tea\"',2.5),(2,'cake',4);
UNLOCK TABLES;
"""


def test_small_dump_converts(tmp_path):
    assert split_statements("a 'x;y' ; b -- c;\n; /* d; */ e")[:2] == ["a 'x;y'", "b"]
    dump = tmp_path / "d.sql"
    dump.write_text(SMALL_DUMP)
    files = mysql_dump_to_sqlite(dump, tmp_path / "db")
    rows = run_query(files["shop"], "SELECT name, price FROM item ORDER BY id")
    assert rows == [("O'Brien; \"tea\"", 2.5), ("cake", 4.0)]


def test_queries_are_read_only_and_confined(tmp_path):
    dump = tmp_path / "d.sql"
    dump.write_text(SMALL_DUMP)
    db = mysql_dump_to_sqlite(dump, tmp_path / "db")["shop"]
    gold = "SELECT name FROM item"
    assert not execution_match(db, "DELETE FROM item", gold)
    assert not execution_match(db, f"ATTACH DATABASE '{tmp_path / 'x.db'}' AS x", gold)
    assert not (tmp_path / "x.db").exists()
    assert len(run_query(db, gold)) == 2


def test_a_query_too_large_for_memory_is_a_mismatch_not_a_crash(tmp_path):
    import time

    from dylora_moe.evaluation.sql import MAX_ROWS

    dump = tmp_path / "d.sql"
    dump.write_text(SMALL_DUMP)
    db = mysql_dump_to_sqlite(dump, tmp_path / "db")["shop"]
    start = time.monotonic()
    assert not execution_match(db, "SELECT zeroblob(1000000000), zeroblob(1000000000)", "SELECT name FROM item")
    many = f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT {MAX_ROWS + 5}) SELECT i FROM n"
    assert not execution_match(db, many, "SELECT name FROM item")
    assert time.monotonic() - start < 30


def test_the_converted_databases_are_built_once_and_replaced_whole(tmp_path):
    dump = tmp_path / "d.sql"
    dump.write_text(SMALL_DUMP)
    first = mysql_dump_to_sqlite(dump, tmp_path / "db")["shop"]
    inode = first.stat().st_ino
    assert mysql_dump_to_sqlite(dump, tmp_path / "db")["shop"].stat().st_ino == inode  # up to date: kept
    dump.write_text(SMALL_DUMP.replace("'cake',4", "'pie',5"))
    again = mysql_dump_to_sqlite(dump, tmp_path / "db")["shop"]
    assert run_query(again, "SELECT name FROM item WHERE id = 2") == [("pie",)]
    assert [p.name for p in (tmp_path / "db").iterdir() if p.name.startswith(".building")] == []


@pytest.mark.skipif(not DUMP.is_file(), reason=f"Spider data not found in {DATA_DIR} (set DYLORA_DATA_DIR)")
def test_every_spider_gold_query_runs_and_matching_is_strict(tmp_path):
    files = mysql_dump_to_sqlite(DUMP, tmp_path)
    assert len(files) == 20
    examples = json.loads((DATA_DIR / "spider" / "spider_dev.json").read_text())
    for ex in examples:
        run_query(files[ex["db"]], ex["gold"])  # raises if any gold query fails on the converted databases
    first = examples[0]  # ordered: names by final tables made
    db = files[first["db"]]
    # the same question written independently (implicit join, aliases, explicit ASC) must match
    rewritten = ("SELECT p.Name FROM poker_player pp, people p WHERE pp.People_ID = p.People_ID "
                 "ORDER BY pp.Final_Table_Made ASC")
    assert execution_match(db, rewritten, first["gold"])
    assert not execution_match(db, first["gold"].replace("ORDER BY T2.Final_Table_Made",
                                                         "ORDER BY T2.Final_Table_Made DESC"), first["gold"])
    assert not execution_match(db, "SELECT Name FROM people LIMIT 1", first["gold"])
    assert not execution_match(db, "SELEC nonsense", first["gold"])
    # without ORDER BY in the gold query, rows may come in any order, and a multiset of rows must match
    unordered = next(e for e in examples if e["gold"] == "SELECT Hometown , COUNT(*) FROM teacher GROUP BY Hometown")
    teachers = files[unordered["db"]]
    reversed_rows = "SELECT Hometown, count(Teacher_ID) AS n FROM teacher GROUP BY Hometown ORDER BY Hometown DESC"
    assert execution_match(teachers, reversed_rows, unordered["gold"])
    assert not execution_match(teachers, "SELECT Hometown, 2 FROM teacher GROUP BY Hometown", unordered["gold"])


@pytest.mark.parametrize(("text", "problem"), [
    ("USE `shop`;\n/*!40101 SET NAMES utf8", r"a /\* comment opened at character \d+ is never closed"),
    ("USE `shop`;\nINSERT INTO `item` VALUES (1,'cut\\", "the text ends inside a '-quoted string"),
    ("USE `shop`;\nINSERT INTO `item` VALUES (1,'cut", "the text ends inside a '-quoted string"),
    ("USE;\nCREATE TABLE `item` (`id` int);", r"a USE statement names no database: write `USE name;`"),
    ("USE `shop`;\nCREATE TABLE `item` (`id` int, `name` text);\nINSERT INTO `item` VALUES (1,\"it's\");",
     r"in the statement starting 'INSERT INTO `item` VALUES \(1,\"it\\'s\"\)': the string literal opened at"),
], ids=["open-comment", "backslash-at-end", "open-string", "bare-use", "open-literal"])
def test_a_malformed_dump_is_named_not_an_index_error(tmp_path, text, problem):
    """A dump cut short (an unclosed comment or string) or with a bare USE raised ValueError("substring not
    found") or IndexError, naming neither the file nor the problem."""
    dump = tmp_path / "d.sql"
    dump.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{dump}: ") + problem):
        mysql_dump_to_sqlite(dump, tmp_path / "db")
