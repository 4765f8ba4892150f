"""Prometheus metrics of one server (its own registry, so several apps in one process never collide)."""

from __future__ import annotations

import contextlib

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..routing.router import DENSE, SPARSE

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.latency = Histogram("dylora_request_seconds", "request latency by endpoint",
                                 ["endpoint", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dylora_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("dylora_generated_tokens", "completion tokens generated", registry=r)
        self.tokens_per_second = Histogram("dylora_generation_tokens_per_second",
                                           "completion tokens per second of generation, per request",
                                           buckets=RATE_BUCKETS, registry=r)
        self.batch_size = Histogram("dylora_batch_size", "sequences generated together (per decode step when "
                                    "batching continuously, per batch when static)",
                                    buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.worker_seconds = Counter("dylora_generation_seconds", "time the generation worker spent, by stage: "
                                      "prefill (prompts joining the running batch), decode (its steps), "
                                      "generate (whole static batches)", ["stage"], registry=r)
        self.queue_depth = Gauge("dylora_queue_depth", "generation requests waiting", registry=r)
        self.experts = Gauge("dylora_experts", "experts in the served system", registry=r)
        self.strategy = Gauge("dylora_routing_strategy", "1 for the router's current strategy", ["strategy"],
                              registry=r)
        self.routed = Counter("dylora_expert_routed", "sequences whose top expert was this one", ["expert"],
                              registry=r)
        self.routing_weight = Counter("dylora_expert_routing_weight", "sum of routing weights given to the expert",
                                      ["expert"], registry=r)
        self.acquisitions = Counter("dylora_skill_acquisitions", "skills learned while serving", ["outcome"],
                                    registry=r)
        self.jobs = Counter("dylora_skill_jobs", "skill jobs finished", ["status"], registry=r)
        self.swaps = Counter("dylora_system_swaps", "times the served system was replaced", registry=r)
        self.errors = Counter("dylora_errors", "errors answered, by kind", ["kind", "status"], registry=r)
        r.register(_AcceleratorCollector())

    def observe_system(self, model) -> None:
        self.experts.set(model.num_experts)
        current = model.router.strategy if model.num_experts else "none"
        for name in (DENSE, SPARSE, "none"):
            self.strategy.labels(name).set(1.0 if name == current else 0.0)

    def observe_routing(self, routing: dict) -> None:
        experts = routing.get("experts") or []
        if experts:
            self.routed.labels(str(experts[0]["expert_id"])).inc()
        for e in experts:
            self.routing_weight.labels(str(e["expert_id"])).inc(e["weight"])

    def observe_generation(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)
        if completion_tokens and seconds > 0:
            self.tokens_per_second.observe(completion_tokens / seconds)

    def error(self, kind: str, status: int) -> None:
        self.errors.labels(kind, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _AcceleratorCollector:
    """CUDA memory (and utilisation where the driver reports it) at scrape time; nothing on a CPU machine."""

    def collect(self):
        if not torch.cuda.is_available():
            return
        memory = GaugeMetricFamily("dylora_accelerator_memory_bytes", "CUDA memory", labels=["device", "kind"])
        busy = GaugeMetricFamily("dylora_accelerator_utilisation", "CUDA utilisation percent", labels=["device"])
        for i in range(torch.cuda.device_count()):
            memory.add_metric([str(i), "allocated"], torch.cuda.memory_allocated(i))
            memory.add_metric([str(i), "reserved"], torch.cuda.memory_reserved(i))
            with contextlib.suppress(Exception):  # needs pynvml and a driver that reports it
                busy.add_metric([str(i)], torch.cuda.utilization(i))
        yield memory
        yield busy
