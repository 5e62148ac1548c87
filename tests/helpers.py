"""Helpers shared by tests (imported as `helpers`; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
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


FABRIKA = str(Path(sys.executable).parent / "fabrika")  # the installed console script, as users run it


def run_fabrika(*args: str, env: dict | None = None, timeout: int = 300,
                kill_when: Callable[[], bool] | None = None) -> subprocess.CompletedProcess:
    """Run the installed `fabrika ARGS` as a user would. With `kill_when`, SIGKILL it the moment that
    turns true (checked every few milliseconds): a crash, an OOM kill or a lost node, at a point the
    test chooses, with whatever requests it had in flight."""
    proc = subprocess.Popen([FABRIKA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    if kill_when is not None:
        def watch() -> None:
            while proc.poll() is None:
                if kill_when():
                    proc.kill()
                    return
                time.sleep(0.002)

        threading.Thread(target=watch, daemon=True).start()
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def paid(log: list[dict]) -> Counter:
    """How many times each conversation was answered (HTTP 200) in a `scripted_server` log."""
    return Counter(json.dumps(e["body"]["messages"], ensure_ascii=False) for e in log if e["status"] == 200)


@contextmanager
def serving(app) -> Iterator[str]:
    """Run an ASGI app on a free loopback port in this process for the duration; yields its /v1 URL."""
    import uvicorn

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


@contextmanager
def scripted_server(reply: Callable[[list[dict]], str], log: list[dict] | None = None, down_first: int = 0,
                    down_while: Path | None = None) -> Iterator[str]:
    """A real OpenAI-compatible HTTP endpoint on loopback whose answers follow a rule: the stand-in for a
    remote teacher or judge (GPT-4o) whose answers a test must know in advance. Yields its /v1 URL.

    `log` receives every request as it arrives, {"body": the JSON body, "status": the HTTP status
    sent}: the test's own witness of what was asked and paid for (status 200). The server answers
    503 to its first `down_first` requests, and while the file `down_while` exists."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    seen = [0]

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        seen[0] += 1
        down = seen[0] <= down_first or (down_while is not None and down_while.exists())
        entry = {"body": body, "status": 503 if down else 200}
        if log is not None:
            log.append(entry)
        if down:
            return JSONResponse({"error": {"message": "the server is down", "type": "unavailable"}}, status_code=503)
        text = reply(body["messages"])
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    with serving(app) as url:
        yield url


def make_chat_model(out: Path, tokenizer: Path, **shape) -> Path:
    """A tiny random Llama with the ChatML tokenizer; generation stops at <|im_end|>."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, **shape}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, **shape))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(eos_token_id=[im_end, tok.eos_token_id], pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out
