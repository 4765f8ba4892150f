"""OpenAI-shaped responses, streaming, routing in header and body, the registry endpoints, metrics."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from dylora_moe.serving import ROUTING_HEADER
from tests.serving.conftest import MODEL


def routing_of(response) -> dict:
    header = json.loads(response.headers[ROUTING_HEADER])
    return header


def test_completion_is_openai_shaped_and_says_how_it_was_routed(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "3+3=", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == MODEL
    (choice,) = body["choices"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length") and choice["index"] == 0
    usage = body["usage"]
    assert usage["prompt_tokens"] == 4 and 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["routing"] == routing_of(r)
    assert body["routing"]["strategy"] == "sparse"  # the only expert is mature
    assert body["routing"]["experts"] == [{"expert_id": 0, "skill": "digits", "weight": 1.0}]


def test_chat_completion_without_a_chat_template_renders_roles(client):
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": [{"type": "text", "text": "2+2="}]}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    # "system: Add.\nuser: 2+2=\nassistant:" with one token per character
    assert body["usage"]["prompt_tokens"] == len("system: Add.\nuser: 2+2=\nassistant:")
    assert body["routing"] == routing_of(r) and body["routing"]["experts"][0]["expert_id"] == 0


def sse(text: str) -> list:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.strip()]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streamed_chat_matches_the_plain_answer(client):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "5+5="}], "max_tokens": 6}
    plain = client.post("/v1/chat/completions", json=request).json()
    r = client.post("/v1/chat/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["routing"] == routing_of(r) == plain["routing"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_streamed_completion(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "7+7=", "max_tokens": 4, "stream": True})
    chunks = sse(r.text)
    assert all(c["object"] == "text_completion" for c in chunks)
    plain = client.post("/v1/completions", json={"model": MODEL, "prompt": "7+7=", "max_tokens": 4}).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert routing_of(r) == plain["routing"]


def test_stop_sequences_cut_the_text(client):
    request = {"model": MODEL, "prompt": "4+4=", "max_tokens": 8}
    full = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    assert len(full) >= 4
    stop = full[2:4]
    cut = client.post("/v1/completions", json={**request, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"
    chunks = sse(client.post("/v1/completions", json={**request, "stop": stop, "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]


def test_sampling_is_accepted(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "1+1=", "max_tokens": 3, "temperature": 0.8,
                                             "top_p": 0.9, "user": "someone", "presence_penalty": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_models_experts_skills_health(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["object"] == "list"
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    experts = client.get("/experts").json()
    assert experts["data"][0]["expert_id"] == 0 and experts["data"][0]["mature"] is True
    assert experts["data"][0]["skills"] == [{"skill_id": 0, "name": "digits"}]
    assert client.get("/skills").json()["data"][0]["name"] == "digits"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["experts"] >= 1


def metric_values(client) -> dict:
    """``{(sample name, sorted labels): value}`` of every sample on ``/metrics``."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples}


def test_metrics_count_requests_tokens_and_routing(client):
    before = metric_values(client)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "2+2=", "max_tokens": 2})
    usage = r.json()["usage"]
    after = metric_values(client)

    def grew(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    latency = (("endpoint", "/v1/completions"), ("method", "POST"), ("status", "200"))
    assert grew("dylora_request_seconds_count", latency) == 1
    assert grew("dylora_prompt_tokens_total") == usage["prompt_tokens"] == 4
    assert grew("dylora_generated_tokens_total") == usage["completion_tokens"] >= 1
    assert grew("dylora_generation_tokens_per_second_count") == 1
    assert grew("dylora_expert_routed_total", (("expert", "0"),)) == 1
    assert grew("dylora_expert_routing_weight_total", (("expert", "0"),)) == 1.0
    assert after[("dylora_experts", ())] == 1
    assert after[("dylora_routing_strategy", (("strategy", "sparse"),))] == 1
    assert after[("dylora_routing_strategy", (("strategy", "dense"),))] == 0


def test_an_error_during_a_stream_is_reported_and_counted(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr("dylora_moe.serving.continuous.choose", broken)  # fails after the routing is sent
    before = metric_values(client)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "8+8=", "max_tokens": 2, "stream": True})
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line.strip()]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "generation_failed"
    key = ("dylora_errors_total", (("kind", "generation_failed"), ("status", "500")))
    assert metric_values(client)[key] - before.get(key, 0.0) == 1


def test_n_choices_are_returned_in_openai_shape_streamed_or_not(client):
    body = {"model": MODEL, "prompt": "3+3=", "max_tokens": 3, "n": 2}
    plain = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in plain["choices"]] == [0, 1]
    assert plain["choices"][0]["text"] == plain["choices"][1]["text"]  # greedy: the same answer twice
    one = client.post("/v1/completions", json={**body, "n": 1}).json()
    assert plain["usage"]["completion_tokens"] == 2 * one["usage"]["completion_tokens"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "3+3="}], "max_tokens": 3, "n": 3}
    expected = [c["message"]["content"] for c in client.post("/v1/chat/completions", json=chat).json()["choices"]]
    r = client.post("/v1/chat/completions", json={**chat, "stream": True})
    chunks = [json.loads(line.removeprefix("data: ")) for line in r.text.split("\n\n")
              if line.strip() and line != "data: [DONE]"]
    texts, finished = ["", "", ""], [None, None, None]
    for chunk in chunks:
        for c in chunk["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
            finished[c["index"]] = c["finish_reason"] or finished[c["index"]]
    assert texts == expected and None not in finished
