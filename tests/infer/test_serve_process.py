"""`fabrika serve` as users run it: the installed executable in its own process on loopback, driven by the
official openai client, then abused (huge bodies and prompts, bad seeds, unknown models, template errors,
clients that hang up, a crowd with bad apples) with the server's own log and memory as the witnesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

HELLO = [{"role": "user", "content": "Say something."}]
# ChatML that refuses two turns of one role in a row, as Llama-2 and Mistral templates do
STRICT = ("{%- for m in messages %}{%- if not loop.first and m['role'] == messages[loop.index0 - 1]['role'] %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
          "{%- endif %}{%- endfor %}")
CONTEXT = 256  # the served copy's context: "the rest of the context" stays cheap to generate
LONG = 200  # max_tokens of answers that must be cut short; the tiny model does not stop before it


@pytest.fixture(scope="module")
def strict_model(chat_model, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("strict") / "model"
    shutil.copytree(chat_model, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = STRICT + tok.chat_template
    tok.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return out


def fabrika_serve(*args: str, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("fabrika")
    with open(log, "wb") as sink:
        return subprocess.Popen([str(exe), "serve", *args], stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def served(strict_model, tmp_path_factory):
    """(the process, its /v1 URL, its log file)."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc = fabrika_serve(f"hf:{strict_model}", "--port", "0", "--name", "tiny", "--max-body-mb", "2", "--engine",
                         "transformers", log=log)
    url = None
    for _ in range(1200):  # at most two minutes to load the model
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("serving ")]
        if lines:
            url = lines[0].rsplit(" at ", 1)[1]
            break
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    assert url and url.startswith("http://127.0.0.1:"), log.read_text()
    try:
        yield proc, url, log
    finally:  # Ctrl-C lets the requests in flight finish, then exits 0
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0 and "server stopped" in log.read_text() and "Traceback" not in log.read_text()


def health(url: str) -> dict:
    return httpx.get(url.replace("/v1", "/health")).json()


def test_official_client_plain_streamed_and_usage(served):
    _, url, _ = served
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    text = plain.choices[0].message.content
    assert plain.usage.prompt_tokens > 0 and 0 < plain.usage.completion_tokens <= 8

    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason

    answers: dict[int, str] = {}
    finished = {}
    for c in client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=1.0, n=3,
                                            seed=7, stream=True):
        assert c.usage is None  # no usage chunk unless asked for
        for choice in c.choices:
            answers[choice.index] = answers.get(choice.index, "") + (choice.delta.content or "")
            finished[choice.index] = choice.finish_reason or finished.get(choice.index)
    assert sorted(answers) == [0, 1, 2] and all(finished[i] in ("stop", "length") for i in range(3))

    parts = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Say something."}]}])
    assert parts.choices[0].message.content == text

    rest = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0)  # no max_tokens:
    used, finish = rest.usage.total_tokens, rest.choices[0].finish_reason  # the rest of the context, not 512
    assert (used == CONTEXT and finish == "length") or (used < CONTEXT and finish == "stop")


def test_sigterm_stops_cleanly_and_a_taken_port_is_a_clear_error(strict_model, tmp_path, served):
    _, url, _ = served
    port = url.rsplit(":", 1)[1].split("/")[0]
    busy = subprocess.run([str(Path(sys.executable).with_name("fabrika")), "serve", f"hf:{strict_model}",
                           "--port", port], capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in busy.stderr
    assert "Traceback" not in busy.stderr + busy.stdout

    log = tmp_path / "server.log"
    proc = fabrika_serve(f"hf:{strict_model}", "--port", "0", log=log)
    for _ in range(1200):
        if "serving " in log.read_text() or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert "server stopped" in log.read_text() and "Traceback" not in log.read_text()


def test_abuse_gets_openai_errors_and_the_server_stays_up(served):
    proc, url, log = served
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    chat = url + "/chat/completions"

    too_big = httpx.post(chat, content=b"x" * (3 << 20), headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(chat, content=iter([b"[" + b" " * (1 << 20)] * 3), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "error" in chunked.json()

    # 1.5 MB of text fits the body cap but no 256-token context: refused on its size, before tokenizing
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 300_000}])
    assert e.value.code == "context_length_exceeded" and "bytes of text" in e.value.message

    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=HELLO, seed=2**70, stream=stream, max_tokens=4)
        assert e.value.body["param"] == "seed"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="roles must alternate"):
        client.chat.completions.create(model="tiny", messages=HELLO + HELLO, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    r = httpx.get(url.replace("/v1", "/nowhere"))
    assert r.status_code == 404 and "error" in r.json()

    # a client that hangs up mid-stream stops its generation: the log says where, and the model is free
    with httpx.stream("POST", chat, json={"model": "tiny", "messages": HELLO, "max_tokens": LONG, "temperature": 0,
                                          "stream": True}) as s:
        lines = s.iter_lines()
        assert [next(lines) for _ in range(6)][0].startswith("data: ")
    for _ in range(600):
        if "client went away" in log.read_text() and health(url)["running"] == 0:
            break
        time.sleep(0.05)
    stopped = [ln for ln in log.read_text().splitlines() if "client went away" in ln]
    assert stopped and int(stopped[-1].split("stopped after ")[1].split()[0]) < LONG

    # fifty clients at once, some of them bad: each gets its own right answer
    rss_before = psutil.Process(proc.pid).memory_info().rss
    bad = {3: ({"model": "tiny", "messages": HELLO, "seed": 2**70}, 400),
           11: ({"model": "nope", "messages": HELLO}, 404),
           19: ({"model": "tiny", "messages": HELLO + HELLO}, 400),
           27: ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 500_000}]}, 413),
           35: ({"model": "tiny", "messages": []}, 400),
           43: ({"model": "tiny", "messages": HELLO, "max_tokens": 5000}, 400),
           47: ({"model": "tiny", "messages": HELLO, "max_tokens": 3, "temperature": 1e-40}, 200)}
    results: dict[int, httpx.Response] = {}

    def call(i: int) -> None:
        body, _ = bad.get(i, ({"model": "tiny", "messages": [{"role": "user", "content": f"number {i}"}],
                               "max_tokens": 4, "stream": i % 2 == 0}, 200))
        results[i] = httpx.post(chat, json=body, timeout=120)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert sorted(results) == list(range(50))
    for i, r in results.items():
        assert r.status_code == bad.get(i, (None, 200))[1], (i, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        elif i % 2 == 0:
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert proc.poll() is None and health(url)["running"] == 0
    assert psutil.Process(proc.pid).memory_info().rss < rss_before + (200 << 20)
