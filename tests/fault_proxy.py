"""A small fault-injecting HTTP proxy for testing and benchmarking API clients against a real server.

It sits in front of an OpenAI-compatible server on loopback and, per request, follows a script:
`ok`, `429` (with Retry-After), `500`, `slow` (answers after a delay longer than a client timeout),
`drop` (closes the connection without answering), or adds a fixed latency to every request. It counts
what it received and what it forwarded, so tests can prove that nothing was sent twice.
It lives with the tests because only they and `bench/` use it: fabrika itself never injects faults
into HTTP traffic.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import httpx


@dataclass
class FaultProxy:
    upstream: str                      # e.g. http://127.0.0.1:8000 (no /v1)
    script: Iterable[str] = ()         # actions for the first requests, then `ok`
    latency_s: float = 0.0
    retry_after_s: float = 0.2
    slow_s: float = 5.0
    received: int = 0
    forwarded: int = 0
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.actions = deque(self.script)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        async def shutdown() -> None:  # let open connections end quietly before the loop stops
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.http.aclose()
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.http = httpx.AsyncClient(base_url=self.upstream, timeout=600, limits=httpx.Limits(max_connections=1000))
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        self.ready.set()
        self.loop.run_forever()

    async def _read_request(self, reader: asyncio.StreamReader):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        return method, path, headers, body

    @staticmethod
    def _response(status: int, body: bytes, extra: dict[str, str] | None = None) -> bytes:
        reason = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error"}.get(status, "Status")
        headers = {"content-type": "application/json", "content-length": str(len(body)), **(extra or {})}
        return (f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + "\r\n").encode() + body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    method, path, headers, body = await self._read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                self.received += 1
                action = self.actions.popleft() if self.actions else "ok"
                self.log.append(action)
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if action == "drop":
                    writer.transport.abort()
                    return
                if action == "429":
                    writer.write(self._response(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                                                {"retry-after": str(self.retry_after_s)}))
                elif action == "500":
                    writer.write(self._response(500, b'{"error": {"message": "boom", "type": "server_error"}}'))
                else:
                    if action == "slow":
                        await asyncio.sleep(self.slow_s)
                    fwd = {k: v for k, v in headers.items() if k in ("authorization", "content-type")}
                    r = await self.http.request(method, path, content=body, headers=fwd)
                    self.forwarded += 1
                    writer.write(self._response(r.status_code, r.content))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()
