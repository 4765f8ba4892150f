"""The FastAPI app: OpenAI-compatible completions with per-request routing, the registry, skill uploads.

    POST /v1/completions, /v1/chat/completions   OpenAI shapes (``stream: true`` for server-sent events)
    GET  /v1/models, /experts, /skills, /jobs/{id}, /health, /metrics
    POST /skills                                  learn a skill in the background (API key required)

Every completion says how it was routed: the ``X-DyLoRA-Routing`` header (JSON) and a ``routing`` field in
the body (and in the first and last chunk of a stream): strategy, granularity and the experts with their
weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from .auth import check_key
from .config import ServerConfig
from .engine import Engine, Generation, GenerationRequest
from .errors import APIError, install
from .jobs import JobManager
from .metrics import Metrics
from .middleware import Observe
from .schemas import ChatMessage, ChatRequest, CompletionRequest, parse
from .system import ServedSystem
from .uploads import read_upload

ROUTING_HEADER = "X-DyLoRA-Routing"


def create_app(system: ServedSystem | str | Path, config: ServerConfig | None = None, *, engine=None, jobs=None,
               metrics: Metrics | None = None) -> FastAPI:
    """An app serving ``system`` (a ServedSystem, or a run/system folder to load). The generation worker and
    the skill-job worker start now and stop with the app's lifespan. A deployment that generates and learns
    elsewhere (``ray_app.py``) passes its own ``engine`` (``submit(request) -> Future``), ``jobs`` (a
    ``JobManager``'s ``submit``, ``get``, ``jobs``, ``close``) and ``metrics``, and for ``system`` anything with
    the ``model`` and ``version`` the registry endpoints read."""
    config = config or ServerConfig()
    system = ServedSystem(system) if isinstance(system, str | Path) else system
    metrics = metrics or Metrics()
    metrics.observe_system(system.model)
    engine = engine or Engine(system, config, metrics)
    jobs = jobs or JobManager(system, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()
        jobs.close()

    app = FastAPI(title="dylora-moe", version="0.1.0", lifespan=lifespan)
    app.state.system, app.state.config, app.state.metrics = system, config, metrics
    app.state.engine, app.state.jobs = engine, jobs
    app.add_middleware(Observe, metrics=metrics, config=config)
    install(app, metrics.error)

    # ------------------------------------------------------------------ OpenAI-compatible
    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(system, config)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        check_model(model_id, config)
        return model_card(system, config)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await request.body())
        check_model(body.model, config)
        req = GenerationRequest(body.text(), max_tokens(body.max_tokens, config), body.temperature, body.top_p,
                                body.stops(), chat=False, param="prompt", n=body.n)
        return await respond(engine, req, body, "text_completion", config, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse(ChatRequest, await request.body())
        check_model(body.model, config)
        body.check_unsupported()
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        req = GenerationRequest(render_chat(system.model.tokenizer, body.messages),
                                max_tokens(limit, config, param), body.temperature, body.top_p, body.stops(),
                                chat=True, param="messages", n=body.n)
        return await respond(engine, req, body, "chat.completion", config, request)

    # ------------------------------------------------------------------ the system
    @app.get("/experts")
    async def experts() -> dict:
        return experts_list(system)

    @app.get("/skills")
    async def skills() -> dict:
        model = system.model
        data = [{"skill_id": s.skill_id, "name": s.name, "expert_id": s.expert_id, "examples": s.examples}
                for s in model.library.skills.values()]
        return {"object": "list", "data": data}

    @app.post("/skills", status_code=202)
    async def learn_skill(request: Request) -> JSONResponse:
        check_key(request, config.api_key)
        upload = read_upload(await request.body(), request.headers.get("content-type", ""),
                             dict(request.query_params), config)
        job = await run_in_threadpool(jobs.submit, upload)  # a remote job worker answers over the network
        return JSONResponse(job.to_dict(), status_code=202, headers={"Location": f"/jobs/{job.id}"})

    @app.get("/jobs")
    async def job_list(request: Request) -> dict:
        check_key(request, config.api_key)  # jobs name the uploads and their fate: the uploader's business
        listed = await run_in_threadpool(lambda: list(jobs.jobs.values()))
        return {"object": "list", "data": [j.to_dict() for j in listed]}

    @app.get("/jobs/{job_id}")
    async def job(job_id: str, request: Request) -> dict:
        check_key(request, config.api_key)
        return (await run_in_threadpool(jobs.get, job_id)).to_dict()

    @app.get("/health")
    async def health() -> dict:
        model = system.model
        listed = await run_in_threadpool(lambda: list(jobs.jobs.values()))
        running = sum(j.status in ("queued", "running") for j in listed)
        return {"status": "ok", "model": config.model_name, "base_model": model.config.model,
                "experts": model.num_experts, "routing_strategy": strategy(model), "system_version": system.version,
                "skill_jobs_pending": running}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# ---------------------------------------------------------------------- building blocks
def strategy(model) -> str:
    return model.router.strategy if model.num_experts else "none"


def model_card(system: ServedSystem, config: ServerConfig) -> dict:
    model = system.model
    return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "dylora-moe",
            "base_model": model.config.model, "experts": model.num_experts}


def experts_list(system: ServedSystem) -> dict:
    model = system.model
    skills: dict[int, list[dict]] = {}
    for s in model.library.skills.values():
        skills.setdefault(s.expert_id, []).append({"skill_id": s.skill_id, "name": s.name})
    maturity = model.router.expert_maturity.tolist()
    data = [{"expert_id": e, "column": c, "rank": model.experts.ranks[e], "mature": bool(maturity[c]),
             "skills": skills.get(e, [])} for c, e in enumerate(model.experts.expert_ids)]
    return {"object": "list", "data": data, "routing_strategy": strategy(model), "top_k": model.router.top_k,
            "system_version": system.version}


def check_model(name: str, config: ServerConfig) -> None:
    if name != config.model_name:
        raise APIError(404, f"model {name!r} is not served here; use {config.model_name!r} (GET /v1/models lists it)",
                       param="model", code="model_not_found")


def max_tokens(value: int | None, config: ServerConfig, param: str = "max_tokens") -> int:
    if value is None:
        return config.default_max_tokens
    if not 1 <= value <= config.max_tokens_cap:
        raise APIError(400, f"{param} must be between 1 and {config.max_tokens_cap}, got {value}", param=param,
                       code="invalid_value")
    return value


def render_chat(tokenizer, messages: list[ChatMessage]) -> str:
    """The conversation as the model reads it: its chat template, or ``role: content`` lines ending with
    ``assistant:`` for a model without one."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja raises its own errors for conversations a template refuses
            raise APIError(400, f"the model's chat template refused these messages: {err}", param="messages") from err
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"


def routing_header(routing: dict) -> dict[str, str]:
    return {ROUTING_HEADER: json.dumps(routing, separators=(",", ":"))}


def usage(gen: Generation) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def choice(kind: str, text: str | None, finish_reason: str | None, first: bool = False, index: int = 0) -> dict:
    """One choice of a response (``chat.completion``, ``text_completion``) or of a stream chunk."""
    if kind == "chat.completion":
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    if kind == "chat.completion.chunk":
        delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


async def respond(engine: Engine, req: GenerationRequest, body, kind: str, config: ServerConfig,
                  request: Request) -> Response:
    rid = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        return await stream(engine, req, body, kind, rid, created, config, request)
    gen = await until_disconnected(engine.submit(req), req, request)
    if gen is None:  # the client went away: nobody reads an answer
        return Response(status_code=499)
    content = {"id": rid, "object": kind, "created": created, "model": config.model_name,
               "choices": [choice(kind, c.text, c.finish_reason, index=i) for i, c in enumerate(gen.choices)],
               "usage": usage(gen),
               "routing": gen.routing}
    return JSONResponse(content, headers=routing_header(gen.routing))


async def until_disconnected(future, req: GenerationRequest, request: Request, poll: float = 0.25):
    """``future``'s result (the generation's, or a stream's first event); ``None`` when the client goes away
    meanwhile, which cancels the generation: dropped if it still waits in the queue, stopped at the next token
    if it runs."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=poll)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            req.cancelled = True
            future.cancel()
            return None


async def stream(engine: Engine, req: GenerationRequest, body, kind: str, rid: str, created: int,
                 config: ServerConfig, request: Request) -> Response:
    """Server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``. The routing is known before the
    first token, so it goes into the response headers as for any other completion; a client that goes away
    while its stream waits for it cancels the generation, as for a plain completion."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    req.on_event = lambda kind_, payload: loop.call_soon_threadsafe(events.put_nowait, (kind_, payload))
    submitted = engine.submit(req)
    future = asyncio.wrap_future(submitted)
    future.add_done_callback(lambda _: events.put_nowait(("done", None)))
    event = await until_disconnected(asyncio.ensure_future(events.get()), req, request)
    if event is None:  # the client went away before the first event: nobody reads the stream
        submitted.cancel()
        return Response(status_code=499)
    first, routing = event
    if first == "done":  # refused before generation started (bad prompt): a normal error response
        future.result()
    chunk_kind = "chat.completion.chunk" if kind.startswith("chat") else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict], **extra) -> str:
        data = {"id": rid, "object": chunk_kind, "created": created, "model": config.model_name,
                "choices": choices, **extra}
        return f"data: {json.dumps(data)}\n\n"

    async def body_iter():
        try:
            yield chunk([choice(chunk_kind, "", None, first=True, index=i) for i in range(req.n)], routing=routing)
            while True:
                kind_, payload = await events.get()
                if kind_ == "delta":
                    index, text = payload
                    yield chunk([choice(chunk_kind, text, None, index=index)])
                elif kind_ == "done":
                    break
            try:
                gen = future.result()
            except Exception as err:  # the status (200) is sent: the error goes into the stream, and is counted
                error = err if isinstance(err, APIError) else APIError(
                    500, f"generation failed ({type(err).__name__}); see the server log", code="generation_failed")
                engine.metrics.error(error.code or error.type, error.status)
                yield f"data: {json.dumps(error.body())}\n\n"
            else:
                yield chunk([choice(chunk_kind, None, c.finish_reason, index=i) for i, c in enumerate(gen.choices)],
                            routing=routing)
                if include_usage:
                    data = {"id": rid, "object": chunk_kind, "created": created, "model": config.model_name,
                            "choices": [], "usage": usage(gen)}
                    yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled = True  # a client that went away stops its generation at the next token

    return StreamingResponse(body_iter(), media_type="text/event-stream",
                             headers={**routing_header(routing), "Cache-Control": "no-cache"})
