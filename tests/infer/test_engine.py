"""The engine choice for local models, where vLLM is missing: a clear error for `engine: vllm`, and
`auto` falls back to transformers saying why (tests/infer/test_vllm.py runs vLLM itself); the --engine
option of chat, compare and serve (serve's transformers run is tests/infer/test_serve_process.py's server)."""

from __future__ import annotations

import pytest
from helpers import run_fabrika

from fabrika.errors import FabrikaError
from fabrika.infer import vllm_engine


def test_engine_vllm_without_vllm_says_how_to_install(tmp_path, chat_model, monkeypatch):
    monkeypatch.setenv("FABRIKA_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    r = run_fabrika("chat", f"vllm:{chat_model}", "--query", "hi")
    assert r.returncode == 2 and "make vllm" in r.stderr and "Traceback" not in r.stderr
    monkeypatch.setattr(vllm_engine, "vllm_python", lambda: None)
    with pytest.raises(FabrikaError, match="make vllm"):
        vllm_engine.choose_engine("hf", str(chat_model), "vllm")
    assert vllm_engine.choose_engine("hf", str(chat_model), "auto") == "transformers"


def test_engine_option_of_chat_compare_and_serve(tmp_path, chat_model, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n")
    chat = ["chat", f"hf:{chat_model}", "--query", "hi", "--max-tokens", "4"]
    compare = ["compare", f"hf:{chat_model}", f"hf:{chat_model}", "--prompts", str(prompts), "--out",
               str(tmp_path / "cmp.md"), "--max-tokens", "4"]
    serve = ["serve", f"hf:{chat_model}", "--port", "0"]
    chosen = run_fabrika(*chat)
    assert chosen.returncode == 0 and "engine for" in chosen.stderr  # auto says what it picked and why
    for command in (chat, compare):
        r = run_fabrika(*command, "--engine", "transformers")
        assert r.returncode == 0, r.stderr
        assert "engine for" not in r.stderr  # asked for, not chosen
    assert (tmp_path / "cmp.md").is_file()
    for command in (chat, compare, serve):  # refused before any model loads
        r = run_fabrika(*command, "--engine", "tensorrt")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "--engine 'tensorrt': expected one of auto, vllm, transformers" in r.stderr
    monkeypatch.setenv("FABRIKA_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    for command in (chat, compare, serve):
        r = run_fabrika(*command, "--engine", "vllm")
        assert r.returncode == 2 and "make vllm" in r.stderr and "Traceback" not in r.stderr
