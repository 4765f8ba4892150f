"""The ``dylora`` entry point: argument errors and clear failures."""

from __future__ import annotations

import pytest

from dylora_moe.cli import main


def test_unknown_model_exits_2_with_a_message(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "cannot load model" in capsys.readouterr().err


def test_a_command_is_required():
    with pytest.raises(SystemExit):
        main([])
