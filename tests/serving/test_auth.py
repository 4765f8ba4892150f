"""Mutating endpoints need the API key: 401 without it or with a wrong one, 403 when none is configured."""

from __future__ import annotations

from fastapi.testclient import TestClient

from dylora_moe.serving import create_app
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
