"""The HTTP API (FastAPI on uvicorn, server-sent events by sse-starlette), compatible with the OpenAI client.

    app = create_app(engine, scheduler, model_name="quickstart", api_key=None, limits=schemas.Limits())

Routes:
    GET  /                       the page (static/index.html): a prompt, settings, the canvas filling in
    GET  /health                 {"status": "ok"} (no key needed)
    GET  /v1/models              the served model, with its sampler defaults under "ddlm"
    POST /v1/completions         OpenAI completions (schemas.parse_completion)
    POST /v1/chat/completions    OpenAI chat completions through the checkpoint's tokenizer / SFT template
    GET  /metrics                queue, batches by size, compiles, counts (JSON)

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a malformed request (param
names the field), 401 without the API key (when the server has one: `Authorization: Bearer <key>`), 404 for
another model's name, 413 for a body over 1 MiB, 503 when the queue is full, 504 when the request's timeout
passes first. Streaming (`stream: true`) sends OpenAI chunks as text is committed and, with
ddlm.canvases, a chunk per network call whose choice carries "ddlm": {"canvas": [token text or null when
masked, for each generated position], "step": network calls so far, "masked": positions still masked};
then "data: [DONE]". A client that disconnects leaves the queue at once (or its batch's result is dropped).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ddlm.serve import scheduler as scheduler_lib
from ddlm.serve import schemas
from ddlm.serve import text as text_lib
from ddlm.serve.schemas import RequestError

MAX_BODY_BYTES = 1 << 20
STATIC = os.path.join(os.path.dirname(__file__), "static")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(
    engine,
    scheduler,
    *,
    model_name: str,
    api_key: str | None = None,
    limits=None,
    request_timeout: float = 300.0,
) -> FastAPI:
    """The ASGI app serving `engine` (ddlm.serve.engine.Engine) through `scheduler` (started by the caller)."""
    limits = limits or schemas.Limits(max_n=min(8, engine.max_batch), max_timeout=request_timeout)
    if limits.max_n > engine.max_batch:  # a request's rows run in one batch
        raise ValueError(f"--max_n={limits.max_n} is more than the largest batch size {engine.max_batch}")
    app = FastAPI(title="ddlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler = engine, scheduler
    created = int(time.time())
    with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
        page = f.read()

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return _error_response(ApiError(400, e.message, kind="invalid_request_error", param=e.param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return _error_response(ApiError(e.status_code, str(e.detail), kind="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return _error_response(ApiError(500, f"{type(e).__name__}: {e}", kind="server_error"))

    def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                kind="invalid_request_error",
                code="invalid_api_key",
            )

    async def read_body(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(
                413, f"the body is {len(raw)} bytes, more than {MAX_BODY_BYTES}", kind="invalid_request_error"
            )
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError("body", f"not valid JSON ({e})") from None

    def model_card() -> dict:
        sc = engine.base
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "ddlm",
            "ddlm": {
                "sampler": sc.name,
                "samplers": list(engine.samplers),
                "steps": sc.steps,
                "block_length": sc.block_length,
                "rule": sc.rule,
                "seq_len": engine.seq_len,
                "batch_sizes": list(engine.batch_sizes),
                "max_n": limits.max_n,
                "loss": engine.config.diffusion.loss,
                "checkpoint_step": int(engine.loaded.step) if engine.loaded.step is not None else None,
            },
        }

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request):
        authorize(request)
        if name != model_name:
            raise ApiError(
                404,
                f"no model {name!r}; this server serves {model_name!r}",
                kind="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return scheduler.metrics()

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = schemas.parse_completion(await read_body(request), limits)
        return await _serve(request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = schemas.parse_chat(await read_body(request), limits)
        return await _serve(request, req)

    # ------------------------------------------------------------------------------------------------ serving

    def build_job(req: schemas.Request) -> tuple[scheduler_lib.Job, list, int, float]:
        if req.model is not None and req.model != model_name:
            raise ApiError(
                404,
                f"no model {req.model!r}; this server serves {model_name!r}",
                kind="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        settings = engine.settings(req.temperature, req.top_p, req.top_k, req.sampler)
        seed = req.seed if req.seed is not None else secrets.randbelow(schemas.MAX_SEED + 1)
        if req.chat:
            prompts = [("messages", lambda: engine.chat_ids(req.messages, settings))]
        else:
            prompts = [
                (
                    "prompt" if len(req.prompts) == 1 else f"prompt[{i}]",
                    lambda p=p: engine.prompt_ids(p, settings),
                )
                for i, p in enumerate(req.prompts)
            ]
        rows, prompt_tokens = [], 0
        for param, encode in prompts:
            try:
                ids = encode()
            except ValueError as e:  # a character the tokenizer cannot encode
                raise RequestError(param, str(e)) from None
            limit = min(limits.max_prompt_tokens, engine.seq_len - 1)
            if len(ids) > limit:
                raise RequestError(
                    param, f"is {len(ids)} tokens; at most {limit} (the canvas is {engine.seq_len})"
                )
            room = engine.seq_len - len(ids)
            max_tokens = req.max_tokens or room
            if max_tokens > room:
                raise RequestError(
                    req.max_tokens_field,
                    f"at most {room} after a prompt of {len(ids)} tokens (canvas of {engine.seq_len}), got {max_tokens}",
                )
            prompt_tokens += len(ids)
            for choice in range(req.n):
                rows.append(
                    engine.row(
                        ids,
                        settings,
                        seed=seed,
                        choice=choice,
                        temperature=engine.temperature(req.temperature),
                        max_tokens=max_tokens,
                    )
                )
        timeout = min(req.timeout or request_timeout, request_timeout)
        job = scheduler_lib.Job(
            rows, settings, asyncio.get_running_loop(), time.monotonic() + timeout, live=req.stream
        )
        return job, rows, prompt_tokens, seed

    async def _serve(request: Request, req: schemas.Request):
        job, rows, prompt_tokens, seed = build_job(req)
        try:
            scheduler.submit(job)
        except scheduler_lib.QueueFull as e:
            raise ApiError(503, str(e), kind="server_overloaded", code="queue_full") from None
        meta = {
            "id": f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model_name,
        }
        if req.stream:
            return EventSourceResponse(_stream(request, req, job, rows, prompt_tokens, seed, meta), ping=15)
        try:
            await _wait(request, job)
        except TimeoutError:
            raise _timeout(job) from None
        except scheduler_lib.JobCancelled:
            raise ApiError(499, "the client closed the request", kind="invalid_request_error") from None
        choices, completion_tokens = [], 0
        for i, row in enumerate(rows):
            text, reason, count = text_lib.final_text(engine.tok, job.tokens[i], row.start, row.end, req.stop)
            completion_tokens += count
            extra = {"ddlm": _row_info(job, i, seed)}
            if req.chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reason,
                        "logprobs": None,
                        **extra,
                    }
                )
            else:
                choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None, **extra})
        return {
            **meta,
            "object": "chat.completion" if req.chat else "text_completion",
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
            "ddlm": _job_info(job, seed),
        }

    def _row_info(job, i, seed) -> dict:
        row = job.rows[i]
        return {
            "tokens": [int(t) for t in job.tokens[i][row.start : row.end]],
            "nfe": int(job.nfe[i]),
            "seed": seed,
            "choice": row.choice,
        }

    def _job_info(job, seed) -> dict:
        sc = job.settings.sampler
        return {
            "seed": seed,
            "sampler": sc.name,
            "steps": sc.steps,
            "batch_rows": job.batch_size,
            "batch_size": job.compiled_size,
            "queue_s": round((job.started or job.created) - job.created, 4),
        }

    def _timeout(job) -> ApiError:
        job.cancel("timeouts")
        return ApiError(
            504,
            "the request timed out (ddlm.timeout or the server's --request_timeout)",
            kind="timeout",
            code="timeout",
        )

    async def _wait(request: Request, job) -> None:
        """Until the job is done; TimeoutError at its deadline, JobCancelled if the client disconnects."""
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {job.done, watcher},
                timeout=max(0.0, job.deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if job.done in done:
                job.done.result()
                return
            if watcher in done:
                job.cancel()
                raise scheduler_lib.JobCancelled()
            raise TimeoutError()
        finally:
            watcher.cancel()

    async def _stream(request, req, job, rows, prompt_tokens, seed, meta):
        tok = engine.tok
        streams = [
            text_lib.TextStream(tok, r.x_init, r.start, r.end, req.stop, job.settings.final_once_unmasked)
            for r in rows
        ]
        index = {id(r): i for i, r in enumerate(rows)}
        obj = "chat.completion.chunk" if req.chat else "text_completion"

        def chunk(i, text=None, reason=None, ddlm=None):
            if req.chat:
                choice = {
                    "index": i,
                    "delta": {} if text is None else {"content": text},
                    "finish_reason": reason,
                    "logprobs": None,
                }
            else:
                choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
            if ddlm is not None:
                choice["ddlm"] = ddlm
            return json.dumps({**meta, "object": obj, "choices": [choice]})

        def canvas(i) -> dict:
            s = streams[i]
            span = s.span()
            pieces = [None if t == tok.mask_id else engine.piece(int(t)) for t in span]
            return {"canvas": pieces, "step": s.calls, "masked": s.masked()}

        sent = [None] * len(rows)  # the canvas each choice's last canvas chunk showed

        def canvas_chunk(i) -> str | None:
            span = streams[i].span()
            if sent[i] is not None and np.array_equal(sent[i][0], span) and sent[i][1] == streams[i].calls:
                return None
            sent[i] = (span.copy(), streams[i].calls)
            return chunk(i, None if req.chat else "", ddlm=canvas(i))

        def apply(events) -> list[str]:
            """The chunks of the canvases that arrived: with ddlm.canvases a frame (and its text) per network
            call; else one text delta per choice for all of them (a server behind on its stream catches up in
            fewer, longer chunks)."""
            out, changed = [], {}
            for _, row, positions, tokens in events:
                i = index[id(row)]
                streams[i].update(positions, tokens)
                changed[i] = True
                if req.canvases:
                    if delta := streams[i].delta():
                        out.append(chunk(i, delta))
                    if (line := canvas_chunk(i)) is not None:
                        out.append(line)
            if not req.canvases:
                out += [chunk(i, delta) for i in changed if (delta := streams[i].delta())]
            return out

        finished = set()
        try:
            if req.chat:
                for i in range(len(rows)):
                    yield json.dumps(
                        {
                            **meta,
                            "object": obj,
                            "choices": [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None,
                                    "logprobs": None,
                                }
                            ],
                        }
                    )
            while True:
                getter = asyncio.ensure_future(job.events.get())
                timeout = max(0.0, job.deadline - time.monotonic())
                done, _ = await asyncio.wait(
                    {getter, job.done}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                events = [getter.result()] if getter in done else []
                while not job.events.empty():
                    events.append(job.events.get_nowait())
                for line in apply(events):
                    yield line
                if not done:
                    e = _timeout(job)
                    yield json.dumps(e.body())
                    return
                if job.done.done():
                    break
            try:
                job.done.result()
            except TimeoutError:
                yield json.dumps(_timeout(job).body())
                return
            except Exception as e:  # noqa: BLE001 -- the batch failed: said in the stream, which then ends
                yield json.dumps(ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body())
                return
            completion_tokens = 0
            for i, row in enumerate(rows):
                rest = streams[i].close(job.tokens[i])
                _, reason, count = text_lib.final_text(tok, job.tokens[i], row.start, row.end, req.stop)
                completion_tokens += count
                if req.canvases and (line := canvas_chunk(i)) is not None:
                    yield line
                yield chunk(i, rest if rest or not req.chat else None, reason, ddlm=_row_info(job, i, seed))
                finished.add(i)
            if req.include_usage:
                yield json.dumps(
                    {
                        **meta,
                        "object": obj,
                        "choices": [],
                        "usage": _usage(prompt_tokens, completion_tokens),
                        "ddlm": _job_info(job, seed),
                    }
                )
            yield "[DONE]"
        finally:
            if not job.done.done():
                job.cancel()

    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read: the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
