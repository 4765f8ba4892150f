"""Mutating endpoints need the API key: 401 without it or with a wrong one, 403 when none is configured."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from dylora_moe.serving import create_app
from dylora_moe.serving.auth import check_authorization
from dylora_moe.serving.errors import APIError
from tests.serving.conftest import digits, server_config

BODY = {"name": "more", "examples": digits(4)}


def test_missing_or_wrong_key_is_401(client):
    r = client.post("/skills", json=BODY)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = client.post("/skills", json=BODY, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.post("/skills", json=BODY, headers={"Authorization": "Basic dGVzdC1rZXk="})
    assert r.status_code == 401


def test_the_key_is_checked_before_the_body(client):
    r = client.post("/skills", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401


def test_without_a_configured_key_mutations_are_refused(run_dir, monkeypatch):
    monkeypatch.delenv("DYLORA_API_KEY", raising=False)
    with TestClient(create_app(run_dir, server_config(api_key=None))) as c:
        r = c.post("/skills", json=BODY, headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403
        assert "DYLORA_API_KEY" in r.json()["error"]["message"] and "--api-key" in r.json()["error"]["message"]
        ok = c.post("/v1/completions", json={"model": "dylora-moe", "prompt": "1+1=", "max_tokens": 1})
        assert ok.status_code == 200


def test_the_key_can_come_from_the_environment(run_dir, monkeypatch):
    monkeypatch.setenv("DYLORA_API_KEY", "from-env")
    assert server_config(api_key=None).api_key == "from-env"


def test_a_non_ascii_key_is_matched_as_the_utf8_bytes_a_client_sends(run_dir):
    key = "cl\u00e9-secr\u00e8te"
    with TestClient(create_app(run_dir, server_config(api_key=key))) as c:
        utf8 = {"Authorization": b"Bearer " + key.encode("utf-8")}  # what curl sends from a UTF-8 shell
        assert c.get("/jobs", headers=utf8).status_code == 200
    # the server reads header bytes as latin-1: the same key sent in latin-1 is other bytes, and refused
    with pytest.raises(APIError, match="invalid API key"):
        check_authorization("Bearer " + key.encode("latin-1").decode("latin-1"), key)
