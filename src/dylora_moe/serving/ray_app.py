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
from .ray_ingress import RayEngine, RayMetrics, RemoteJobs, SkillJobs, error_to_wire, parse_key, same_routing
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
            self.engine = Engine(self.system, config, Metrics())
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.loads: dict[int, int] = {}  # expert id -> times this replica loaded it

        @serve.multiplexed(max_num_models_per_replica=ray_config.experts_per_replica)
        async def experts(self, key: str):
            version, ids = parse_key(key)
            before = set(self.system.resident)
            held = await asyncio.get_running_loop().run_in_executor(None, self.system.hold, version, ids)
            for e in set(ids) - before:
                self.loads[e] = self.loads.get(e, 0) + 1
            return held

        async def generate(self, payload: dict) -> dict:
            return await replica_generate(self, payload)

        def check_health(self) -> None:
            if not self.engine._thread.is_alive():
                raise RuntimeError("the generation worker stopped")

    return Generator


async def replica_generate(replica, payload: dict) -> dict:
    """One request on a generation replica: hold its experts, generate with the engine, check the routing."""
    stale = {"stale": True, "replica": replica.replica}
    try:
        held = await replica.experts(serve.get_multiplexed_model_id())
    except StaleVersion as err:
        return {**stale, "reason": str(err)}
    expected = payload.pop("routing")
    payload["stop"] = tuple(payload["stop"])
    req = GenerationRequest(**payload)
    replica.system.using_enter(held)
    try:
        gen = await asyncio.wrap_future(replica.engine.submit(req))
    except APIError as err:
        return {"error": error_to_wire(err)}
    finally:
        if replica.system.using_exit(held):
            await asyncio.get_running_loop().run_in_executor(None, replica.system.collect)
    if not replica.system.current(held) or not same_routing(gen.routing, expected):
        return {**stale, "reason": f"routed {gen.routing} here, {expected} at the ingress"}
    return {"generation": asdict(gen), "replica": replica.replica, "version": held.version,
            "resident": replica.system.resident, "loads": dict(replica.loads)}


@serve.deployment(name=INGRESS)
@serve.ingress()
class Ingress:
    def __init__(self, path: str, config: ServerConfig, generator, jobs, attempts: int) -> None:
        self.head = RoutingHead(path)
        metrics = RayMetrics()
        engine = RayEngine(self.head, generator, config, metrics, attempts)
        self.asgi = create_app(self.head, config, engine=engine, jobs=RemoteJobs(jobs), metrics=metrics)

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
