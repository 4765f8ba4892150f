"""Options of ``dylora serve DIR --ray``: replicas, experts per replica, the cluster, Ray Serve's autoscaling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import check_types


@dataclass
class RayServeConfig:
    """How the Ray Serve deployment is laid out (``ServerConfig`` still says how each request is answered).

    Args:
        replicas: generation replicas (each holds the whole backbone); ignored when ``max_replicas`` is set.
        experts_per_replica: experts a replica keeps loaded (Ray Serve's ``max_num_models_per_replica``; least
            recently used evicted first). While the router is dense every request needs every expert: see
            ``ray_app.py`` for the policy.
        address: the Ray cluster to join (``auto``: the one this machine belongs to, ``ray://host:10001``);
            ``None`` starts a local one.
        min_replicas, max_replicas, target_ongoing_requests: Ray Serve autoscaling of the generation replicas,
            on when ``max_replicas`` is given: replicas are added while each has more than
            ``target_ongoing_requests`` requests in flight.
        max_ongoing_requests: requests a replica takes at once (it generates them in batches of
            ``ServerConfig.max_batch``); more wait in Ray Serve's queue.
        replica_cpus, replica_gpus: Ray resources of a generation replica (a GPU replica: ``replica_gpus=1``).
        ingress_replicas, ingress_cpus: the HTTP ingress (routing costs an embedding lookup per request).
        attempts: tries per request when a replica dies or the system changed under it; after them the client
            gets a 503 with ``Retry-After``.
        app_name, route_prefix: the Ray Serve application.
    """

    replicas: int = field(default=2, metadata={"help": "generation replicas"})
    experts_per_replica: int = field(default=2, metadata={"help": "experts a replica keeps loaded (LRU)"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster address (auto, ray://...)"})
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 16
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    ingress_replicas: int = 1
    ingress_cpus: float = 0.5
    attempts: int = 3
    app_name: str = "dylora"
    route_prefix: str = "/"

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("replicas", "experts_per_replica", "min_replicas", "max_ongoing_requests", "ingress_replicas",
                     "attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}")
        # written so that NaN fails them: argparse's float takes "nan" and "inf"
        if not 0 < self.target_ongoing_requests < math.inf:
            raise ValueError(f"target_ongoing_requests must be > 0 and finite, got {self.target_ongoing_requests}")
        for name in ("replica_cpus", "replica_gpus", "ingress_cpus"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")

    def generator_options(self) -> dict:
        """``serve.deployment`` options of the generation replicas."""
        options = {"max_ongoing_requests": self.max_ongoing_requests,
                   "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus}}
        if self.max_replicas is None:
            return {**options, "num_replicas": self.replicas}
        return {**options, "autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                                  "target_ongoing_requests": self.target_ongoing_requests}}

    def ingress_options(self) -> dict:
        return {"num_replicas": self.ingress_replicas, "ray_actor_options": {"num_cpus": self.ingress_cpus}}
