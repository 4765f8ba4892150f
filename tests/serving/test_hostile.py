"""Hostile and unusual requests: never a 5xx, errors in OpenAI's shape, bounded metrics, keys checked before
bodies are read, and job details kept to the key holder."""

from __future__ import annotations

import asyncio
import json

from tests.serving.conftest import AUTH, MODEL
from tests.serving.test_errors import error_of

BIG = "9" * 5000  # beyond Python's 4300-digit int conversion limit


def test_integers_beyond_the_conversion_limit_are_a_400(client):
    body = f'{{"model": "{MODEL}", "prompt": "1+1=", "max_tokens": {BIG}}}'.encode()
    assert error_of(client.post("/v1/completions", content=body), 400)["code"] == "invalid_json"
    body = f'{{"name": "x", "examples": [{{"prompt": "a", "response": "b", "n": {BIG}}}]}}'.encode()
    r = client.post("/skills", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert error_of(r, 400)["code"] == "invalid_json"
    lines = f'{{"prompt": "a", "response": {BIG}}}'.encode()
    r = client.post("/skills", content=lines, params={"name": "x"},
                    headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert "line 1" in error_of(r, 400)["message"]


def test_json_lines_keep_unicode_line_separators_inside_strings(client):
    from dylora_moe.serving.uploads import read_lines

    raw = json.dumps({"prompt": "a\u2028b\u0085c", "response": "d"}, ensure_ascii=False).encode()
    assert [e.prompt for e in read_lines(raw + b"\r\n" + raw)] == ["a\u2028b\u0085c"] * 2


def test_a_lone_surrogate_in_an_upload_is_refused_before_it_is_accepted(client):
    body = b'{"name": "x", "examples": [{"prompt": "\\ud800", "response": "b"}]}'
    r = client.post("/skills", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert error_of(r, 400)["param"] == "examples"
    r = client.post("/skills", content=b'{"prompt": "a", "response": "\\udfff"}', params={"name": "x"},
                    headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert error_of(r, 400)["code"] == "invalid_upload"


def test_invented_http_methods_do_not_grow_the_metrics(client):
    for i in range(20):
        client.request(f"BREW{i}", "/health")
    metrics = client.get("/metrics").text
    assert "BREW" not in metrics and 'method="other"' in metrics


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(client):
    def chunks():  # chunked, no declared length, larger than the upload limit
        for _ in range(10):
            yield b"x" * (1 << 20)

    r = client.post("/skills", content=chunks(), headers={"Content-Type": "application/x-ndjson"})
    assert error_of(r, 401)["code"] == "missing_api_key"  # not 413: the key is checked first


def test_job_status_needs_the_key(client):
    assert error_of(client.get("/jobs"), 401)["code"] == "missing_api_key"
    assert error_of(client.get("/jobs/job-x", headers={"Authorization": "Bearer nope"}), 401)["code"] == \
        "invalid_api_key"


def test_a_client_that_leaves_while_sending_its_body_is_no_server_error(client):
    app = client.app
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "scheme": "http", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]}
    messages = iter([{"type": "http.request", "body": b'{"model": "dylora', "more_body": True},
                     {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    assert status is None or status < 500
    assert 'kind="internal_error"' not in client.get("/metrics").text
