"""A client for jobs of thousands of chat requests to any OpenAI-compatible endpoint.

Built on the official `openai` async client (its own retries off): bounded concurrency, optional
requests- and tokens-per-minute limits, retries of 429/5xx/timeouts/dropped connections with
exponential backoff and jitter that honours Retry-After, for at most `max_retry_s` per request, an
immediate stop on errors that cannot succeed (401/403/404, and an endpoint that refuses or cannot be
resolved before it has answered once), token and cost accounting, and an on-disk response cache so
that a re-run never pays twice. The cache lives outside any stage directory (per user unless
`cache_dir` says otherwise): a stage restarted with other settings still finds every answer it paid
for. The API key is read from the environment variable the config names and never written anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Literal

from pydantic import Field

from fabrika.config import Config
from fabrika.errors import FabrikaError
from fabrika.infer.costs import api_cost
from fabrika.infer.generation import Completion, GenerationParams, Messages

FATAL = {401: "the API key was rejected", 403: "access to this model is forbidden", 404: "no such model or endpoint"}


class BatchSettings(Config):
    """How `mode: batch` uses OpenAI's Batch API (infer/batch.py)."""

    poll_s: float = Field(60.0, gt=0, description="Seconds between two looks at the batches in flight.")
    max_requests: int = Field(50_000, ge=1, le=50_000, description="Requests per batch (OpenAI: 50,000 at most).")
    max_bytes: int = Field(200_000_000, ge=1, le=200_000_000, description="Bytes of one batch's input file "
                           "(OpenAI: 200 MB at most).")
    retry: Literal["batch", "online", "none"] = Field("batch", description="Failed and expired requests are sent "
                                                      "again in a new batch, online, or not at all.")
    max_rounds: int = Field(3, ge=1, description="Times one request is sent at most in one run.")


