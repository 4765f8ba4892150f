"""Every bad input is a 4xx in OpenAI's error shape with a message that names the problem; never a 500."""

from __future__ import annotations

import pytest

from tests.serving.conftest import AUTH, MODEL


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "1+1=", **body})


def test_malformed_json(client):
    r = client.post("/v1/completions", content=b'{"model": "dylora-moe", "prompt": ', headers={
        "Content-Type": "application/json"})
    error = error_of(r, 400)
    assert "not valid JSON" in error["message"] and error["code"] == "invalid_json"
    assert "must be a JSON object" in error_of(client.post("/v1/completions", json=[1, 2]), 400)["message"]
    assert "empty" in error_of(client.post("/v1/chat/completions", content=b""), 400)["message"]


def test_deeply_nested_json(client):
    r = client.post("/v1/completions", content=b"[" * 100_000, headers={"Content-Type": "application/json"})
    assert "nested too deeply" in error_of(r, 400)["message"]
    lines = b'{"prompt": "a", "response": "b"}\n' + b"[" * 100_000
    r = client.post("/skills", content=lines, params={"name": "x"},
                    headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert "line 2" in error_of(r, 400)["message"]


def test_text_the_tokenizer_cannot_encode(client):
    # a lone surrogate is valid JSON but not Unicode text: the tokenizer refuses it
    body = b'{"model": "dylora-moe", "prompt": "1+\\ud800", "max_tokens": 2}'
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert error_of(r, 400)["param"] == "prompt"
    body = b'{"model": "dylora-moe", "messages": [{"role": "user", "content": "\\ud800"}], "stream": true}'
    r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert error_of(r, 400)["param"] == "messages"


def test_a_tiny_temperature_is_greedy(client):
    greedy = complete(client, max_tokens=3).json()["choices"][0]["text"]
    for temperature in (1e-300, 1e-40):  # logits / temperature would overflow to inf and sampling would fail
        r = complete(client, max_tokens=3, temperature=temperature)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy


def test_unknown_model(client):
    error = error_of(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404)
    assert "'gpt-9' is not served here" in error["message"] and error["code"] == "model_not_found"
    assert error["param"] == "model"
    error_of(client.get("/v1/models/gpt-9"), 404)


@pytest.mark.parametrize("value", [-1, 0, 10**9])
def test_max_tokens_out_of_range(client, value):
    error = error_of(complete(client, max_tokens=value), 400)
    assert error["param"] == "max_tokens" and "between 1 and 512" in error["message"]


def test_max_tokens_of_the_wrong_type_and_chat_variant(client):
    error = error_of(complete(client, max_tokens="five"), 400)
    assert error["param"] == "max_tokens"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}
    assert error_of(client.post("/v1/chat/completions", json=body), 400)["param"] == "max_completion_tokens"


def test_oversize_prompt(client):
    # the tiny model's context is 128 tokens; one token per character
    error = error_of(complete(client, prompt="9" * 200, max_tokens=8), 400)
    assert error["code"] == "context_length_exceeded" and "200 tokens" in error["message"]
    assert "at most 120" in error["message"] and error["param"] == "prompt"
    streamed = client.post("/v1/completions", json={"model": MODEL, "prompt": "9" * 200, "stream": True})
    assert error_of(streamed, 400)["code"] == "context_length_exceeded"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "9" * 200}]}
    assert error_of(client.post("/v1/chat/completions", json=chat), 400)["param"] == "messages"


def test_max_tokens_larger_than_the_context(client):
    error = error_of(complete(client, max_tokens=300), 400)
    assert "context of 128 tokens" in error["message"]


def test_fields_this_server_cannot_honour(client):
    assert error_of(complete(client, n=17), 400)["param"] == "n"
    assert error_of(complete(client, n=0), 400)["param"] == "n"
    assert error_of(complete(client, echo=True), 400)["param"] == "echo"
    assert error_of(complete(client, prompt=["a", "b"]), 400)["param"] == "prompt"
    assert error_of(complete(client, prompt=""), 400)["param"] == "prompt"
    assert error_of(complete(client, temperature=5), 400)["param"] == "temperature"
    assert error_of(complete(client, stop=["a", "b", "c", "d", "e"]), 400)["param"] == "stop"
    bad_role = {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}
    assert error_of(client.post("/v1/chat/completions", json=bad_role), 400)["param"] == "messages.0.role"
    assert error_of(client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400)


def test_body_too_large(client):
    r = client.post("/v1/completions", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert "larger than this server's limit" in error_of(r, 413)["message"]


def test_unknown_endpoint_and_method(client):
    assert "no endpoint GET /v2/nothing" in error_of(client.get("/v2/nothing"), 404)["message"]
    error_of(client.get("/v1/completions"), 405)


@pytest.mark.parametrize(("body", "content_type", "status", "fragment"), [
    (b'{"name": "x", "examples": []}', "application/json", 400, "no examples"),
    (b'{"name": "x", "examples": [{"prompt": "a", "response": 3}]}', "application/json", 400, "examples.0.response"),
    (b'{"name": "x", "examples": [{"prompt": "a", "response": "  "}]}', "application/json", 400, "response is empty"),
    (b'{"name": "x/../y", "examples": [{"prompt": "a", "response": "b"}]}', "application/json", 400, "not allowed"),
    (b'{"name": "x\\n", "examples": [{"prompt": "a", "response": "b"}]}', "application/json", 400, "not allowed"),
    (b'{"name": "x", "examples": [], "run": "rm -rf /"}', "application/json", 400, "run"),
    (b'{"name": "x", "examples": [', "application/json", 400, "not valid JSON"),
    (b'{"prompt": "a", "response": "b"}\nnot json\n', "application/x-ndjson", 400, "line 2"),
    (b'{"prompt": "a", "response": "b"}\n[1]\n', "application/x-ndjson", 400, "line 2"),
    (b'name,prompt\nx,y\n', "text/csv", 415, "Content-Type"),
])
def test_bad_uploads(client, body, content_type, status, fragment):
    params = {"name": "x"} if "ndjson" in content_type else {}
    r = client.post("/skills", content=body, params=params, headers={**AUTH, "Content-Type": content_type})
    assert fragment in error_of(r, status)["message"]


def test_upload_caps(client):
    too_many = [{"prompt": "a", "response": f"{i}"} for i in range(101)]
    r = client.post("/skills", json={"name": "x", "examples": too_many}, headers=AUTH)
    assert "at most 100 per upload" in error_of(r, 413)["message"]
    huge = [{"prompt": "a", "response": "b" * 20_001}]
    assert "20001 characters" in error_of(client.post("/skills", json={"name": "x", "examples": huge},
                                                      headers=AUTH), 413)["message"]
    lines = b'{"prompt": "a", "response": "b"}\n'
    r = client.post("/skills", content=lines, headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert "name" in error_of(r, 400)["message"]


def test_unknown_job(client):
    assert error_of(client.get("/jobs/job-nope", headers=AUTH), 404)["code"] == "job_not_found"


def test_errors_are_counted(client):
    client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert 'dylora_errors_total{kind="model_not_found",status="404"}' in client.get("/metrics").text
