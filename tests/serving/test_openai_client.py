"""The official ``openai`` client talks to the server over a real loopback socket."""

from __future__ import annotations

import httpx
import openai

from dylora_moe.serving import BackgroundServer, create_app
from tests.serving.conftest import MODEL, server_config


def test_openai_client_gets_completions_and_streams(run_dir):
    with BackgroundServer(create_app(run_dir, server_config())) as server:
        assert server.url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-for-completions", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]

        completion = client.completions.create(model=MODEL, prompt="6+6=", max_tokens=4)
        assert completion.object == "text_completion" and isinstance(completion.choices[0].text, str)
        assert completion.usage.prompt_tokens == 4
        assert completion.model_extra["routing"]["experts"][0]["expert_id"] == 0

        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "6+6="}],
                                              max_tokens=4)
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")

        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "6+6="}], max_tokens=4, stream=True) if c.choices]
        assert "".join(pieces) == chat.choices[0].message.content

        raw = client.completions.with_raw_response.create(model=MODEL, prompt="6+6=", max_tokens=1)
        assert "expert_id" in raw.headers["x-dylora-routing"]

        try:
            client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
        except openai.NotFoundError as err:
            assert "not served here" in str(err)
        else:
            raise AssertionError("an unknown model must fail")
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
