"""``dylora serve``: argument handling, the app it serves, and JSON logs."""

from __future__ import annotations

import io
import json
import logging

import pytest

from dylora_moe.cli import main
from dylora_moe.serving import logs
from dylora_moe.serving.cli import loopback


def test_serve_loads_the_run_and_listens_on_loopback_by_default(run_dir, monkeypatch):
    seen = {}

    def fake_run(app, **kwargs):
        seen.update(kwargs, app=app)
        seen["experts"] = app.state.system.model.num_experts

    monkeypatch.setattr("uvicorn.run", fake_run)
    monkeypatch.setattr(logs, "configure", lambda level: None)  # keep pytest's own log handlers
    assert main(["serve", str(run_dir), "--port", "0", "--api-key", "k", "--seed-steps", "1"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 0 and seen["experts"] == 1
    assert seen["app"].state.config.api_key == "k" and seen["app"].state.config.training.seed_steps == 1


def test_serve_refuses_a_folder_that_is_not_a_system(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "neither a `dylora train` output folder" in " ".join(capsys.readouterr().err.split())


def test_serve_refuses_a_port_out_of_range_before_loading_anything(tmp_path, capsys):
    for port in ("99999", "-1", "http"):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", str(tmp_path), "--port", port])
        assert exit_.value.code == 2
        assert "not a port number: give 0-65535" in capsys.readouterr().err


def test_loopback():
    assert loopback("127.0.0.1") and loopback("::1") and loopback("localhost")
    assert not loopback("0.0.0.0") and not loopback("example.org")


def test_json_log_lines_merge_fields_and_events():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("dylora_moe.test_json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("request", extra={"fields": {"event": "request", "status": 200}})
        logger.info(json.dumps({"time": 1.0, "event": "expert_created", "expert_id": 3}))
        logger.info("plain text")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["message"] == "request" and lines[0]["status"] == 200 and lines[0]["level"] == "info"
    assert lines[1]["event"] == "expert_created" and lines[1]["expert_id"] == 3 and "message" not in lines[1]
    assert lines[2]["message"] == "plain text"


def test_serve_defaults_are_the_server_configs():
    """The flags repeat ServerConfig's defaults (the parser is built without importing the model stack): a
    default changed in one place must change in the other."""
    import argparse

    from dylora_moe.serving.cli import add_parser, server_config
    from dylora_moe.serving.config import ServerConfig

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    built, default = server_config(parser.parse_args(["serve", "run"])), ServerConfig()
    for name in ("max_tokens_cap", "max_batch", "batching", "join_batch", "join_wait_steps", "prefill_share",
                 "max_queue", "body_timeout", "repetition_penalty", "no_repeat_ngram_size"):
        assert getattr(built, name) == getattr(default, name), name
    for name in ("seed_steps", "consolidation_steps", "batch_size", "max_length"):
        assert getattr(built.training, name) == getattr(default.training, name), name
