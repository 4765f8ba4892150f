"""The ingress side of the Ray deployment: generation and skill jobs reached through Ray, behind the same app.

``RayEngine`` keeps the single-process ``Engine``'s contract (``submit(request) -> Future`` of a
``Generation``): it checks the prompt with the engine's own limits, routes it with the ``RoutingHead`` and
sends it to the generation deployment under the multiplexed model id of the experts it needs. A replica that
died, or a system version that changed under the request, costs another try; after ``attempts`` the client gets
a retryable 503. ``RemoteJobs`` is the ``JobManager`` interface the app uses, answered by the ``SkillJobs``
actor. ``RayMetrics`` adds the replica and expert of every answer to the server's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from dataclasses import dataclass

import ray
import torch
from prometheus_client import Counter, Gauge
from ray.exceptions import GetTimeoutError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.concurrency import run_in_threadpool

from ..checkpoint import writer_lock
from .config import ServerConfig
from .engine import Engine, Generation, GenerationRequest
from .errors import APIError
from .jobs import JobManager
from .metrics import Metrics
from .requests import Choice
from .routing_head import RoutingHead
from .routing_info import route_prompt, summarise
from .system import ServedSystem, SystemFiles

logger = logging.getLogger("dylora_moe.serving")

# A replica that died or is being replaced: the request may go to another one.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)
NO_EXPERTS = "none"


def expert_key(version: str, routing: dict, expert_ids: list[int]) -> str:
    """The multiplexed model id of a request: ``version:ids``. Sparse routing needs the experts it selected (one
    under top-1), dense routing every expert of the pool (each has a non-zero weight), an empty pool none."""
    sparse = routing["strategy"] == "sparse"
    ids = sorted(e["expert_id"] for e in routing["experts"]) if sparse else sorted(expert_ids)
    return f"{version}:{'+'.join(map(str, ids)) or NO_EXPERTS}"


def parse_key(key: str) -> tuple[str, tuple[int, ...]]:
    version, sep, ids = key.partition(":")
    if not sep or not version:
        raise ValueError(f"multiplexed model id {key!r} is not 'version:ids'")
    return version, () if ids == NO_EXPERTS else tuple(int(i) for i in ids.split("+"))


def same_routing(got: dict, expected: dict, tol: float = 1e-4) -> bool:
    """Whether a replica routed a prompt as the ingress did: same strategy, experts and weights."""
    a, b = got.get("experts", []), expected.get("experts", [])
    ids = [e["expert_id"] for e in a] == [e["expert_id"] for e in b]
    return (got.get("strategy") == expected.get("strategy") and ids
            and all(abs(x["weight"] - y["weight"]) <= tol for x, y in zip(a, b, strict=True)))


def gone() -> dict:
    """The answer to a request whose client went away."""
    return {"error": error_to_wire(APIError(499, "the client went away", code="client_disconnected"))}


def error_to_wire(err: APIError) -> dict:
    return {"status": err.status, "message": err.message, "param": err.param, "code": err.code, "type": err.type,
            "headers": err.headers}


def error_from_wire(data: dict) -> APIError:
    return APIError(data["status"], data["message"], param=data["param"], code=data["code"], type=data["type"],
                    headers=data["headers"])


class RayMetrics(Metrics):
    """The server's metrics plus, per answer, the replica that generated it and its top expert."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.replica_requests = Counter("dylora_replica_requests", "completions answered, by generation replica "
                                        "and top expert", ["replica", "expert"], registry=r)
        self.replica_seconds = Counter("dylora_replica_generation_seconds", "generation time, by replica and top "
                                       "expert", ["replica", "expert"], registry=r)
        self.resident = Gauge("dylora_replica_expert_resident", "1 while the replica holds the expert (as of its "
                              "last answer)", ["replica", "expert"], registry=r)
        self.retries = Counter("dylora_ray_retries", "requests tried again, by reason", ["reason"], registry=r)

    def observe_answer(self, replica: str, routing: dict, seconds: float, resident: list[int],
                       version_experts: list[int]) -> None:
        experts = routing.get("experts") or []
        top = str(experts[0]["expert_id"]) if experts else NO_EXPERTS
        self.replica_requests.labels(replica, top).inc()
        self.replica_seconds.labels(replica, top).inc(seconds)
        for e in version_experts:
            self.resident.labels(replica, str(e)).set(1.0 if e in resident else 0.0)


