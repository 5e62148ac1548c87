"""A local model served on loopback for the duration of a job, reached through the same client as an API.

Jobs of many requests (collect's teacher, student and judge; MT-Bench's judge; rl's judge)
send them through the client whatever the model: an `openai:` model directly, an `hf:`/`gguf:` model
by fabrika's own server (infer/serve.py) or vLLM's (infer/vllm_engine.py, when the engine setting picks
it) on a free loopback port, stopped when the job ends. Caching, journaling, retries and batching are
then the same for every model, and the cache knows a local model by its files' content, not its port.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from fabrika.infer.client import ClientConfig, run_requests
from fabrika.infer.generation import GenerationParams, Messages
from fabrika.models.refs import parse_ref

if TYPE_CHECKING:
    from fabrika.infer.serve import ServerHandle

# one local model answers fewer requests at once than an API, and long answers take long on a small machine
LOCAL_CLIENT = {"concurrency": 8, "timeout_s": 3600.0}


@dataclass(frozen=True)
class Endpoint:
    """Where requests for one model go: the model name they carry, the client settings (with the base URL
    of the server), and the model's files when it is local (the response cache's key for it)."""

    model: str
    client: dict[str, Any]
    local_model: str | None = None


@contextmanager
def serve_in_background(model_ref: str, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                        **options: Any) -> Iterator[ServerHandle]:
    """fabrika's server for a local model on a free loopback port in this process, stopped on leaving;
    yields its handle (`url`)."""
    from fabrika.infer.serve import start_server

    handle = start_server(model_ref, host, port, api_key, **options)
    try:
        yield handle
    finally:
        handle.stop()


@contextmanager
def endpoint(ref: str, client: dict[str, Any]) -> Iterator[Endpoint]:
    """The endpoint for `ref` with the `client` settings given: an API model as it is, a local one served
    on loopback (by vLLM when the engine setting picks it) until the `with` block ends."""
    model = parse_ref(ref)
    if not model.local:
        yield Endpoint(model.model, {**client, **({"base_url": model.url} if model.url else {})})
        return
    from fabrika.infer.vllm_engine import choose_engine, vllm_server

    on_vllm = model.kind in ("hf", "vllm") and choose_engine(model.kind, model.path) == "vllm"
    server = (vllm_server(model.path, name=model.path) if on_vllm
              else serve_in_background(ref, name=model.path, engine="transformers"))
    with server as running:
        yield Endpoint(model.model, {**LOCAL_CLIENT, **client, "base_url": running.url}, model.path)


def ask_model(ref: str, convs: list[Messages], params: GenerationParams, client: dict[str, Any], quiet: bool,
              on_result: Callable[[int, Any], None]) -> None:
    """Many requests to one model through the client: cached, retried, concurrent, whether the model is an
    API's or local. `on_result(i, completions or the failure)` is called as each answer arrives."""
    with endpoint(ref, client) as where:
        run_requests(ClientConfig(**where.client), where.model, convs, params, quiet=quiet, on_result=on_result,
                     local_model=where.local_model)
