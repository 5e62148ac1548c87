"""Helpers shared by tests (imported as `helpers`; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"


FABRIKA = str(Path(sys.executable).parent / "fabrika")  # the installed console script


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed `fabrika ARGS` in a fresh process, as a user would (`launcher`: a command
    such as torchrun that starts fabrika itself)."""
    cmd = (launcher or [FABRIKA]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env={**os.environ, **(env or {})})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@contextmanager
def scripted_server(reply: Callable[[list[dict]], str]) -> Iterator[str]:
    """A real OpenAI-compatible HTTP endpoint on loopback whose answers follow a rule: the stand-in for a
    remote judge (GPT-4o) whose verdicts a test must know in advance. Yields its /v1 URL."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        text = reply(body["messages"])
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
