"""Hostile traffic in bulk: a table of malformed and adversarial requests against every endpoint, and
property-based bodies (hypothesis) for the generation endpoints. Every answer is below 500, every 4xx is in
OpenAI's error shape, and the system folder still loads afterwards."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dylora_moe import DyLoRAMoE
from tests.serving.conftest import AUTH, KEY, MODEL

OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "1+1="}], "max_tokens": 2}
OK_COMPLETION = {"model": MODEL, "prompt": "1+1=", "max_tokens": 2}
JSON = {"Content-Type": "application/json"}
JSONL = {"Content-Type": "application/x-ndjson"}


def body(value) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def with_field(base: dict, **fields) -> bytes:
    return body({**base, **fields})


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# values that every typed field must refuse cleanly (wrong type, out of range, absurd size, odd unicode)
ODD_VALUES = [None, True, -1, 0, 2**70, 1e308, -0.0, "", "x" * 10_000, [], [None], {}, {"a": 1}, "\u2028", "\x00"]
ODD_LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"9" * 5000, b'"\\ud800"', b'"\\udfff\\ud800"', b"1e999"]


def generation_cases() -> list[tuple[str, bytes]]:
    cases = []
    for path, base in (("/v1/completions", OK_COMPLETION), ("/v1/chat/completions", OK_CHAT)):
        for name in ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "stream_options"):
            cases += [(path, with_field(base, **{name: v})) for v in ODD_VALUES]
            cases += [(path, json.dumps(base)[:-1].encode() + b', "' + name.encode() + b'": ' + lit + b"}")
                      for lit in ODD_LITERALS]
        cases += [(path, b""), (path, b"{"), (path, b"[]"), (path, b"null"), (path, b'"text"'), (path, b"\xff\xfe"),
                  (path, deep(100_000)), (path, with_field(base, model="nope")), (path, body({"model": MODEL})),
                  (path, with_field(base, max_tokens=10**6)), (path, with_field(base, stop=["a"] * 1000)),
                  (path, with_field(base, logprobs=5)), (path, with_field(base, stream=True, n=3))]
    completion = "/v1/completions"
    cases += [(completion, with_field(OK_COMPLETION, prompt=v)) for v in
              [None, 7, [], [1, 2], ["a", "b"], [["a"]], "\ud800", "1" * 200_000, {"text": "a"}]]
    chat = "/v1/chat/completions"
    messages = [[], [{}], [{"role": "tool", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 5}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
                [{"role": "user", "content": [{"type": "text"}]}], "hello", [{"role": "user", "content": "\ud800"}],
                [{"role": "user", "content": "a"}] * 5000]
    cases += [(chat, with_field(OK_CHAT, messages=m)) for m in messages]
    cases += [(chat, with_field(OK_CHAT, tools=[{"type": "function", "function": {"name": "f"}}])),
              (chat, with_field(OK_CHAT, response_format={"type": "json_schema"})),
              (chat, with_field(OK_CHAT, function_call="auto"))]
    return cases


def upload_cases() -> list[tuple[str, bytes, dict]]:
    cases = [("/skills", b"", JSON), ("/skills", b"{", JSON), ("/skills", deep(50_000), JSON),
             ("/skills", body({"name": "x"}), JSON), ("/skills", body({"name": "x", "examples": []}), JSON),
             ("/skills", body({"name": "../../etc", "examples": [{"response": "a"}]}), JSON),
             ("/skills", body({"name": "x\n", "examples": [{"response": "a"}]}), JSON),
             ("/skills", body({"name": "x", "examples": [{"prompt": "a", "response": ""}]}), JSON),
             ("/skills", body({"name": "x", "examples": [{"prompt": "\ud800", "response": "a"}]}), JSON),
             ("/skills", body({"name": "x", "examples": [{"prompt": 1, "response": "a"}]}), JSON),
             ("/skills", body({"name": "x", "examples": "all"}), JSON),
             ("/skills", body({"name": "x", "examples": [{"prompt": "a", "response": "b"}], "chat": "yes"}), JSON),
             ("/skills", body({"name": "x", "examples": [{"prompt": "a" * 30_000, "response": "b"}]}), JSON),
             ("/skills", b'{"name": "x", "examples": [{"prompt": "a", "response": ' + b"9" * 5000 + b"}]}", JSON),
             ("/skills", b"prompt,response\na,b\n", {"Content-Type": "text/csv"}),
             ("/skills?name=x", b'{"response": "a"}\n[1]\n', JSONL),
             ("/skills?name=x", b'{"response": "a"}\n{"response": "\\ud800"}\n', JSONL),
             ("/skills?name=x", b'{"response": "a"}\n{bad json\n', JSONL),
             ("/skills?name=x", b"\xff\xfe\n", JSONL), ("/skills", b'{"response": "a"}\n', JSONL),
             ("/skills?name=x&chat=maybe", b'{"response": "a"}\n', JSONL), ("/skills?name=x", b"", JSONL)]
    return [(path, raw, {**headers, **AUTH}) for path, raw, headers in cases]


def other_cases() -> list[tuple[str, str, dict, bytes]]:
    wrong_key = {"Authorization": "Bearer wrong"}
    return [("GET", "/jobs", {}, b""), ("GET", "/jobs", wrong_key, b""), ("GET", "/jobs/job-x", AUTH, b""),
            ("GET", "/jobs/" + "a" * 5000, AUTH, b""), ("GET", "/jobs/%00", AUTH, b""),
            ("POST", "/skills", {}, body({"name": "x", "examples": [{"response": "a"}]})),
            ("POST", "/skills", wrong_key, body({"name": "x", "examples": [{"response": "a"}]})),
            ("POST", "/skills", {"Authorization": "Basic " + KEY}, b"{}"),
            ("GET", "/v1/models/nope", {}, b""), ("GET", "/v1/models/" + "%ff" * 100, {}, b""),
            ("DELETE", "/v1/models", {}, b""), ("PUT", "/v1/completions", {}, b"{}"),
            ("PATCH", "/skills", AUTH, b"{}"), ("BREW", "/v1/completions", {}, b""),
            ("GET", "/v1/completions", {}, b""), ("GET", "/nowhere", {}, b""), ("GET", "/experts/..%2f..", {}, b""),
            ("POST", "/v1/completions", {"Content-Type": "text/plain"}, body(OK_COMPLETION)),
            ("POST", "/v1/completions", {"Content-Length": "99999999999"}, body(OK_COMPLETION)),
            ("POST", "/v1/completions", {}, b"x" * (2 << 20))]


CASES = ([("POST", path, JSON, raw) for path, raw in generation_cases()]
         + [("POST", path, headers, raw) for path, raw, headers in upload_cases()] + other_cases())


def check_answer(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)


def test_the_table_has_at_least_a_hundred_cases():
    assert len(CASES) >= 100


@pytest.fixture(scope="module")
def hostile_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from dylora_moe.serving import create_app
    from tests.serving.conftest import learned_run, server_config

    run = learned_run(tmp_path_factory.mktemp("hostile"))
    with TestClient(create_app(run, server_config(max_upload_examples=100)), raise_server_exceptions=False) as client:
        yield client, run


def test_no_hostile_request_gets_a_server_error(hostile_client):
    client, run = hostile_client
    statuses = []
    for method, path, headers, raw in CASES:
        response = client.request(method, path, content=raw, headers=headers)
        check_answer(response)
        statuses.append(response.status_code)
    assert statuses.count(200) < len(statuses) // 10  # the table is made of bad requests
    assert 'kind="internal_error"' not in client.get("/metrics").text
    assert client.post("/v1/completions", json=OK_COMPLETION).status_code == 200
    assert DyLoRAMoE.from_pretrained(run / "system").experts.expert_ids == [0]  # the folder still loads


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
FIELDS = st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stream",
                          "stop", "stream_options", "logprobs", "echo", "suffix", "tools", "response_format",
                          "max_completion_tokens"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       changes=st.dictionaries(FIELDS, JSON_VALUES, max_size=3),
       drop=st.sets(st.sampled_from(["model", "prompt", "messages", "max_tokens"]), max_size=2))
def test_generated_request_bodies_never_get_a_server_error(hostile_client, path, changes, drop):
    client, _ = hostile_client
    base = OK_COMPLETION if path == "/v1/completions" else OK_CHAT
    request = {k: v for k, v in {**base, **changes}.items() if k not in drop}
    if isinstance(request.get("max_tokens"), int) and not isinstance(request["max_tokens"], bool):
        request["max_tokens"] = max(-5, min(request["max_tokens"], 4))  # keep generation short, not valid
    if isinstance(request.get("max_completion_tokens"), int):
        request["max_completion_tokens"] = min(request["max_completion_tokens"], 4)
    check_answer(client.post(path, content=json.dumps(request, allow_nan=True), headers=JSON))
