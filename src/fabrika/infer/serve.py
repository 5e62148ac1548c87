"""An OpenAI-compatible HTTP server for any hf: or gguf: model.

    fabrika serve hf:runs/x/sft/model --port 8000 [--api-key KEY]
    fabrika serve gguf:runs/x/export/model-q4_k_m.gguf

POST /v1/chat/completions (plain and SSE streaming), GET /v1/models, GET /health. Concurrent
non-streaming requests with the same sampling settings are gathered for a few milliseconds and run
as one batched generate (hf backend), which is where a served model gets its throughput; errors come
back as OpenAI-style JSON bodies, never as a crashed server. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, Field, ValidationError

from fabrika.errors import FabrikaError
from fabrika.infer.backends import ContextTooLong, GenerationParams, Generator, load_generator, parse_ref


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    def params(self, default_max: int) -> GenerationParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return GenerationParams(temperature=self.temperature, top_p=self.top_p, n=self.n, seed=self.seed, stop=stop,
                                max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
                        p.future.set_result(r)
                except Exception as e:  # one bad batch fails its requests, never the server
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(e)


def create_app(generator: Generator, model_name: str, api_key: str | None = None, default_max_tokens: int = 512,
               max_batch: int = 16):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="fabrika serve")
    batcher = Batcher(generator, max_batch=max_batch)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param),
                            status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "fabrika"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        try:
            params = req.params(default_max_tokens)
        except ValidationError as e:
            return JSONResponse(error_body(str(e.errors()[0]["msg"])), status_code=400)
        conv = [m.model_dump() for m in req.messages]
        try:
            await asyncio.to_thread(generator.check_length, conv, params)
        except ContextTooLong as e:
            return JSONResponse(error_body(str(e), param="messages", code="context_length_exceeded"), status_code=400)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_sse(generator, conv, params, rid, created, model_name),
                                     media_type="text/event-stream")
        try:
            choices = await batcher.submit(conv, params)
        except FabrikaError as e:
            return JSONResponse(error_body(str(e)), status_code=400)
        except Exception as e:  # noqa: BLE001 - report, keep serving
            return JSONResponse(error_body(f"{type(e).__name__}: {e}", "server_error"), status_code=500)
        prompt = choices[0].prompt_tokens
        completion = sum(c.completion_tokens for c in choices)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    return app


async def _sse(generator: Generator, conv, params: GenerationParams, rid: str, created: int, model: str):
    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    done = object()

    def work() -> None:
        try:
            for piece in generator.stream(conv, params):
                loop.call_soon_threadsafe(queue.put_nowait, piece)
        except Exception as e:  # noqa: BLE001
            loop.call_soon_threadsafe(queue.put_nowait, e)
        loop.call_soon_threadsafe(queue.put_nowait, done)

    threading.Thread(target=work, daemon=True).start()
    pieces = 0
    while (item := await queue.get()) is not done:
        if isinstance(item, Exception):
            yield f"data: {json.dumps(error_body(str(item), 'server_error'))}\n\n"
            break
        pieces += 1
        yield chunk({"content": item})
    yield chunk({}, "length" if pieces >= params.max_new_tokens else "stop")
    yield "data: [DONE]\n\n"


@dataclass
class ServerHandle:
    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextmanager
def serve_in_background(model_ref: str, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                        **options: Any) -> Iterator[ServerHandle]:
    """Serve a model on a free loopback port in this process (tests, the embedded teacher and judge)."""
    handle = start_server(model_ref, host, port, api_key, **options)
    try:
        yield handle
    finally:
        handle.stop()


def start_server(model_ref: str, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 name: str | None = None, **options: Any) -> ServerHandle:
    import uvicorn

    generator = load_generator(model_ref, **options)
    app = create_app(generator, name or generator.name, api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    if not server.started:
        raise FabrikaError(f"the server for {model_ref} did not start on {host}:{port}")
    bound = server.servers[0].sockets[0].getsockname()[1]
    return ServerHandle(url=f"http://{host}:{bound}/v1", server=server, thread=thread)


def serve_forever(model_ref: str, host: str, port: int, api_key: str | None, name: str | None) -> None:
    import uvicorn

    from fabrika.infer import vllm_engine  # engine choice: vLLM serves with its own server

    kind, target = parse_ref(model_ref)
    if kind in ("hf", "vllm") and vllm_engine.choose_engine(kind, target) == "vllm":
        return vllm_engine.serve_forever(target, host, port, api_key, name)
    generator = load_generator(model_ref, engine="transformers")
    app = create_app(generator, name or generator.name, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    server = uvicorn.Server(config)

    async def main():
        await server.startup()
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1]
            print(f"serving {model_ref} as {name or generator.name} at http://{host}:{bound}/v1", flush=True)
            await server.main_loop()
        await server.shutdown()

    asyncio.run(main())


def ask_model(ref: str, convs: list[list[dict]], params: GenerationParams, client: dict[str, Any], quiet: bool,
              on_result: Callable[[int, Any], None]) -> None:
    """Many requests to one model through the client: cached, retried, concurrent. A local model (hf:,
    gguf:) is served on loopback for the duration, so it gets the same cache, journal and batching as
    an API model. `on_result(i, completions or the failure)` is called as each answer arrives."""
    from fabrika.infer.client import ClientConfig, run_requests

    kind, target = parse_ref(ref)
    if kind == "openai":
        model, _, url = target.partition("@")
        run_requests(ClientConfig(**{**client, **({"base_url": url} if url else {})}), model, convs, params,
                     quiet=quiet, on_result=on_result)
        return
    from fabrika.infer.vllm_engine import choose_engine, vllm_server  # engine choice: vLLM or fabrika's server

    on_vllm = kind in ("hf", "vllm") and choose_engine(kind, target) == "vllm"
    local = vllm_server(target, name=target) if on_vllm else serve_in_background(ref, name=target, engine="transformers")
    with local as server:  # the cache knows it by its files' content
        options = {"concurrency": 8, "timeout_s": 3600.0, **client, "base_url": server.url}
        run_requests(ClientConfig(**options), target, convs, params, quiet=quiet, on_result=on_result,
                     local_model=target)
