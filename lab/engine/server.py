"""The OpenAI-compatible HTTP front end over the continuous-batching engine (FastAPI + uvicorn).

  POST /v1/completions  prompt as text or token ids; max_tokens, temperature, stream (SSE, one token per
                        event, `usage` in the last one), ignore_eos (vLLM's extension)
  GET  /health          503 until the engine has warmed up (compiled + captured), 503 while draining
  GET  /metrics         Prometheus text from this server's own registry
  POST /admin/drain     stop admitting; in-flight requests finish (SIGTERM does the same, then exits)

Back-pressure maps to status codes: full queue 429 + Retry-After, queue timeout 503 (code queue_timeout),
draining 503 (code draining), a request the engine can never serve 400. The engine runs the model in its
own thread; this event loop only moves tokens.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lab import startup
from lab.engine.batching import Engine
from lab.engine.batching import Request as EngineRequest
from lab.engine.tokenizer import IncrementalDecoder, Tokenizer
from lab.errors import LabError

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class CompletionRequest(BaseModel):
    """The subset of OpenAI's /v1/completions the engine serves; unknown fields are ignored (as vLLM
    does), fields that would change the answer in ways the engine cannot honour are refused."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    stream: bool = False
    n: int = 1
    top_p: float = 1.0
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Metrics:
    """Live Prometheus metrics on a private registry (several servers can share a process in tests)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("lab_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("lab_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.output_tokens = Counter("lab_output_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "lab_ttft_seconds", "Time to first token", registry=r, buckets=LATENCY_BUCKETS_S
        )
        self.tpot = Histogram(
            "lab_tpot_seconds", "Time per output token after the first", registry=r, buckets=LATENCY_BUCKETS_S
        )
        self.e2e = Histogram(
            "lab_e2e_seconds", "End-to-end request time", registry=r, buckets=LATENCY_BUCKETS_S
        )
        self.queue_wait = Histogram(
            "lab_queue_wait_seconds", "Time from arrival to admission", registry=r, buckets=LATENCY_BUCKETS_S
        )
        Gauge("lab_queue_depth", "Requests waiting for a batch slot", registry=r).set_function(
            lambda: (lambda s: s["waiting"] + s["waiting_long_context"])(engine.stats())
        )
        Gauge("lab_running_requests", "Requests in the running batch", registry=r).set_function(
            lambda: engine.stats()["running"]
        )
        Gauge("lab_ready", "1 once warmed up and not draining", registry=r).set_function(
            lambda: float(engine.ready.is_set() and not engine.draining)
        )
        Gauge("lab_max_batch_size", "Batch slots (--max-batch-size)", registry=r).set(
            engine.config.max_batch_size
        )
        Gauge(
            "lab_full_speed",
            "1 once the steps run in --mode; 0 while serving in --start-mode (compiling, or the compile failed)",
            registry=r,
        ).set_function(lambda: float(engine.mode == engine.config.mode))
        engine.listeners.append(self.observe)

    def observe(self, req: EngineRequest) -> None:
        self.requests.labels(outcome=req.outcome).inc()
        if req.t_admitted is not None:
            self.queue_wait.observe(req.t_admitted - req.t_submitted)
            self.prompt_tokens.inc(req.prompt_len)
        self.output_tokens.inc(len(req.tokens))
        if req.outcome != "ok":
            return
        self.ttft.observe(req.t_first_token - req.t_submitted)
        self.e2e.observe(req.t_done - req.t_submitted)
        if len(req.tokens) > 1:
            self.tpot.observe((req.t_done - req.t_first_token) / (len(req.tokens) - 1))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _Stream:
    """Bridges engine-thread events into this event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, req: EngineRequest, event: str) -> None:
        item = (event, req.tokens[-1] if event == "token" else None)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


LOOPBACK_CLIENTS = {"127.0.0.1", "::1", "localhost"}