def following_saves(app, head: RoutingHead):
    """Every request through the ingress first picks up a newer save of the folder (one ``stat`` when there is
    none), so ``/experts``, ``/skills``, ``/health`` and ``/v1/models`` describe the system a completion would
    now use, not the one the last completion used."""

    @app.middleware("http")
    async def refresh(request, call_next):
        await run_in_threadpool(head.refresh)
        return await call_next(request)

    return app


class RayEngine:
    """``Engine.submit`` over the generation deployment (a ``DeploymentHandle``)."""

    def __init__(self, head: RoutingHead, generator, config: ServerConfig, metrics: RayMetrics,
                 attempts: int = 3) -> None:
        self.head = head
        self.generator = generator
        self.config = config
        self.metrics = metrics
        self.attempts = attempts
        # the single-process engine's prompt checks, run here so a bad prompt never reaches a replica
        self._limits = types.SimpleNamespace(config=config)
        # the event loop keeps only weak references to tasks: a request's task is held here until it ends, or it
        # could be collected mid-flight and its client would wait forever
        self.tasks: set[asyncio.Task] = set()

    def submit(self, request: GenerationRequest):
        task = asyncio.get_running_loop().create_task(self._run(request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return request.future

    def close(self) -> None:
        pass

    async def _run(self, req: GenerationRequest) -> None:
        if not req.future.set_running_or_notify_cancel():
            return  # (the ingress's middleware has picked up the latest save for this request: following_saves)
        if not Engine._prepare(self._limits, self.head.model, req):  # the future holds its 400
            return
        try:
            req.future.set_result(await self._generate(req))
        except Exception as err:
            req.future.set_exception(err)

    def _route(self, req: GenerationRequest) -> tuple[dict, str]:
        with self.head.lock, torch.no_grad():
            ids = torch.tensor([req.prompt_ids])
            full = route_prompt(self.head.model, ids, torch.ones_like(ids))[0]
            # the replica reports the routing as a response does (the heaviest experts); the experts it needs
            # come from the whole routing
            routing = summarise(full, self.config.routing_top, self.config.routing_min_weight)
            return routing, expert_key(self.head.version, full, self.head.model.experts.expert_ids)

    async def _generate(self, req: GenerationRequest) -> Generation:
        payload = {"prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": req.temperature,
                   "top_p": req.top_p, "stop": req.stop, "chat": req.chat, "param": req.param, "n": req.n}
        for attempt in range(self.attempts):
            routing, key = self._route(req)
            streamed = [False]  # whether text already went to the client: then a failure cannot be retried
            try:
                answer = await self._ask(req, key, {**payload, "routing": routing}, streamed)
            except REPLICA_GONE as err:
                if streamed[0]:
                    raise APIError(503, "the generation replica stopped during the stream: retry the request",
                                   type="server_error", code="replicas_unavailable",
                                   headers={"Retry-After": "1"}) from err
                self.metrics.retries.labels("replica_unavailable").inc()
                logger.warning("generation replica unavailable: trying again", extra={"fields": {
                    "event": "retry", "reason": type(err).__name__, "attempt": attempt + 1}})
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if "stale" in answer:  # the system changed under the request: route it again on the new version
                self.metrics.retries.labels("stale_version").inc()
                await run_in_threadpool(self.head.refresh)  # loading a save off the event loop
                continue
            if "error" in answer:
                raise error_from_wire(answer["error"])
            return self._finish(answer)
        raise APIError(503, f"no generation replica could answer after {self.attempts} tries (replicas restarting "
                            "or the system being updated): retry in a moment", type="server_error",
                       code="replicas_unavailable", headers={"Retry-After": "1"})

    async def _ask(self, req: GenerationRequest, key: str, payload: dict, streamed: list[bool]) -> dict:
        """The replica's answer; a stream's routing and text go to ``req.on_event`` as they arrive. A client that
        goes away (``req.cancelled``) cancels the call, which stops the replica's generation at the next token:
        merely leaving the stream would let the replica generate to ``max_tokens`` for nobody."""
        handle = self.generator.options(multiplexed_model_id=key, stream=req.on_event is not None)
        if req.on_event is None:
            return await self._unary(handle.generate.remote(payload), req)
        stream = handle.generate_stream.remote(payload)
        async for item in stream:
            if "routing" in item:
                req.on_event("routing", {**item["routing"], "replica": item["replica"],
                                         "system_version": item["version"]})
                streamed[0] = True
            elif "delta" in item:
                req.on_event("delta", item["delta"])
            else:
                return item
            if req.cancelled:  # the client went away
                stream.cancel()
                break
        return gone()

    @staticmethod
    async def _unary(response, req: GenerationRequest, poll: float = 0.25) -> dict:
        """A non-streamed call's answer, cancelled when its client goes away meanwhile."""

        async def answer():
            return await response

        waiting = asyncio.ensure_future(answer())
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=poll)
            if done:
                return waiting.result()
            if req.cancelled:
                response.cancel()
                waiting.cancel()
                return gone()

    def _finish(self, answer: dict) -> Generation:
        data = answer["generation"]
        gen = Generation(**{**data, "choices": [Choice(**c) for c in data["choices"]]})
        gen.routing = {**gen.routing, "replica": answer["replica"], "system_version": answer["version"]}
        self.metrics.observe_routing(gen.routing)
        self.metrics.observe_generation(gen.prompt_tokens, gen.completion_tokens, gen.seconds)
        self.metrics.observe_answer(answer["replica"], gen.routing, gen.seconds, answer["resident"],
                                    self.head.model.experts.expert_ids)
        return gen


@ray.remote(num_cpus=0, max_concurrency=4)
class SkillJobs:
    """The skill-job worker of ``dylora serve`` as a Ray actor: it holds the system folder's writer lock for its
    lifetime (no other server, training run or ``dylora experts delete`` may write the folder meanwhile) and
    runs one ``JobManager``, which learns uploads one at a time and saves each new system atomically; the
    ingress and the replicas pick the new version up from the folder."""

    def __init__(self, path: str, config: ServerConfig, overrides: dict) -> None:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(writer_lock(SystemFiles.locate(path).system, who="dylora serve --ray"))
        self.system = ServedSystem(path, **overrides)
        self.manager = JobManager(self.system, config, Metrics())

    def ready(self) -> bool:
        return True

    def submit(self, upload) -> dict:
        try:
            return {"job": self.manager.submit(upload).to_dict()}
        except APIError as err:
            return {"error": error_to_wire(err)}

    def get(self, job_id: str) -> dict:
        try:
            return {"job": self.manager.get(job_id).to_dict()}
        except APIError as err:
            return {"error": error_to_wire(err)}

    def list(self) -> list[dict]:
        return [j.to_dict() for j in self.manager.jobs.values()]


@dataclass
class JobView:
    """A job as the actor reported it, with the attributes the app reads from a ``SkillJob``."""

    data: dict

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def status(self) -> str:
        return self.data["status"]

    def to_dict(self) -> dict:
        return self.data


class RemoteJobs:
    """``JobManager``'s interface to the app, answered by a ``SkillJobs`` actor (``None``: uploads are off, and
    the app refuses them before asking)."""

    def __init__(self, actor, timeout: float = 30.0) -> None:
        self.actor = actor
        self.timeout = timeout

    def _call(self, method: str, *args):
        if self.actor is None:
            raise APIError(403, "this deployment has no API key: skill uploads are off", code="api_key_not_configured")
        try:
            answer = ray.get(getattr(self.actor, method).remote(*args), timeout=self.timeout)
        except GetTimeoutError as err:
            raise APIError(503, f"the skill-job worker did not answer within {self.timeout:g}s: retry in a moment "
                                "(GET /jobs lists the jobs it has accepted)", type="server_error",
                           code="skill_jobs_unavailable", headers={"Retry-After": "5"}) from err
        except RayActorError as err:
            raise APIError(503, "the skill-job worker is unavailable (its actor stopped or is restarting): retry in "
                                "a moment", type="server_error", code="skill_jobs_unavailable",
                           headers={"Retry-After": "5"}) from err
        if isinstance(answer, dict) and "error" in answer:
            raise error_from_wire(answer["error"])
        return answer

    def submit(self, upload) -> JobView:
        return JobView(self._call("submit", upload)["job"])

    def get(self, job_id: str) -> JobView:
        return JobView(self._call("get", job_id)["job"])

    @property
    def jobs(self) -> dict[str, JobView]:
        if self.actor is None:
            return {}
        return {j["id"]: JobView(j) for j in self._call("list")}

    def close(self) -> None:
        pass
