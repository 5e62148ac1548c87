"""An OpenAI-compatible HTTP server for any hf: or gguf: model.

    fabrika serve hf:runs/x/sft/model --port 8000 [--api-key KEY]
    fabrika serve gguf:runs/x/export/model-q4_k_m.gguf

POST /v1/chat/completions (plain and SSE streaming), GET /v1/models, GET /health. It behaves as the
official openai client expects (and as vLLM's server does): omitted max_tokens means the rest of the
context, content may be a list of text parts, n>1 streams every choice, stream_options.include_usage is
honoured. Concurrent non-streaming requests with the same sampling settings are gathered for a few
milliseconds and run as one batched generate (hf backend), which is where a served model gets its
throughput.

Hostile or unlucky input never takes the server down: bodies and prompts are capped before parsing and
tokenizing, a generation that fails ends its stream with an error event, a client that goes away stops
its generation, and every error is an OpenAI-shaped JSON body with the matching status. Binds 127.0.0.1
unless told otherwise.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, Field

from fabrika.errors import FabrikaError
from fabrika.infer.backends import load_generator
from fabrika.infer.generation import Completion, ContextTooLong, GenerationParams, Generator
from fabrika.models.refs import parse_ref

log = logging.getLogger("uvicorn.error")  # printed with the server's own log lines
INT64 = 2**63


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        """The message as plain text; text parts are joined by newlines, as vLLM does."""
        if isinstance(self.content, str) or self.content is None:
            return self.content or ""
        other = next((p.type for p in self.content if p.type != "text" or p.text is None), None)
        if other is not None:
            raise ApiError(400, f"messages[{index}].content: only text parts are supported, not {other!r}",
                           param=f"messages.{index}.content")
        return "\n".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    def params(self, max_new_tokens: int) -> GenerationParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        # a vanishing temperature turns logits into inf and NaN; it means greedy, as vLLM reads it
        temperature = self.temperature if self.temperature >= 1e-5 else 0.0
        return GenerationParams(temperature=temperature, top_p=self.top_p, n=self.n, seed=self.seed, stop=stop,
                                max_new_tokens=max_new_tokens)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """A request the server answers with an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, kind, param, code), headers

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


class Guard:
    """ASGI middleware in front of everything: the API key (constant-time compare, any case of `Bearer`;
    only /health is open, for probes) and the body cap. The body is read here, at most `max_body` bytes of
    it, so an oversized request is refused before anything parses or stores it."""

    def __init__(self, app, api_key: str | None, max_body: int) -> None:
        self.app, self.key, self.max_body = app, (api_key or "").encode(), max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key and scope["path"] != "/health" and not self._authorized(headers.get(b"authorization", b"")):
            return await _reply(send, 401, error_body("invalid or missing API key", "authentication_error",
                                                      code="invalid_api_key"))
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(send)
            more = message.get("more_body", False)
        replayed = False

        async def body_then_receive():
            nonlocal replayed
            if replayed:
                return await receive()  # later reads learn of a disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, body_then_receive, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self.key)

    async def _too_large(self, send) -> None:
        await _reply(send, 413, error_body(f"the request body is larger than this server's limit of "
                                           f"{self.max_body:,} bytes (fabrika serve --max-body-mb)",
                                           code="request_too_large"))


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


@dataclass
class _Pending:
    conv: list[dict[str, str]]
    params: GenerationParams
    future: asyncio.Future


class Batcher:
    """Gathers requests for `window_s` and runs those with equal settings as one generate call."""

    def __init__(self, generator: Generator, max_batch: int = 16, window_s: float = 0.01) -> None:
        self.gen, self.max_batch, self.window = generator, max_batch, window_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def submit(self, conv, params: GenerationParams):
        if self.task is None:
            self.task = asyncio.create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(conv, params, fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            groups: dict[str, list[_Pending]] = {}
            for p in batch:
                groups.setdefault(p.params.model_dump_json(), []).append(p)
            for group in groups.values():
                try:
                    results = await asyncio.to_thread(self.gen.generate, [p.conv for p in group], group[0].params)
                    for p, r in zip(group, results):
                        if not p.future.done():  # a request cancelled meanwhile
                            p.future.set_result(r)
                except Exception as e:  # one bad batch fails its requests, never the server
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(e)


def _failure(e: BaseException) -> ApiError:
    if isinstance(e, ContextTooLong):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, FabrikaError):
        return ApiError(400, str(e))
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


