"""Hostile and unusual requests: never a 5xx, errors in OpenAI's shape, bounded metrics, keys checked before
bodies are read, and job details kept to the key holder."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

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


def test_a_lone_surrogate_in_a_key_is_a_400_that_quotes_it_escaped(client):
    body = b'{"model": "dylora-moe", "prompt": "1+1=", "max_tokens": 2, "\\udc00": 1}'
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    error = error_of(r, 400)
    assert error["code"] == "invalid_json" and "\\udc00" in error["message"]
    assert client.get("/health").status_code == 200


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


def test_uploads_keep_their_key_check_and_size_limit_under_a_root_path(client):
    from fastapi.testclient import TestClient

    mounted = TestClient(client.app, root_path="/dylora")  # e.g. a Ray Serve route_prefix; no second lifespan

    def chunks():
        for _ in range(10):
            yield b"x" * (1 << 20)

    r = mounted.post("/dylora/skills", content=chunks(), headers={"Content-Type": "application/x-ndjson"})
    assert error_of(r, 401)["code"] == "missing_api_key"
    padded = b'{"name": "../x", "examples": [{"response": "a"}]}' + b" " * (2 << 20)  # over the completion limit
    r = mounted.post("/dylora/skills", content=padded, headers={**AUTH, "Content-Type": "application/json"})
    assert error_of(r, 400)["param"] == "name"  # read as an upload (8 MB limit), not refused as too large


def test_job_status_needs_the_key(client):
    assert error_of(client.get("/jobs"), 401)["code"] == "missing_api_key"
    assert error_of(client.get("/jobs/job-x", headers={"Authorization": "Bearer nope"}), 401)["code"] == \
        "invalid_api_key"


def asgi_post(app, headers: list[tuple[bytes, bytes]], messages: list[dict]) -> list[dict]:
    """What the app sends back to a POST /v1/completions with exactly these headers (after the JSON content
    type) whose body arrives as ``messages``; then the client is gone (``http.disconnect``)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "scheme": "http", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"application/json"), *headers]}
    queued, sent = iter(messages), []

    async def receive():
        return next(queued, {"type": "http.disconnect"})

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=10))
    return sent


def test_a_client_that_leaves_while_sending_its_body_is_no_server_error(client):
    sent = asgi_post(client.app, [(b"content-length", b"100")],
                     [{"type": "http.request", "body": b'{"model": "dylora', "more_body": True}])
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    assert status is None or status < 500
    assert 'kind="internal_error"' not in client.get("/metrics").text


def gpt2_app(tmp_path, **config):
    from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig
    from dylora_moe.serving import create_app
    from tests.conftest import char_tokenizer, tiny_gpt2
    from tests.serving.conftest import server_config

    tiny_gpt2().save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    system = DyLoRAConfig(model=str(tmp_path / "model"), expert=ExpertConfig(rank=4, dropout=0.0), device="cpu")
    DyLoRAMoE.from_config(system).save_pretrained(tmp_path / "system")
    return create_app(tmp_path / "system", server_config(max_tokens_cap=100, **config))


def test_requests_that_fit_alone_are_never_batched_past_the_position_limit(tmp_path):
    from fastapi.testclient import TestClient

    from dylora_moe.serving.engine import GenerationRequest
    from dylora_moe.serving.static import fitting

    with TestClient(gpt2_app(tmp_path)) as client:  # absolute positions: 128
        engine = client.app.state.engine
        long_prompt = GenerationRequest("7" * 100, max_tokens=20)  # 120 positions alone
        long_answer = GenerationRequest("1+1=", max_tokens=100)  # 104 alone; 200 if batched with the other
        with engine.system.lock:  # both wait, so the worker takes them as one batch
            futures = [engine.submit(long_prompt), engine.submit(long_answer)]
        results = [f.result(timeout=120) for f in futures]
        assert [r.prompt_tokens for r in results] == [100, 4]
    a, b = GenerationRequest("x", 10, prompt_ids=[0] * 80), GenerationRequest("y", 80, prompt_ids=[0] * 10)
    assert [len(p) for p in fitting([a, b], context=100)] == [1, 1]
    assert [len(p) for p in fitting([a, b], context=200)] == [2]


