"""The FastAPI app: OpenAI-compatible endpoints over a :class:`~.batcher.Batcher`.

``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and ``POST
/v1/completions`` (streaming with server-sent events, or not) need an API key; ``GET /health``
and ``GET /metrics`` (Prometheus) do not. Every error, malformed requests first, is answered in
OpenAI's error shape with a 4xx status: 400 bad parameters or JSON, 401 no valid key, 404
unknown model or path, 413 body too large, 429 rate limited (``Retry-After``); 503 when the
queue is full. Bodies are bounded before any route reads them (:mod:`.guard`: size, JSON depth);
too many failed authentications from one address get 429 for a while. Each ``/v1`` request adds
a line to the request log, its error's code and message included.

Graceful shutdown is uvicorn's: on SIGINT/SIGTERM it stops accepting connections and waits for
in-flight requests (streams included) to finish; then the lifespan stops the batcher.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.data.render import render_prompt
from tuneforge.errors import ConfigError
from tuneforge.generation import RowSettings
from tuneforge.serve import protocol
from tuneforge.serve.auth import ANONYMOUS, KeyStore, RateLimiter, bearer_key, retry_after_seconds
from tuneforge.serve.batcher import Batcher, Job, JobResult, QueueFull
from tuneforge.serve.engine import ServedModels
from tuneforge.serve.guard import BodyGuard
from tuneforge.serve.metrics import CONTENT_TYPE, Metrics
from tuneforge.serve.protocol import APIError, ChatRequest, CompletionRequest
from tuneforge.serve.requestlog import RequestLog, RequestRecord

ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ERROR_MESSAGE_CHARS = 500  # of an unexpected exception's message, in the request log


@dataclass
class ServeSettings:
    """Limits and batching of a server (the ``tuneforge serve`` flags)."""

    max_request_bytes: int = 1_000_000
    max_upload_bytes: int = 100_000_000  # multipart/form-data bodies (file uploads)
    max_tokens: int = 512  # a request may ask for at most this many new tokens per choice
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    rate_limit: float = 600.0  # requests per minute per key; 0 = unlimited
    rate_burst: int = 60
    auth_fail_limit: float = 10.0  # failed authentications per minute per client address
    auth_fail_burst: int = 10  # ... allowed at once, before that address gets 429s
    request_log: str | Path | None = None
    log_prompts: bool = False

    def check(self) -> None:
        problems = [f"--{name.replace('_', '-')} must be {rule}" for name, bad, rule in (
            ("max_request_bytes", self.max_request_bytes < 1024, "at least 1024"),
            ("max_upload_bytes", self.max_upload_bytes < 1024, "at least 1024"),
            ("max_tokens", self.max_tokens < 1, "at least 1"),
            ("max_batch_size", self.max_batch_size < 1, "at least 1"),
            ("batch_wait_ms", not 0 <= self.batch_wait_ms <= 1000, "within 0..1000"),
            ("max_queue", self.max_queue < 1, "at least 1"),
            ("rate_limit", self.rate_limit < 0, "0 (unlimited) or more"),
            ("rate_burst", self.rate_burst < 1, "at least 1"),
            ("auth_fail_limit", self.auth_fail_limit < 0, "0 (unlimited) or more"),
            ("auth_fail_burst", self.auth_fail_burst < 1, "at least 1"),
        ) if bad]
        if problems:
            raise ConfigError("; ".join(problems))


def create_app(models: ServedModels, settings: ServeSettings | None = None,
               keys: KeyStore | None = None, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The app serving ``models``; ``keys=None`` turns authentication off. ``routers`` add
    endpoints (the jobs API's files and fine-tuning jobs) behind the same keys and limits."""
    settings = settings or ServeSettings()
    settings.check()
    server = _Server(models, settings, keys)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.batcher.start()
        yield
        await run_in_threadpool(server.batcher.stop)
        if server.log is not None:
            server.log.close()

    app = FastAPI(title="tuneforge", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    _add_error_handlers(app)
    _add_routes(app, server)
    for router in routers:
        app.include_router(router)
    app.add_middleware(BodyGuard, max_bytes=settings.max_request_bytes,
                       max_upload_bytes=settings.max_upload_bytes, refuse=_refusal)
    app.add_middleware(_Observe, server=server)  # added last: outermost, sees every answer
    return app


class _Server:
    """Everything the handlers share: models, batcher, keys, limits, metrics, log."""

    def __init__(self, models: ServedModels, settings: ServeSettings, keys: KeyStore | None):
        self.models, self.settings, self.keys = models, settings, keys
        self.metrics = Metrics()
        self.batcher = Batcher(models, max_batch_size=settings.max_batch_size,
                               batch_wait_s=settings.batch_wait_ms / 1000,
                               max_queue=settings.max_queue, metrics=self.metrics)
        self.metrics.watch(self.batcher)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.auth_failures = RateLimiter(settings.auth_fail_limit, settings.auth_fail_burst)
        self.log = (RequestLog(settings.request_log, with_text=settings.log_prompts)
                    if settings.request_log else None)
        self.created = int(time.time())

    # ------------------------------------------------------------------------- boundary checks

    def authorize(self, request: Request, record: RequestRecord) -> None:
        """Set ``record.key`` from the bearer key (401 if none is valid); 429 past the key's
        rate limit, and for every request from an address with too many failed keys lately
        (its key not even looked at: guessing learns nothing while throttled)."""
        if self.keys is None:
            record.key = ANONYMOUS
        else:
            address = request.client.host if request.client else "unknown"
            wait = self.auth_failures.wait(address)
            if wait > 0:
                s = self.settings
                raise self.too_many(wait, f"Too many failed authentications from {address} "
                                    f"(at most {s.auth_fail_burst} at once, then "
                                    f"{s.auth_fail_limit:g} a minute)",
                                    "too_many_failed_authentications")
            key = bearer_key(request.headers.get("authorization"))
            record.key = self.keys.identify(key) if key else None
            if record.key is None:
                self.auth_failures.acquire(address)
                raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                               "KEY' with a key this server knows", code="invalid_api_key")
        wait = self.limiter.acquire(record.key)
        if wait > 0:
            raise self.too_many(wait, f"Rate limit reached for key {record.key}: "
                                f"{self.settings.rate_limit:g} requests per minute",
                                "rate_limit_exceeded")

    def too_many(self, wait: float, reason: str, code: str) -> APIError:
        """A 429 whose message and ``Retry-After`` give the same whole seconds."""
        self.metrics.rate_limited.inc()
        seconds = retry_after_seconds(wait)
        return APIError(429, f"{reason}; retry in {seconds} s", type="requests", code=code,
                        headers={"Retry-After": str(seconds)})

    async def read_json(self, request: Request) -> Any:
        """The JSON body; :class:`~.guard.BodyGuard` has already bounded its size and depth."""
        try:
            return json.loads(await request.body(), parse_constant=_no_constants)
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"We could not parse the JSON body of your request: {err}",
                           code="invalid_json") from None

    def resolve_model(self, name: str, record: RequestRecord) -> str:
        if not self.models.knows(name, record.key):
            raise APIError(404, f"The model {name!r} does not exist on this server; it serves "
                           f"{', '.join(self.models.ids)}", param="model",
                           code="model_not_found")
        record.model = name
        return name

    def max_new_tokens(self, sampling: protocol.Sampling, prompt_len: int, param: str) -> int:
        """New tokens for one choice: as asked, within the server's cap and the context."""
        cap, context = self.settings.max_tokens, self.models.context_length
        room = context - prompt_len if context else cap
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the "
                           f"prompt has {prompt_len}", param=param, code="context_length_exceeded")
        if not sampling.max_tokens_given:
            return min(cap, room, sampling.max_tokens or cap)
        if sampling.max_tokens > cap:
            raise APIError(400, f"max_tokens is {sampling.max_tokens}; this server allows at "
                           f"most {cap}", param="max_tokens", code="invalid_value")
        if sampling.max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the "
                           f"prompt has {prompt_len} and max_tokens asks for "
                           f"{sampling.max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        return sampling.max_tokens

    # ------------------------------------------------------------------------- generation

    def submit(self, model_id: str, prompts: list[list[int]], sampling: protocol.Sampling,
               param: str) -> tuple[list[Job], asyncio.Queue]:
        """One job per (prompt, choice), queued together; their events land in one queue."""
        limits = [self.max_new_tokens(sampling, len(p), param) for p in prompts]
        seed = (sampling.seed if sampling.seed is not None else secrets.randbits(32)) % 2**32
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        # Choice i samples from random stream i of the seed: choices differ from each other,
        # and a choice's tokens depend only on (seed, i), not on its batch.
        rows = [pair for pair in zip(prompts, limits) for _ in range(sampling.n)]
        jobs = [Job(prompt, RowSettings(limit, sampling.temperature, sampling.top_p, seed, i),
                    model_id, index=i, stop=sampling.stop, stream=sampling.stream,
                    events=events, loop=loop)
                for i, (prompt, limit) in enumerate(rows)]
        try:
            self.batcher.submit(jobs)
        except QueueFull as err:
            raise APIError(503, f"The server is overloaded ({err}); retry shortly",
                           type="server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        return jobs, events

    async def collect(self, jobs: list[Job], events: asyncio.Queue,
                      record: RequestRecord) -> list[JobResult]:
        """Wait for every job of a non-streaming request; results by choice index."""
        results: dict[int, JobResult] = {}
        while len(results) < len(jobs):
            kind, index, payload = await events.get()
            if kind == "error":
                raise APIError(500, payload, type="server_error", code="generation_failed")
            if kind == "done":
                results[index] = payload
        self.note_results(record, jobs, [results[i] for i in range(len(jobs))])
        return [results[i] for i in range(len(jobs))]

    def note_results(self, record: RequestRecord, jobs: list[Job],
                     results: list[JobResult]) -> None:
        record.completion_tokens = sum(r.completion_tokens for r in results)
        record.finish_reasons = [r.finish_reason for r in results]
        firsts = [j.first_token_at for j in jobs if j.first_token_at is not None]
        if firsts:
            record.ttft_s = min(firsts) - record.started
        if self.settings.log_prompts:
            texts = [r.text for r in results]
            record.completion = texts[0] if len(texts) == 1 else texts

    async def stream(self, kind: str, rid: str, jobs: list[Job], events: asyncio.Queue,
                     record: RequestRecord, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events of a streaming request, ``data: [DONE]`` last. If the client
        goes away, its jobs are cancelled: their rows leave the batch at the next token."""
        created, model = protocol.now(), record.model
        results: dict[int, JobResult] = {}
        try:
            if kind == "chat":
                for job in jobs:
                    yield _sse(protocol.chat_chunk(rid, created, model, job.index, role=True))
            while len(results) < len(jobs):
                event, index, payload = await events.get()
                if event == "error":
                    record.error, record.error_message = "generation_failed", payload
                    yield _sse(APIError(500, payload, type="server_error").body())
                    return
                text = payload if event == "delta" else ""
                finish = payload.finish_reason if event == "done" else None
                if event == "done":
                    results[index] = payload
                if event == "done" and kind == "chat":
                    yield _sse(protocol.chat_chunk(rid, created, model, index, finish=finish))
                elif kind == "chat":
                    yield _sse(protocol.chat_chunk(rid, created, model, index, text=text))
                else:
                    yield _sse(protocol.completion_chunk(rid, created, model, index, text=text,
                                                         finish=finish))
            self.note_results(record, jobs, [results[i] for i in range(len(jobs))])
            if include_usage:
                base = (protocol.chat_chunk if kind == "chat" else protocol.completion_chunk)(
                    rid, created, model, 0)
                yield _sse(protocol.usage_chunk(base, record.prompt_tokens,
                                                record.completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            if len(results) < len(jobs):
                for job in jobs:
                    job.cancelled = True
                record.finish_reasons = ["cancelled"]

    # ------------------------------------------------------------------------- bookkeeping

    def finish(self, record: RequestRecord) -> None:
        """At the end of every response (streams included): metrics and the request log."""
        latency = time.perf_counter() - record.started
        self.metrics.requests.labels(record.endpoint, str(record.status)).inc()
        self.metrics.latency.labels(record.endpoint).observe(latency)
        if record.status == 200 and record.model is not None:
            self.metrics.prompt_tokens.labels(record.model).inc(record.prompt_tokens)
            self.metrics.generated_tokens.labels(record.model).inc(record.completion_tokens)
            if record.ttft_s is not None:
                self.metrics.time_to_first_token.observe(record.ttft_s)
        if self.log is not None and record.endpoint.startswith("/v1/"):
            self.log.write(record, latency)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _record(request: Request) -> RequestRecord:
    return request.scope["state"]["record"]


def _add_routes(app: FastAPI, server: _Server) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": server.models.ids,
                "queue_depth": server.batcher.queue_depth, "running": server.batcher.running}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": server.created,
                "owned_by": "tuneforge"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        server.authorize(request, _record(request))
        return {"object": "list",
                "data": [model_card(i) for i in server.models.visible_ids(_record(request).key)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        record = _record(request)
        server.authorize(request, record)
        return model_card(server.resolve_model(model_id, record))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        record = _record(request)
        server.authorize(request, record)
        req = protocol.parse_request(ChatRequest, await server.read_json(request))
        model_id = server.resolve_model(req.model, record)
        messages = [m.as_template_message() for m in req.messages]
        prompt = await run_in_threadpool(_encode_chat, server.models.tokenizer, messages)
        return await _answer(server, record, "chat", model_id, [prompt],
                             req.sampling(default_max_tokens=None), messages)

    @app.post("/v1/completions")
    async def completions(request: Request):
        record = _record(request)
        server.authorize(request, record)
        req = protocol.parse_request(CompletionRequest, await server.read_json(request))
        model_id = server.resolve_model(req.model, record)
        texts = req.prompts()
        prompts = await run_in_threadpool(_encode_texts, server.models.tokenizer, texts)
        return await _answer(server, record, "completion", model_id, prompts,
                             req.sampling(default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS),
                             texts[0] if len(texts) == 1 else texts)


async def _answer(server: _Server, record: RequestRecord, kind: str, model_id: str,
                  prompts: list[list[int]], sampling: protocol.Sampling, prompt_text):
    """Queue the request's jobs; answer with a body, or with a stream of chunks."""
    param = "messages" if kind == "chat" else "prompt"
    record.prompt_tokens = sum(len(p) for p in prompts)
    record.stream, record.choices = sampling.stream, len(prompts) * sampling.n
    if server.settings.log_prompts:
        record.prompt = prompt_text
    jobs, events = server.submit(model_id, prompts, sampling, param)
    rid = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
    if sampling.stream:
        return StreamingResponse(
            server.stream(kind, rid, jobs, events, record, sampling.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    results = await server.collect(jobs, events, record)
    body = protocol.chat_body if kind == "chat" else protocol.completion_body
    return body(rid, protocol.now(), model_id, [(r.text, r.finish_reason) for r in results],
                record.prompt_tokens, record.completion_tokens)


def _encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    try:
        ids = render_prompt(messages, tokenizer)
    except Exception as err:  # noqa: BLE001 - chat templates raise their own errors on bad turns
        raise APIError(400, f"messages: the model's chat template refused them: {err}",
                       param="messages", code="invalid_value") from None
    return ids


def _encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    out = [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    if any(not ids for ids in out):
        raise APIError(400, "prompt: empty prompts cannot be completed", param="prompt",
                       code="invalid_value")
    return out


# ----------------------------------------------------------------------------- errors


def _refusal(scope: dict, err: APIError) -> JSONResponse:
    """The response to ``err``, its code and message noted for the request log."""
    record = scope.get("state", {}).get("record")
    if record is not None and record.error is None:
        record.error, record.error_message = err.code or err.type, err.message
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _add_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, err: APIError) -> JSONResponse:
        return _refusal(request.scope, err)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return respond(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"{request.method} {request.url.path}: {err.detail}"
        return respond(request, APIError(err.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return respond(request, APIError(400, f"invalid request: {err.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        return respond(request, APIError(500, f"internal error: {type(err).__name__}",
                                         type="server_error", code="internal_error"))


def _routed_endpoint(scope) -> str:
    """After routing: the request's path with each path parameter put back as ``{name}``
    (``/v1/fine_tuning/jobs/{job_id}``: ids never become metric labels); "other" when no
    route served it."""
    if scope.get("route") is None:
        return "other"
    path = scope["path"]
    for name, value in (scope.get("path_params") or {}).items():
        segment = f"/{value}"  # a {name:path} value may hold several segments
        at = path.rfind(segment)
        if value != "" and at >= 0 and path[at + len(segment):][:1] in ("", "/"):
            path = f"{path[:at]}/{{{name}}}{path[at + len(segment):]}"
    return path


class _Observe:
    """ASGI middleware: a :class:`RequestRecord` per HTTP request, closed (metrics, log) when
    the last byte has been sent or the request ended otherwise."""

    def __init__(self, app, server: _Server) -> None:
        self.app, self.server = app, server

    @staticmethod
    def endpoint(scope) -> str:
        """The endpoint a request is counted and logged under; other routers' paths are named
        once routed (:func:`_routed_endpoint`)."""
        path = scope["path"]
        if path in ENDPOINTS:
            return path
        return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(endpoint=self.endpoint(scope))
        scope.setdefault("state", {})["record"] = record

        async def observed_send(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception as err:
            # Starlette answers it (the 500 handler) and uvicorn logs the traceback, both after
            # this middleware has returned: the log line needs the error now.
            if record.error is None:
                record.error = "internal_error"
                record.error_message = f"{type(err).__name__}: {err}"[:ERROR_MESSAGE_CHARS]
            raise
        finally:
            if record.endpoint == "other":
                record.endpoint = _routed_endpoint(scope)
            self.server.finish(record)