class ClientConfig(Config):
    mode: Literal["online", "batch"] = Field("online", description="online: requests answered at once; batch: "
                                             "through OpenAI's Batch API, at half the price, within 24 hours.")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Batch API settings (mode: batch).")
    base_url: str = Field("https://api.openai.com/v1", description="OpenAI-compatible endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="Name of the environment variable holding the key (never the key).")
    concurrency: int = Field(16, ge=1, le=1024, description="Requests in flight at once.")
    requests_per_minute: float | None = Field(None, gt=0, description="Request rate limit.")
    tokens_per_minute: float | None = Field(None, gt=0, description="Token rate limit (prompt + max answer).")
    max_retries: int = Field(8, ge=0, description="Retries of one request before it fails.")
    max_retry_s: float = Field(120.0, gt=0, description="Longest time one request keeps retrying before it fails.")
    timeout_s: float = Field(600.0, gt=0, description="Timeout of one request.")
    backoff_base_s: float = Field(1.0, gt=0, description="First retry delay; doubles each time.")
    backoff_max_s: float = Field(60.0, gt=0, description="Longest retry delay.")
    cache_dir: str | None = Field(None, description="Response cache directory (off when unset; stages default "
                                  "to the per-user cache, see default_cache_dir).")
    prices: dict[str, tuple[float, float]] = Field(default_factory=dict, description="$ per 1M tokens in/out.")
    budget_usd: float | None = Field(None, gt=0, description="Stop starting requests once this is spent.")


def default_cache_dir() -> Path:
    """The per-user response cache: $FABRIKA_CACHE_DIR, else $XDG_CACHE_HOME/fabrika/responses, else
    ~/.cache/fabrika/responses. Shared by every run of this user, so that the same request to the
    same model with the same settings is paid for once, whichever run or stage directory asks."""
    if os.environ.get("FABRIKA_CACHE_DIR"):
        return Path(os.environ["FABRIKA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fabrika" / "responses"


class RequestFailed(FabrikaError):
    """One request failed for good (bad request, or retries exhausted)."""


class JobStopped(FabrikaError):
    """The whole job must stop: authentication, permission or a missing model."""


def _key(config: ClientConfig) -> str:
    key = os.environ.get(config.api_key_env)
    if key:
        return key
    if "api.openai.com" in config.base_url:
        raise JobStopped(f"no API key: set the environment variable {config.api_key_env}")
    return "none"  # local servers usually need no key


class ResponseCache:
    """sqlite keyed by everything that changes an answer: the endpoint (its base URL, or the content
    of a local model's files), the model name, the messages and every sampling parameter. WAL mode,
    one commit per response; several processes may share one cache."""

    def __init__(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(Path(directory) / "responses.sqlite"), check_same_thread=False, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process; no fsync per response
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS file_hashes (path TEXT, size INTEGER, mtime_ns INTEGER, "
                        "sha256 TEXT, PRIMARY KEY (path, size, mtime_ns))")
        self.lock = threading.Lock()

    @staticmethod
    def key(endpoint: str, model: str, messages: Messages, params: GenerationParams) -> str:
        blob = json.dumps([endpoint, model, messages, params.model_dump(mode="json")], sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def content_id(self, path: str | Path) -> str:
        """A fingerprint of a local model's bytes (a directory's files or one GGUF file): a model
        retrained in place must not be answered from its predecessor's cache. Each file's sha256 is
        remembered by (path, size, mtime), so a 16 GB model is read once, not on every run."""
        from fabrika.artifacts import file_sha256

        root = Path(path)
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            where = (str(f.resolve()), st.st_size, st.st_mtime_ns)
            with self.lock:
                row = self.db.execute("SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
                                      where).fetchone()
            digest = row[0] if row else file_sha256(f)
            if not row:
                with self.lock:
                    self.db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (*where, digest))
                    self.db.commit()
            h.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{digest}\0".encode())
        return "sha256:" + h.hexdigest()

    def get(self, key: str) -> list[dict] | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: list[dict]) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(value)))
            self.db.commit()


class RateLimiter:
    """Requests- and tokens-per-minute as token buckets refilled continuously."""

    def __init__(self, rpm: float | None, tpm: float | None) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.req, self.tok = rpm or 0.0, tpm or 0.0
        self.t = time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        if not self.rpm and not self.tpm:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                dt, self.t = now - self.t, now
                if self.rpm:
                    self.req = min(self.rpm, self.req + dt * self.rpm / 60)
                if self.tpm:
                    self.tok = min(self.tpm, self.tok + dt * self.tpm / 60)
                if (not self.rpm or self.req >= 1) and (not self.tpm or self.tok >= min(tokens, self.tpm)):
                    self.req -= 1 if self.rpm else 0
                    self.tok -= tokens if self.tpm else 0
                    return
                wait = max((1 - self.req) * 60 / self.rpm if self.rpm else 0,
                           (min(tokens, self.tpm) - self.tok) * 60 / self.tpm if self.tpm else 0)
                await asyncio.sleep(max(wait, 0.01))


@dataclass
class JobStats:
    total: int = 0
    done: int = 0
    failed: int = 0
    retrying: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    sent: int = 0  # HTTP requests actually sent, retries included
    started: float = field(default_factory=time.monotonic)


def chat_body(model: str, messages: Messages, params: GenerationParams) -> dict[str, Any]:
    """The JSON body of a chat completion request (online, or one line of a batch)."""
    body: dict[str, Any] = dict(model=model, messages=messages, temperature=params.temperature,
                                top_p=params.top_p, max_tokens=params.max_new_tokens, n=params.n)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = params.stop
    return body


def completions(response: Any, cost: float) -> list[Completion]:
    """A ChatCompletion as one Completion per choice; tokens and cost are counted on the first."""
    usage = response.usage
    prompt = usage.prompt_tokens if usage else 0
    completion = usage.completion_tokens if usage else 0
    return [Completion(c.message.content or "", c.finish_reason or "stop", prompt,
                       completion if len(response.choices) == 1 else 0, cost if i == 0 else 0.0)
            for i, c in enumerate(response.choices)]


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Client:
    """Runs chat requests concurrently; `run` yields (index, completions) as each one finishes."""

    def __init__(self, config: ClientConfig, log: Callable[[str], None] | None = None,
                 local_model: str | None = None) -> None:
        """`local_model`: the model files (or Hub id) served behind a loopback `base_url`; the cache
        then knows the endpoint by the model's content, since the port changes from run to run."""
        import openai

        self.config = config
        self.openai = openai
        from openai.types.chat import ChatCompletion

        self.completion_type = ChatCompletion
        self.api = openai.AsyncOpenAI(base_url=config.base_url, api_key=_key(config), max_retries=0,
                                      timeout=config.timeout_s)
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self.endpoint = config.base_url
        if self.cache and local_model:
            self.endpoint = self.cache.content_id(local_model) if Path(local_model).exists() else local_model
        self.reached = False  # an HTTP answer came back at least once: a refused connection is then transient
        self.limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        self.stats = JobStats()
        self.log = log or (lambda msg: None)

    async def _call(self, model: str, messages: Messages, params: GenerationParams) -> list[Completion]:
        cfg, o = self.config, self.openai
        kwargs = chat_body(model, messages, params)
        estimate = sum(len(m["content"]) for m in messages) // 3 + params.max_new_tokens * params.n
        give_up = time.monotonic() + cfg.max_retry_s
        for attempt in range(cfg.max_retries + 1):
            await self.limiter.acquire(estimate)
            self.stats.sent += 1
            try:
                # the SDK's low-level post: same auth, timeouts and typed errors, without the per-call
                # type-driven transform of the payload (about 1 ms of CPU per request, measured)
                r = await self.api.post("/chat/completions", body=kwargs, cast_to=self.completion_type)
            except o.APIStatusError as e:
                self.reached = True
                code = e.status_code
                if code in FATAL:
                    raise JobStopped(f"{cfg.base_url}: {FATAL[code]} (HTTP {code}, model {model!r}); stopping") from None
                if code in (400, 413, 422):
                    raise RequestFailed(f"HTTP {code}: {_message(e)}") from None
                if code != 429 and code < 500:
                    raise RequestFailed(f"HTTP {code}: {_message(e)}") from None
                wait = _retry_after(e)
                reason = f"HTTP {code}"
            except (o.APITimeoutError, o.APIConnectionError) as e:
                wait, reason = None, type(e).__name__
                if not self.reached and _unreachable(e):
                    raise JobStopped(f"{cfg.base_url}: cannot connect ({e.__cause__}); is the server running and "
                                     "the URL right?") from None
            else:
                self.reached = True
                usage = r.usage
                return completions(r, api_cost(model, usage.prompt_tokens if usage else 0,
                                               usage.completion_tokens if usage else 0, prices=cfg.prices).usd)
            delay = wait if wait is not None else min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** attempt)
            delay *= 1 + random.random() * 0.25  # jitter: retries of many requests do not arrive together
            if attempt == cfg.max_retries or time.monotonic() + delay > give_up:
                raise RequestFailed(f"gave up after {attempt + 1} attempts ({reason})")
            self.stats.retrying += 1
            self.log(f"retry {attempt + 1} in {delay:.1f}s after {reason}")
            await asyncio.sleep(delay)
            self.stats.retrying -= 1
        raise AssertionError("unreachable")

    async def one(self, model: str, messages: Messages, params: GenerationParams) -> list[Completion]:
        key = ResponseCache.key(self.endpoint, model, messages, params) if self.cache else None
        if key and (hit := self.cache.get(key)) is not None:
            self.stats.cached += 1
            return [Completion(**{**c, "cost": 0.0, "cached": True}) for c in hit]
        result = await self._call(model, messages, params)
        if key:
            self.cache.put(key, [c.__dict__ for c in result])
        return result

    async def run(self, model: str, conversations: list[Messages], params: GenerationParams,
                  ) -> AsyncIterator[tuple[int, list[Completion] | Exception]]:
        """(index, completions or the RequestFailed) in completion order; JobStopped propagates."""
        self.stats.total += len(conversations)
        sem = asyncio.Semaphore(self.config.concurrency)

        async def task(i: int, conv: Messages):
            async with sem:
                if self.config.budget_usd is not None and self.stats.cost >= self.config.budget_usd:
                    return i, JobStopped(f"budget of ${self.config.budget_usd:g} spent")
                try:
                    return i, await self.one(model, conv, params)
                except RequestFailed as e:
                    return i, e

        pending = [asyncio.ensure_future(task(i, c)) for i, c in enumerate(conversations)]
        try:
            for fut in asyncio.as_completed(pending):
                i, result = await fut
                if isinstance(result, JobStopped):
                    raise result
                if isinstance(result, Exception):
                    self.stats.failed += 1
                else:
                    self.stats.done += 1
                    for c in result:
                        self.stats.prompt_tokens += c.prompt_tokens
                        self.stats.completion_tokens += c.completion_tokens
                        self.stats.cost += c.cost
                yield i, result
        finally:
            for fut in pending:
                fut.cancel()

    async def close(self) -> None:
        await self.api.close()