def create_app(generator: Generator, model_name: str, api_key: str | None = None, max_body_mb: float = 4.0,
               max_queue: int = 256, max_batch: int = 16):
    """The ASGI app. `max_queue` requests may generate or wait at once; more get 429 (clients retry)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="fabrika serve")
    app.add_middleware(Guard, api_key=api_key, max_body=int(max_body_mb * 2**20))
    batcher = Batcher(generator, max_batch=max_batch)
    running = [0]  # requests generating or waiting to

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}"),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):  # uvicorn still logs the traceback
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": running[0]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "fabrika"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{model_name}`.",
                           param="model", code="model_not_found")
        if running[0] >= max_queue:
            raise ApiError(429, f"the server is busy ({running[0]} requests in flight); retry shortly",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"retry-after": "1"})
        conv = req.conversation()
        try:
            prompt = await asyncio.to_thread(generator.prompt_tokens, conv)
        except FabrikaError as e:
            raise _failure(e) from None
        room = generator.context - prompt
        wanted = req.max_completion_tokens or req.max_tokens or room
        if wanted > room:
            raise _failure(ContextTooLong(f"the prompt has {prompt} tokens and max_tokens is {wanted}: more than "
                                          f"the model's context of {generator.context} tokens"))
        params = req.params(wanted)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = _Stream(generator, conv, params, rid, created, model_name, usage, running)
            return StreamingResponse(stream.events(), media_type="text/event-stream")
        running[0] += 1
        try:
            choices = await batcher.submit(conv, params)
        except Exception as e:  # noqa: BLE001 - the request fails, the server keeps serving
            raise _failure(e) from None
        finally:
            running[0] -= 1
        completion = sum(c.completion_tokens for c in choices)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    return app


_END = object()


@dataclass
class _Stream:
    """One streamed request: a worker thread generates its n choices one after another and hands pieces to
    the event loop; the events end with an error event when generation fails, and the worker stops (within a
    token) when the client goes away."""

    generator: Generator
    conv: list[dict[str, str]]
    params: GenerationParams
    rid: str
    created: int
    model: str
    include_usage: bool
    running: list[int]

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body: dict[str, Any] = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _work(self, put: Callable[[Any], None], cancel: threading.Event) -> None:
        try:
            for i in range(self.params.n):
                seed = None if self.params.seed is None else self.params.seed + i  # n different answers
                put(("start", i))
                steps = self.generator.stream(self.conv, self.params.model_copy(update={"n": 1, "seed": seed}), cancel)
                while True:
                    try:
                        put(("piece", i, next(steps)))
                    except StopIteration as end:
                        finished = end.value
                        break
                put(("end", i, finished))
                if cancel.is_set():
                    done = finished.completion_tokens if isinstance(finished, Completion) else "?"
                    log.info("%s: the client went away; generation stopped after %s of at most %d tokens",
                             self.rid, done, self.params.max_new_tokens)
                    return
        except Exception as e:  # noqa: BLE001 - reported to the client as an error event
            put(("error", e))
        finally:
            put(_END)

    async def events(self):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shut down): nobody is listening
                cancel.set()

        self.running[0] += 1
        worker = threading.Thread(target=self._work, args=(put, cancel), name=f"fabrika-stream-{self.rid}",
                                  daemon=True)
        worker.start()
        done: list[Completion | None] = []
        try:
            while (item := await queue.get()) is not _END:
                kind, *rest = item
                if kind == "start":
                    yield self._chunk([{"index": rest[0], "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
                elif kind == "piece":
                    yield self._chunk([{"index": rest[0], "delta": {"content": rest[1]}, "logprobs": None,
                                        "finish_reason": None}])
                elif kind == "end":
                    c = rest[1]
                    done.append(c)
                    yield self._chunk([{"index": rest[0], "delta": {}, "logprobs": None,
                                        "finish_reason": c.finish_reason if c else "stop"}])
                else:
                    error = _failure(rest[0])
                    log.warning("%s: %s", self.rid, error.body["error"]["message"])
                    yield f"data: {json.dumps(error.body)}\n\n"
                    break
            else:
                if self.include_usage:
                    prompt = next((c.prompt_tokens for c in done if c), 0)
                    completion = sum(c.completion_tokens for c in done if c)
                    yield self._chunk([], {"prompt_tokens": prompt, "completion_tokens": completion,
                                           "total_tokens": prompt + completion})
            yield "data: [DONE]\n\n"
        finally:  # finished, failed, or the client went away
            cancel.set()
            self.running[0] -= 1


@dataclass
class ServerHandle:
    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def bind(host: str, port: int) -> socket.socket:
    """The listening address, claimed before the model loads: a port in use is a clear error at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise FabrikaError(f"port {port} on {host} is already in use: stop what holds it, or pick another "
                               "--port (0 picks a free one)") from None
        raise FabrikaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _url(host: str, sock: socket.socket) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}/v1"


def _load(model_ref: str, name: str | None, api_key: str | None, limits: dict[str, Any], **options: Any):
    if not parse_ref(model_ref).local:
        raise FabrikaError(f"{model_ref}: serve takes a local model (hf:DIR_OR_ID or gguf:FILE)")
    generator = load_generator(model_ref, **options)
    return generator, create_app(generator, name or generator.name, api_key=api_key, **limits)


def start_server(model_ref: str, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 name: str | None = None, max_body_mb: float = 4.0, max_queue: int = 256,
                 **options: Any) -> ServerHandle:
    """The server on its own thread in this process, once it accepts requests (infer/local.py serves a
    model for the duration of a job this way)."""
    import uvicorn

    sock = bind(host, port)
    try:
        _, app = _load(model_ref, name, api_key, {"max_body_mb": max_body_mb, "max_queue": max_queue}, **options)
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    if not server.started:
        raise FabrikaError(f"the server for {model_ref} did not start on {host}:{sock.getsockname()[1]}")
    return ServerHandle(url=_url(host, sock), server=server, thread=thread)


def serve_forever(model_ref: str, host: str, port: int, api_key: str | None, name: str | None,
                  max_body_mb: float = 4.0, max_queue: int = 256, engine: str | None = None) -> None:
    """`fabrika serve`: prints the URL once it accepts requests; Ctrl-C or SIGTERM finish the requests in
    flight (at most a few seconds) and exit 0."""
    import uvicorn

    from fabrika.infer import vllm_engine  # engine choice: vLLM serves with its own server

    model = parse_ref(model_ref)
    if model.kind in ("hf", "vllm") and vllm_engine.choose_engine(model.kind, model.path, engine) == "vllm":
        return vllm_engine.serve_forever(model.path, host, port, api_key, name)
    sock = bind(host, port)
    generator, app = _load(model_ref, name, api_key, {"max_body_mb": max_body_mb, "max_queue": max_queue},
                           engine="transformers")
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            print(f"serving {model_ref} as {name or generator.name} at {_url(host, sock)}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    # uvicorn handles the signals while it runs, then raises them again once it has shut down: by then they
    # have done their work, so they must not turn into a traceback or a killed process
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
    print("server stopped", flush=True)
