"""The ingress's calls to the generation replicas, with fake Ray handles: a client that goes away cancels its
call, so the replica stops generating for nobody."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from dylora_moe.serving import ray_app
from dylora_moe.serving.config import ServerConfig
from dylora_moe.serving.ray_ingress import RayEngine
from dylora_moe.serving.requests import GenerationRequest


class FakeStream:
    """A streaming ``DeploymentResponseGenerator``: routing, then deltas for as long as it is not cancelled."""

    def __init__(self) -> None:
        self.cancelled = False
        self.sent = 0

    def __aiter__(self):
        return self._items()

    async def _items(self):
        yield {"routing": {"strategy": "none", "experts": []}, "replica": "r", "version": "v"}
        while not self.cancelled and self.sent < 100:
            self.sent += 1
            await asyncio.sleep(0)
            yield {"delta": (0, "x")}

    def cancel(self) -> None:
        self.cancelled = True


class FakeResponse:
    """A unary ``DeploymentResponse`` that answers only when cancelled (then raises)."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        await self.cancelled.wait()
        raise RuntimeError("request cancelled")

    def cancel(self) -> None:
        self.cancelled.set()


class FakeGenerator:
    def __init__(self, call) -> None:
        self.call = call

    def options(self, **_):
        return SimpleNamespace(generate=SimpleNamespace(remote=lambda payload: self.call),
                               generate_stream=SimpleNamespace(remote=lambda payload: self.call))


def engine(call) -> RayEngine:
    return RayEngine(head=None, generator=FakeGenerator(call), config=ServerConfig(), metrics=None)


def test_a_stream_whose_client_left_is_cancelled_on_the_replica():
    stream = FakeStream()
    req = GenerationRequest("1+1=", 100)

    def on_event(kind, payload):
        if kind == "delta" and stream.sent >= 2:
            req.cancelled = True  # the app's stream sets this when its client goes away

    req.on_event = on_event
    answer = asyncio.run(engine(stream)._ask(req, "v:none", {}, [False]))
    assert answer["error"]["code"] == "client_disconnected"
    assert stream.cancelled and stream.sent < 5


def test_a_completion_whose_client_left_is_cancelled_on_the_replica():
    async def main():
        response = FakeResponse()
        req = GenerationRequest("1+1=", 100)
        asked = asyncio.ensure_future(engine(response)._ask(req, "v:none", {}, [False]))
        await asyncio.sleep(0.05)
        req.cancelled = True  # until_disconnected sets this when the client goes away
        answer = await asyncio.wait_for(asked, 5)
        return response, answer

    response, answer = asyncio.run(main())
    assert response.cancelled.is_set()
    assert answer["error"]["code"] == "client_disconnected"


def test_a_cancelled_call_stops_the_replicas_generation(monkeypatch):
    req = GenerationRequest("1+1=", 100)
    running = Future()
    running.set_running_or_notify_cancel()  # the engine is generating it: only the flag can stop it
    system = SimpleNamespace(using_enter=lambda held: None, using_exit=lambda held: False)
    replica = SimpleNamespace(system=system, engine=SimpleNamespace(submit=lambda r: running))

    async def prepare(replica_, payload):
        return object(), req, {}

    monkeypatch.setattr(ray_app, "prepare", prepare)

    async def main():
        call = asyncio.ensure_future(ray_app.replica_generate(replica, {}))
        await asyncio.sleep(0.05)
        call.cancel()  # what Ray does to the replica's coroutine when the ingress cancels the call
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(main())
    assert req.cancelled


def test_a_submitted_request_is_held_until_it_ends(monkeypatch):
    async def main():
        eng = engine(None)
        release = asyncio.Event()

        async def run(request):
            await release.wait()

        monkeypatch.setattr(eng, "_run", run)
        eng.submit(GenerationRequest("1+1=", 4))
        held = len(eng.tasks)
        release.set()
        for _ in range(3):
            await asyncio.sleep(0)
        return held, len(eng.tasks)

    assert asyncio.run(main()) == (1, 0)


def test_the_ingress_describes_the_latest_save_before_any_completion(tmp_path):
    from fastapi.testclient import TestClient

    from dylora_moe.serving.app import create_app
    from dylora_moe.serving.ray_ingress import following_saves
    from dylora_moe.serving.routing_head import RoutingHead
    from dylora_moe.serving.system import ServedSystem
    from tests.serving.conftest import two_skill_run

    run = two_skill_run(tmp_path)
    head = RoutingHead(run)
    idle = SimpleNamespace(close=lambda: None, jobs={})
    app = following_saves(create_app(head, ServerConfig(), engine=idle, jobs=idle), head)
    with TestClient(app) as client:
        before = client.get("/experts").json()
        full = ServedSystem(run)
        full.model.mark_mature(1, False)  # a new save, as a finished skill job makes
        full.save(full.model, full.memory)
        after = client.get("/experts").json()
        health = client.get("/health").json()
    assert before["routing_strategy"] == "sparse" and after["routing_strategy"] == "dense"
    assert after["system_version"] != before["system_version"]
    assert health["system_version"] == after["system_version"]


def test_a_stale_answer_reloads_the_save_off_the_event_loop_and_routes_again():
    """A replica that answers "stale" (the system changed under the request) makes the ingress pick up the new
    save in a worker thread, not on the event loop every other request waits on, then ask again."""
    import threading

    answers = [{"stale": True}, {"error": {"status": 418, "message": "teapot", "type": "x", "code": "y", "param": None,
                                             "headers": None}}]

    class Once:
        def __await__(self):
            async def next_answer():
                return answers.pop(0)
            return next_answer().__await__()

        def cancel(self):
            pass

    loop_thread, refreshed_in, routed = [], [], []
    head = SimpleNamespace(refresh=lambda: refreshed_in.append(threading.current_thread()))
    counter = SimpleNamespace(labels=lambda *_: SimpleNamespace(inc=lambda: None))
    eng = RayEngine(head=head, generator=FakeGenerator(None), config=ServerConfig(),
                    metrics=SimpleNamespace(retries=counter))
    eng.generator.options = lambda **_: SimpleNamespace(generate=SimpleNamespace(remote=lambda payload: Once()))
    eng._route = lambda req: routed.append(req) or ({"strategy": "none", "experts": []}, "v:none")

    async def generate():
        loop_thread.append(threading.current_thread())
        return await eng._generate(GenerationRequest("1+1=", 4))

    with pytest.raises(Exception, match="teapot"):
        asyncio.run(generate())
    assert len(routed) == 2 and len(refreshed_in) == 1 and refreshed_in[0] is not loop_thread[0]


@pytest.mark.parametrize("failure", ["timeout", "died"])
def test_a_skill_job_actor_that_does_not_answer_gets_a_retryable_503(monkeypatch, failure):
    from ray.exceptions import ActorDiedError, GetTimeoutError

    from dylora_moe.serving import ray_ingress
    from dylora_moe.serving.errors import APIError

    def get(ref, timeout=None):
        raise GetTimeoutError(f"no answer in {timeout}s") if failure == "timeout" else ActorDiedError()

    monkeypatch.setattr(ray_ingress.ray, "get", get)
    call = SimpleNamespace(remote=lambda *args: "ref")
    jobs = ray_ingress.RemoteJobs(SimpleNamespace(submit=call, get=call, list=call), timeout=0.5)
    for ask in (lambda: jobs.submit("upload"), lambda: jobs.get("job-1"), lambda: jobs.jobs):
        with pytest.raises(APIError) as err:
            ask()
        assert err.value.status == 503 and "Retry-After" in err.value.headers