def _unreachable(err: Exception) -> bool:
    """Connection refused or a name that does not resolve: the HTTP library's ConnectError under the
    SDK's error (a timeout or a dropped connection is something else, and worth retrying). Matched by
    name: SDK releases differ in which httpx package they bundle."""
    return any(c.__name__ == "ConnectError" for c in type(err.__cause__).__mro__)


def _message(err: Exception) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error", {}).get("message") or body)[:300]
    return str(err)[:300]


def progress_bar(stats: JobStats, quiet: bool):
    """A rich progress bar showing done, failed, retrying, tokens/s, cost and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from fabrika.logs import progress

    class Live(TextColumn):
        def render(self, task):
            elapsed = max(time.monotonic() - stats.started, 1e-6)
            tps = (stats.prompt_tokens + stats.completion_tokens) / elapsed
            return (f"failed {stats.failed} · retrying {stats.retrying} · cached {stats.cached} · "
                    f"{tps:,.0f} tok/s · ${stats.cost:.4f}")

    return progress(TextColumn("requests"), BarColumn(), MofNCompleteColumn(), Live(""), TimeRemainingColumn(),
                    disable=quiet)


def run_requests(config: ClientConfig, model: str, conversations: list[Messages], params: GenerationParams,
                 quiet: bool = False, on_result: Callable[[int, list[Completion] | Exception], None] | None = None,
                 local_model: str | None = None) -> list[list[Completion]]:
    """Synchronous wrapper: every conversation answered (or RequestFailed raised for the first failure
    when no `on_result` callback takes failures)."""
    results: list[Any] = [None] * len(conversations)

    async def main():
        client = Client(config, local_model=local_model)
        try:
            with progress_bar(client.stats, quiet) as bar:
                task = bar.add_task("requests", total=len(conversations))
                async for i, res in client.run(model, conversations, params):
                    results[i] = res
                    if on_result:
                        on_result(i, res)
                    bar.advance(task)
        finally:
            await client.close()

    asyncio.run(main())
    if on_result is None:
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise failed[0]
    return results


def stream_chat(config: ClientConfig, model: str, messages: Messages, params: GenerationParams) -> Iterator[str]:
    """Streaming answer pieces for interactive chat (no cache: a person is watching)."""
    import openai

    api = openai.OpenAI(base_url=config.base_url, api_key=_key(config), timeout=config.timeout_s)
    try:
        stream = api.chat.completions.create(model=model, messages=messages, temperature=params.temperature,
                                             top_p=params.top_p, max_tokens=params.max_new_tokens, stream=True,
                                             **({"stop": params.stop} if params.stop else {}))
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    except openai.APIStatusError as e:
        raise FabrikaError(f"{config.base_url}: HTTP {e.status_code}: {_message(e)}") from None
    except openai.APIConnectionError:
        raise FabrikaError(f"{config.base_url}: cannot connect") from None