def admin_refusal(request: Request, admin_token: str | None) -> JSONResponse | None:
    """`/admin/*` guard. With a token (--admin-token / $LAB_ADMIN_TOKEN) the call must carry
    `Authorization: Bearer <token>` (compared in constant time); without one only loopback clients may call.
    Returns the refusal, or None when the call may proceed."""
    import hmac

    if admin_token:
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), admin_token.encode()):
            return _error(401, "admin calls need 'Authorization: Bearer <the --admin-token>'", "unauthorized")
        return None
    client = request.client.host if request.client else None
    if client not in LOOPBACK_CLIENTS:
        return _error(
            403,
            f"admin calls are accepted from this host only (client {client}); start lab serve with "
            "--admin-token to allow them from elsewhere",
            "forbidden",
        )
    return None


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str = "lab",
    drain_timeout_s: float = 30.0,
    admin_token: str | None = None,
):
    """The ASGI app. Starting it (lifespan) starts the engine thread and its warm-up; shutting it down
    drains the engine and prints the drain report. `admin_token`: see admin_refusal."""
    from contextlib import asynccontextmanager

    metrics = Metrics(engine)
    state: dict[str, Any] = {"drain_report": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(warmup=True)
        yield
        report = await asyncio.to_thread(engine.drain, drain_timeout_s)
        state["drain_report"] = report
        import sys

        print("lab serve: drained " + json.dumps(report), file=sys.stderr, flush=True)

    app = FastAPI(title="lab serve", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.lab = engine, metrics, state

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = (
            f"{where}: {first.get('msg', 'invalid request')}"
            if where
            else first.get("msg", "invalid request")
        )
        return _error(400, msg, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "http_error")

    @app.exception_handler(Exception)
    async def _unexpected(
        request: Request, exc: Exception
    ):  # pragma: no cover - a bug, but never a bare 500 page
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    @app.get("/health")
    async def health():
        if engine.crashed:
            return JSONResponse({"status": "failed", "reason": engine.crashed}, status_code=503)
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not engine.ready.is_set():
            return JSONResponse({"status": "warming_up"}, status_code=503)
        return {
            "status": "ok",
            "warmup_s": engine.warmup_s,
            "compile_cache": engine.compile_cache_state,
            # Where the start's seconds went: epoch marks and the gaps between them (lab.startup).
            "startup": {"marks": dict(startup.MARKS), "phases_s": startup.phases()},
            **engine.stats(),
        }

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "lab"}]}

    @app.post("/admin/drain")
    async def drain(request: Request):
        refusal = admin_refusal(request, admin_token)
        if refusal is not None:
            return refusal
        engine.begin_drain()
        return {"status": "draining", **engine.stats()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if not engine.ready.is_set():
            return _error(
                503, "the engine is still warming up; retry after /health returns 200", "warming_up"
            )
        try:
            prompt_ids = _prompt_ids(body, tokenizer)
            _check_supported(body)
            engine.validate(prompt_ids, body.max_tokens, body.temperature)
        except LabError as e:
            return _error(400, str(e), "invalid_request")
        stream = _Stream(asyncio.get_running_loop())
        req = EngineRequest(
            prompt_ids, body.max_tokens, body.temperature, ignore_eos=body.ignore_eos, callback=stream
        )
        req.id = "cmpl-" + uuid.uuid4().hex[:24]
        engine.submit(req)
        # Wait for admission (or rejection) before answering, so back-pressure gets its status code.
        try:
            while True:
                event, _ = await stream.queue.get()
                if event in ("admitted", "done"):
                    break
        except asyncio.CancelledError:
            engine.cancel(req)
            raise
        if req.outcome is not None and req.outcome != "ok":
            return _rejection(req, engine)
        created = int(time.time())
        name = body.model or model_name
        if body.stream:
            return StreamingResponse(
                _sse(req, stream, tokenizer, name, created, engine),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": req.id},
            )
        try:
            while req.outcome is None:
                await stream.queue.get()
        except asyncio.CancelledError:
            engine.cancel(req)
            raise
        if req.outcome != "ok":
            return _rejection(req, engine)
        return {
            "id": req.id,
            "object": "text_completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "text": tokenizer.decode(req.tokens),
                    "logprobs": None,
                    "finish_reason": req.finish_reason,
                    "token_ids": req.tokens,
                }
            ],
            "usage": _usage(req),
        }

    return app


def _prompt_ids(body: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (list, str)):
        if len(p) != 1:
            raise LabError("send one prompt per request (batched prompts are not supported)")
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise LabError("prompt is empty")
        try:
            return tokenizer.encode(p)
        except UnicodeError:  # e.g. a lone UTF-16 surrogate ("\ud800"), valid JSON but not text
            raise LabError("prompt is not valid Unicode text; send UTF-8 text or token ids") from None
    if not p:
        raise LabError("prompt is empty")
    return list(p)


def _check_supported(body: CompletionRequest) -> None:
    if body.n != 1 or (body.best_of not in (None, 1)):
        raise LabError("n and best_of must be 1")
    if body.top_p != 1.0:
        raise LabError("top_p is not supported; leave it at 1")
    if body.stop:
        raise LabError("stop sequences are not supported")
    if body.echo or body.logprobs or body.suffix:
        raise LabError("echo, logprobs and suffix are not supported")


def _usage(req: EngineRequest) -> dict[str, int]:
    return {
        "prompt_tokens": req.prompt_len,
        "completion_tokens": len(req.tokens),
        "total_tokens": req.prompt_len + len(req.tokens),
    }


def _rejection(req: EngineRequest, engine: Engine) -> JSONResponse:
    if req.outcome == "rejected_queue_full":
        retry = max(1, math.ceil(engine.config.queue_timeout_s / 2))
        return _error(
            429,
            f"server busy: {req.reason}; retry after {retry} s",
            "queue_full",
            headers={"Retry-After": str(retry)},
        )
    if req.outcome == "timed_out_in_queue":
        return _error(503, f"queue timeout: {req.reason}", "queue_timeout")
    if req.outcome == "rejected_draining":
        return _error(503, req.reason or "draining", "draining")
    return _error(503, f"request {req.outcome}: {req.reason}", req.outcome or "error")


async def _sse(req, stream: _Stream, tokenizer: Tokenizer, name: str, created: int, engine: Engine):
    """One event per generated token; `usage` and finish_reason ride on the last token's event."""
    dec = IncrementalDecoder(tokenizer)
    sent = 0

    def chunk(text: str, token_id: int | None, finish: str | None, usage: dict | None) -> str:
        ev: dict[str, Any] = {
            "id": req.id,
            "object": "text_completion",
            "created": created,
            "model": name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }
        if token_id is not None:
            ev["choices"][0]["token_ids"] = [token_id]
        if usage is not None:
            ev["usage"] = usage
        return f"data: {json.dumps(ev)}\n\n"

    try:
        while True:
            event, tok = await stream.queue.get()
            if event == "token":
                sent += 1
                final = engine.final_reason(req, sent, tok)
                text = dec.push(tok)
                if final is None:
                    yield chunk(text, tok, None, None)
                    continue
                usage = {
                    "prompt_tokens": req.prompt_len,
                    "completion_tokens": sent,
                    "total_tokens": req.prompt_len + sent,
                }
                yield chunk(text + dec.flush(), tok, final, usage)
                break
            if event == "done":
                if req.outcome != "ok":
                    err = {"message": f"request {req.outcome}: {req.reason}", "code": req.outcome}
                    yield f"data: {json.dumps({'error': err, 'usage': _usage(req)})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if req.outcome is None:  # the client went away mid-stream: free the slot
            engine.cancel(req)
