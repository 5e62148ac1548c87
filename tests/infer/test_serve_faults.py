"""Faults inside a served model and limits of the server: a generation that dies mid-stream (an injected
out-of-memory error), a full queue (429), the API key on every route but /health."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch

from fabrika.infer.local import serve_in_background

HELLO = [{"role": "user", "content": "Say something."}]


def streams_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("fabrika-stream", "fabrika-generate"))]


def wait_until(condition, tries: int = 400) -> bool:
    for _ in range(tries):
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_generation_that_dies_ends_its_stream_and_its_threads(server, monkeypatch):
    from transformers import LlamaForCausalLM

    real, steps = LlamaForCausalLM.forward, []

    def runs_out_of_memory(self, *args, **kwargs):
        steps.append(1)
        if len(steps) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", runs_out_of_memory)
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 50, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "out of memory" in error["message"]
    assert wait_until(lambda: not streams_alive()), streams_alive()

    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="out of memory"):
        for _ in client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, stream=True):
            pass
    with pytest.raises(openai.InternalServerError, match="out of memory"):
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5)

    monkeypatch.undo()  # the model recovers, and so does every request after it
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3).choices[0].message.content
    assert wait_until(lambda: not streams_alive()), streams_alive()


def test_full_queue_gets_429_and_the_key_guards_every_route(chat_model):
    with serve_in_background(f"hf:{chat_model}", name="tiny", api_key="sekret", max_queue=1) as s:
        root = s.url.removesuffix("/v1")
        for path in ("/docs", "/openapi.json", "/v1/models"):
            r = httpx.get(root + path, headers={"Authorization": "Bearer sekreT"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(root + path, headers={"Authorization": "bearer sekret"}).status_code == 200
        assert httpx.get(root + "/health").json()["status"] == "ok"  # probes need no key

        client = openai.OpenAI(base_url=s.url, api_key="sekret", max_retries=0)
        long = {"model": "tiny", "messages": HELLO, "max_tokens": 1500, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/chat/completions", json=long,
                          headers={"Authorization": "Bearer sekret"}) as busy:
            lines = busy.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith("data: ")
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
        assert wait_until(lambda: httpx.get(root + "/health").json()["running"] == 0)
        assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices
