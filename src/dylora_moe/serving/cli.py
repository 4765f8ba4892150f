"""``dylora serve DIR``: serve a trained system over HTTP (OpenAI-compatible) and learn uploaded skills.

    dylora serve runs/demo                                   # http://127.0.0.1:8000, mutations refused
    DYLORA_API_KEY=secret dylora serve runs/demo --port 9000 # POST /skills with `Authorization: Bearer secret`
    dylora serve runs/demo --host 0.0.0.0                    # listen beyond this machine (containers)
    dylora serve runs/demo --ray --replicas 2 --experts-per-replica 2   # on Ray Serve (see ray_app.py)
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
from pathlib import Path

from .config import API_KEY_ENV

logger = logging.getLogger("dylora_moe.serving")


def port_number(text: str) -> int:
    """``--port``: a TCP port; refused with argparse's usage message otherwise (before the system loads)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number: give 0-65535") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number: give 0-65535 (0: any free port)")
    return port


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a trained system over HTTP (OpenAI-compatible API, live skills)")
    p.add_argument("dir", type=Path, help="a `dylora train` output folder, or a saved system folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port, 0-65535 (0: any free port)")
    p.add_argument("--api-key", default=None,
                   help=f"key for mutating endpoints (POST /skills); prefer the {API_KEY_ENV} environment variable")
    p.add_argument("--model-name", default="dylora-moe", help="the model id clients send")
    p.add_argument("--device", default=None, help="override the saved device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--dtype", default=None, help="override the saved dtype (float32, bfloat16, float16)")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-batch", type=int, default=8, help="sequences generated together")
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous: requests join the running batch at the next token and leave when done; "
                        "static: the requests that arrived together run to the end (the older scheme)")
    p.add_argument("--join-batch", type=int, default=4,
                   help="continuous batching: requests gathered into one prefill pass while others decode")
    p.add_argument("--join-wait-steps", type=int, default=4,
                   help="continuous batching: decode steps a request waits for others to join with (0: none)")
    p.add_argument("--prefill-share", type=float, default=0.5,
                   help="continuous batching: largest share of the worker's time spent prefilling joiners while "
                        "rows decode (1: no limit)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for generation before 429s")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send its request body before a 408")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="decoding guard: penalty on tokens already generated (1.0: off)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="decoding guard: never repeat an n-gram of this size (0: off)")
    p.add_argument("--seed-steps", type=int, default=8, help="seeding steps of an uploaded new skill")
    p.add_argument("--consolidation-steps", type=int, default=40, help="consolidation steps of an uploaded skill")
    p.add_argument("--train-batch-size", type=int, default=4, help="sequences per training step")
    p.add_argument("--train-max-length", type=int, default=256, help="tokens per training sequence")
    ray = p.add_argument_group("Ray Serve (with --ray)")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve: an ingress and generation replicas")
    ray.add_argument("--replicas", type=int, default=None, help="generation replicas (default 2)")
    ray.add_argument("--experts-per-replica", type=int, default=None,
                     help="experts a replica keeps loaded, least recently used evicted first (default 2)")
    ray.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://host:10001); default: "
                                                     "start a local one")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas (default 1)")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas (turns it on)")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling: requests in flight per replica before another is added (default 2)")
    ray.add_argument("--replica-cpus", type=float, default=None, help="CPUs per generation replica (default 1)")
    ray.add_argument("--replica-gpus", type=float, default=None, help="GPUs per generation replica (default 0)")


def server_config(args: argparse.Namespace):
    from ..training.config import TrainingConfig
    from .config import ServerConfig

    training = TrainingConfig(seed_steps=args.seed_steps, consolidation_steps=args.consolidation_steps,
                              batch_size=args.train_batch_size, max_length=args.train_max_length,
                              report_to=["none"])
    return ServerConfig(model_name=args.model_name, api_key=args.api_key, max_tokens_cap=args.max_tokens_cap,
                        default_max_tokens=min(64, args.max_tokens_cap), max_batch=args.max_batch,
                        batching=args.batching, join_batch=args.join_batch, join_wait_steps=args.join_wait_steps,
                        prefill_share=args.prefill_share,
                        max_queue=args.max_queue, body_timeout=args.body_timeout,
                        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                        training=training)


RAY_OPTIONS = {"replicas": "replicas", "experts_per_replica": "experts_per_replica", "address": "address",
               "min_replicas": "min_replicas", "max_replicas": "max_replicas",
               "target_ongoing_requests": "target_ongoing_requests", "replica_cpus": "replica_cpus",
               "replica_gpus": "replica_gpus"}


def ray_config(args: argparse.Namespace):
    """The Ray options given on the command line; they mean nothing without ``--ray``."""
    given = {field: getattr(args, flag) for flag, field in RAY_OPTIONS.items() if getattr(args, flag) is not None}
    if given and not args.ray:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ValueError(f"{flags} only apply to a Ray deployment: add --ray")
    from .ray_config import RayServeConfig

    return RayServeConfig(**given)


def serve(args: argparse.Namespace) -> int:
    from ..checkpoint import writer_lock
    from . import logs
    from .system import ServedSystem, SystemFiles

    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    config = server_config(args)
    overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    layout = ray_config(args)
    if args.ray:  # the skill-job actor takes the writer lock itself, in its own process
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ValueError("--ray needs Ray Serve: pip install 'dylora-moe[ray]' (or 'ray[serve]')")
        from .ray_app import run as run_on_ray

        SystemFiles.locate(args.dir)
        return run_on_ray(args.dir, config, layout, host=args.host, port=args.port, overrides=overrides)
    # with uploads on, this server writes the system folder: no other writer may (a second server, a
    # training run, `dylora experts delete`); without a key it only reads
    writing = writer_lock(SystemFiles.locate(args.dir).system, who="dylora serve") if config.api_key else \
        contextlib.nullcontext()
    with writing:
        return run(args, config, ServedSystem(args.dir, **overrides))


def run(args: argparse.Namespace, config, system) -> int:
    import uvicorn

    from .app import create_app

    app = create_app(system, config)
    if not loopback(args.host) and not config.api_key:
        logger.warning("listening beyond this machine without an API key: skill uploads are refused; completions "
                       "are open to anyone who can reach the port", extra={"fields": {"event": "warning"}})
    logger.info("serving", extra={"fields": {"event": "serving", "url": f"http://{args.host}:{args.port}",
                                             "system": str(system.files.system), "experts": system.model.num_experts,
                                             "device": str(system.model.device), "mutations": bool(config.api_key)}})
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