def test_a_full_generation_queue_answers_429_with_retry_after(tmp_path):
    from fastapi.testclient import TestClient

    from dylora_moe.serving.engine import GenerationRequest

    with TestClient(gpt2_app(tmp_path, max_queue=1)) as client:
        engine = client.app.state.engine
        with engine.system.lock:  # the worker holds at most one batch; the queue takes one more, then refuses
            futures = []
            refused = None
            for _ in range(4):
                try:
                    futures.append(engine.submit(GenerationRequest("1+1=", max_tokens=2)))
                except Exception as err:
                    refused = err
                    break
            assert refused is not None and refused.status == 429 and refused.headers["Retry-After"] == "1"
        for f in futures:
            f.result(timeout=60)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_waiting_completion(client, stream):
    """A plain completion, or a stream before its first event: the request can only wait (the system is locked),
    and without cancellation the call would not return."""
    body = json.dumps({"model": MODEL, "prompt": "1+1=", "max_tokens": 4, "stream": stream}).encode()
    with client.app.state.engine.system.lock:
        sent = asgi_post(client.app, [(b"content-length", str(len(body)).encode())],
                         [{"type": "http.request", "body": body, "more_body": False}])
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    assert status == 499


def test_tools_and_structured_output_are_refused_by_name(client):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert error_of(client.post("/v1/chat/completions", json={**chat, "tools": tools}), 400)["param"] == "tools"
    r = client.post("/v1/chat/completions", json={**chat, "response_format": {"type": "json_object"}})
    assert error_of(r, 400)["param"] == "response_format"
    ok = client.post("/v1/chat/completions", json={**chat, "response_format": {"type": "text"}, "tools": []})
    assert ok.status_code == 200


def test_a_body_that_never_completes_gets_408_and_frees_the_connection(run_dir):
    import socket

    from dylora_moe.serving import create_app
    from dylora_moe.serving.server import BackgroundServer
    from tests.serving.conftest import server_config

    with BackgroundServer(create_app(run_dir, server_config(body_timeout=0.5))) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\": ")  # 10 of the 100 bytes declared
            start = time.monotonic()
            reply = conn.recv(4096).decode()
            assert time.monotonic() - start < 5
        assert reply.startswith("HTTP/1.1 408")
        assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        # a slow but complete body is unaffected, and so is waiting for a reply afterwards
        ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "1+1=", "max_tokens": 2})
        assert ok.status_code == 200


def test_a_chunked_body_that_never_completes_gets_408_not_a_server_error(run_dir):
    import socket

    from dylora_moe.serving import create_app
    from dylora_moe.serving.server import BackgroundServer
    from tests.serving.conftest import server_config

    with BackgroundServer(create_app(run_dir, server_config(body_timeout=0.5))) as server:
        for path in ("/v1/completions", "/skills"):
            with socket.create_connection((server.host, server.port), timeout=10) as conn:
                conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             f"{'Authorization: ' + AUTH['Authorization']}\r\nTransfer-Encoding: chunked\r\n\r\n"
                             "5\r\n{\"a\":\r\n".encode())  # no Content-Length, and the last chunk never comes
                reply = conn.recv(4096).decode()
            assert reply.startswith("HTTP/1.1 408"), reply
            assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        metrics = httpx.get(server.url + "/metrics").text
        assert 'dylora_errors_total{kind="internal_error"' not in metrics


def send_raw(app, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict]:
    """The status and JSON answer of the app to a POST /v1/completions with exactly these headers."""
    sent = asgi_post(app, headers, [{"type": "http.request", "body": body, "more_body": False}])
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_a_content_length_that_is_not_a_number_is_a_400_and_a_huge_one_a_413(client):
    body = json.dumps({"model": MODEL, "prompt": "1+1=", "max_tokens": 1}).encode()
    for declared in (b"abc", b"-5", b"1e3", b""):
        status, answer = send_raw(client.app, [(b"content-length", declared)], body)
        assert status == 400 and answer["error"]["code"] == "invalid_content_length", declared
    status, answer = send_raw(client.app, [(b"content-length", BIG.encode())], body)  # beyond int()'s limit
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    status, _ = send_raw(client.app, [(b"content-length", b"0" * 50 + str(len(body)).encode())], body)
    assert status == 200
