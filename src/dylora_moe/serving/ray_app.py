"""``dylora serve DIR --ray``: the same OpenAI-compatible API on Ray Serve, with generation spread over replicas
that load experts on demand.

    dylora serve runs/demo --ray                                   # a local Ray cluster, 2 replicas
    dylora serve runs/demo --ray --address auto --replicas 8 --experts-per-replica 4 --replica-gpus 1
    dylora serve runs/demo --ray --max-replicas 16 --target-ongoing-requests 4   # autoscaling

Three parts, all reading the one system folder (shared storage on a multi-node cluster):

- ``Ingress`` (HTTP, ``create_app`` unchanged): checks each request, routes it with the ``RoutingHead`` (an
  embedding lookup and the gate) and sends it to ``Generator`` under the multiplexed model id
  ``version:experts``. Routing, errors, API keys, the routing header and the metrics are those of
  ``dylora serve``; answers also name the replica and the system version in their routing.
- ``Generator`` replicas hold the backbone and load experts by id (``serve.multiplexed``, LRU,
  ``experts_per_replica`` ids per replica); Ray Serve sends a request to a replica that already holds its id
  when there is one. Each runs the single-process ``Engine`` (batches, limits, streaming deltas) on a
  ``ReplicaSystem`` and checks that it routed the prompt as the ingress did, so an answer is never generated
  with other experts than the routing says.
- ``SkillJobs``: uploads are learned by the single-process ``JobManager`` inside one actor that holds the
  folder's writer lock; each learned skill is saved atomically as a new version of the folder.

Policy for which replica holds what: once every expert is mature and top-1, an id is one expert, so a replica
holds ``experts_per_replica`` experts and requests for an expert go where it is loaded. With top-k > 1 an id is
the selected set (its experts count once each in the replica's memory, however many ids share them). While the
router is dense (some expert still immature) every request needs every expert: the id is the whole pool, every
replica that serves holds all of it, and multiplexing only matters again once the pool is mature.

Version pickup: the ingress compares the folder's manifest (one ``stat``) before routing each request and
reloads the gate and library when a save replaced it; a replica reads the new version when the first request
routed on it arrives. A request routed on a version that a save replaced in the meantime is routed again on the
new one (``attempts``), so uploads never fail requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import asdict
from pathlib import Path

import ray
from ray import serve

from .app import create_app
from .config import ServerConfig
from .engine import Engine, GenerationRequest
from .errors import APIError
from .metrics import Metrics
from .ray_config import RayServeConfig
from .ray_ingress import (
    RayEngine,
    RayMetrics,
    RemoteJobs,
    SkillJobs,
    error_to_wire,
    following_saves,
    parse_key,
    same_routing,
)
from .replica import ReplicaSystem, StaleVersion
from .routing_head import RoutingHead

logger = logging.getLogger("dylora_moe.serving")

GENERATOR, INGRESS = "Generator", "Ingress"


def generator_deployment(ray_config: RayServeConfig):
    """The generation deployment; built per configuration, since the LRU size is fixed where it is declared."""

    @serve.deployment(name=GENERATOR, **ray_config.generator_options())
    class Generator:
        def __init__(self, path: str, config: ServerConfig, overrides: dict) -> None:
            self.system = ReplicaSystem(path, **overrides)
            # Static batching on a replica: the experts resident in its one model change with the requests it
            # is sent (multiplexing loads and evicts them in place), which a running continuous batch, whose
            # rows keep the gate columns they were routed with, cannot follow.
            self.engine = Engine(self.system, dataclasses.replace(config, batching="static"), Metrics())
            self.replica = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=ray_config.experts_per_replica)
        async def experts(self, key: str):
            version, ids = parse_key(key)
            return await asyncio.get_running_loop().run_in_executor(None, self.system.hold, version, ids)

        async def generate(self, payload: dict) -> dict:
            return await replica_generate(self, payload)

        async def generate_stream(self, payload: dict):
            async for item in replica_stream(self, payload):
                yield item

        def check_health(self) -> None:
            # Ray Serve replaces a replica whose check fails: without its worker thread it would answer nothing
            worker = getattr(self.engine, "_thread", None)
            if worker is not None and not worker.is_alive():
                raise RuntimeError("the generation worker stopped")

    return Generator


async def replica_generate(replica, payload: dict) -> dict:
    """One request on a generation replica: hold its experts, generate with the engine, check the routing."""
    held, req, expected = await prepare(replica, payload)
    if held is None:
        return req
    replica.system.using_enter(held)
    try:
        gen = await asyncio.wrap_future(replica.engine.submit(req))
    except APIError as err:
        return {"error": error_to_wire(err)}
    except asyncio.CancelledError:  # the ingress cancelled the call (its client went away)
        req.cancelled = True  # stop at the next token (a request still queued is dropped)
        raise
    finally:
        await done_with(replica, held)
    if not replica.system.current(held) or not same_routing(gen.routing, expected):
        return stale(replica, f"routed {gen.routing} here, {expected} at the ingress")
    return answer(replica, held, gen)


async def replica_stream(replica, payload: dict):
    """A streamed request on a generation replica: ``{"routing"}`` once the prompt is routed (checked against
    the ingress's first, so no text of another routing is ever sent), ``{"delta"}`` as text arrives, then the
    answer; or a single stale or error item."""
    held, req, expected = await prepare(replica, payload)
    if held is None:
        yield req
        return
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    req.on_event = lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data))
    replica.system.using_enter(held)
    try:
        future = asyncio.wrap_future(replica.engine.submit(req))
        future.add_done_callback(lambda _: events.put_nowait(("done", None)))
        while (event := await events.get())[0] != "done":
            kind, data = event
            if kind == "routing" and not (replica.system.current(held) and same_routing(data, expected)):
                req.cancelled = True
                yield stale(replica, f"routed {data} here, {expected} at the ingress")
                return
            where = {"replica": replica.replica, "version": held.version} if kind == "routing" else {}
            yield {kind: data, **where}
        try:
            gen = future.result()
        except APIError as err:
            yield {"error": error_to_wire(err)}
            return
        yield answer(replica, held, gen)
    finally:
        req.cancelled = True  # the ingress went away: stop at the next token
        await done_with(replica, held)


async def prepare(replica, payload: dict):
    """``(held experts, request, the ingress's routing)``, or ``(None, stale answer, None)``."""
    try:
        held = await replica.experts(serve.get_multiplexed_model_id())
    except StaleVersion as err:
        return None, stale(replica, str(err)), None
    payload = dict(payload)
    expected = payload.pop("routing")
    return held, GenerationRequest(**{**payload, "stop": tuple(payload["stop"])}), expected


async def done_with(replica, held) -> None:
    if replica.system.using_exit(held):
        await asyncio.get_running_loop().run_in_executor(None, replica.system.collect)


def stale(replica, reason: str) -> dict:
    return {"stale": True, "replica": replica.replica, "reason": reason}


def answer(replica, held, gen) -> dict:
    return {"generation": asdict(gen), "replica": replica.replica, "version": held.version,
            "resident": replica.system.resident}


@serve.deployment(name=INGRESS)
@serve.ingress()
class Ingress:
    def __init__(self, path: str, config: ServerConfig, generator, jobs, attempts: int) -> None:
        self.head = RoutingHead(path)
        metrics = RayMetrics()
        engine = RayEngine(self.head, generator, config, metrics, attempts)
        self.asgi = following_saves(create_app(self.head, config, engine=engine, jobs=RemoteJobs(jobs),
                                               metrics=metrics), self.head)

    def __serve_build_asgi_app__(self):
        return self.asgi


def build_app(path: str | Path, config: ServerConfig, ray_config: RayServeConfig, overrides: dict | None = None):
    """The Ray Serve application (``serve.run`` it on an initialised cluster). With an API key the skill-job
    actor starts now, so a folder another writer holds is reported here rather than at the first upload."""
    path, overrides = str(path), overrides or {}
    jobs = None
    if config.api_key:
        jobs = SkillJobs.options(name=f"{ray_config.app_name}-skill-jobs").remote(path, config, overrides)
        ray.get(jobs.ready.remote())
    generator = generator_deployment(ray_config).bind(path, config, overrides)
    return Ingress.options(**ray_config.ingress_options()).bind(path, config, generator, jobs, ray_config.attempts)


def app_builder(args: dict):
    """The application for a Ray Serve config file (``serve run deploy/serve.yaml``, ``serve deploy``):
    ``import_path: dylora_moe.serving.ray_app:app_builder`` with ``args`` ``system`` (the run or system folder,
    on storage every node reads), and optionally ``server`` (``ServerConfig`` fields; the API key from
    ``DYLORA_API_KEY`` on the head node), ``ray`` (``RayServeConfig`` fields) and ``overrides`` (``device``,
    ``dtype``). Unknown keys are refused by name rather than ignored."""
    unknown = set(args) - {"system", "server", "ray", "overrides"}
    if unknown or "system" not in args:
        raise ValueError(f"serve config args need 'system' and take only system/server/ray/overrides; got "
                         f"{sorted(args)}")
    for name, cls in (("server", ServerConfig), ("ray", RayServeConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        wrong = set(args.get(name) or {}) - fields
        if wrong:
            raise ValueError(f"args.{name} has unknown field(s) {sorted(wrong)}; known: {sorted(fields)}")
    ray_config = RayServeConfig(**(args.get("ray") or {}))
    return build_app(args["system"], ServerConfig(**(args.get("server") or {})), ray_config,
                     args.get("overrides") or {})


def run(path: Path, config: ServerConfig, ray_config: RayServeConfig, *, host: str, port: int,
        overrides: dict | None = None) -> int:
    """Start (or join) the cluster, deploy, and serve until interrupted."""
    ray.init(address=ray_config.address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(path, config, ray_config, overrides), name=ray_config.app_name,
              route_prefix=ray_config.route_prefix)
    logger.info("serving on Ray", extra={"fields": {"event": "serving", "url": f"http://{host}:{port}",
                                                    "system": str(path), "replicas": ray_config.replicas,
                                                    "experts_per_replica": ray_config.experts_per_replica,
                                                    "mutations": bool(config.api_key)}})
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(ray_config.app_name)
    return 0
