"""``dylora serve DIR``: serve a trained system over HTTP (OpenAI-compatible) and learn uploaded skills.

    dylora serve runs/demo                                   # http://127.0.0.1:8000, mutations refused
    DYLORA_API_KEY=secret dylora serve runs/demo --port 9000 # POST /skills with `Authorization: Bearer secret`
    dylora serve runs/demo --host 0.0.0.0                    # listen beyond this machine (containers)
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
from pathlib import Path

from .config import API_KEY_ENV

logger = logging.getLogger("dylora_moe.serving")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a trained system over HTTP (OpenAI-compatible API, live skills)")
    p.add_argument("dir", type=Path, help="a `dylora train` output folder, or a saved system folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
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
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for generation before 429s")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="decoding guard: penalty on tokens already generated (1.0: off)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="decoding guard: never repeat an n-gram of this size (0: off)")
    p.add_argument("--seed-steps", type=int, default=8, help="seeding steps of an uploaded new skill")
    p.add_argument("--consolidation-steps", type=int, default=16, help="consolidation steps of an uploaded skill")
    p.add_argument("--train-batch-size", type=int, default=4, help="sequences per training step")
    p.add_argument("--train-max-length", type=int, default=256, help="tokens per training sequence")


def server_config(args: argparse.Namespace):
    from ..training.config import TrainingConfig
    from .config import ServerConfig

    training = TrainingConfig(seed_steps=args.seed_steps, consolidation_steps=args.consolidation_steps,
                              batch_size=args.train_batch_size, max_length=args.train_max_length,
                              report_to=["none"])
    return ServerConfig(model_name=args.model_name, api_key=args.api_key, max_tokens_cap=args.max_tokens_cap,
                        default_max_tokens=min(64, args.max_tokens_cap), max_batch=args.max_batch,
                        batching=args.batching,
                        max_queue=args.max_queue,
                        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                        training=training)


def serve(args: argparse.Namespace) -> int:
    from ..checkpoint import writer_lock
    from . import logs
    from .system import ServedSystem, SystemFiles

    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    config = server_config(args)
    overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
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
