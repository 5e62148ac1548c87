"""The engine choice for local models, where vLLM is missing: a clear error for `engine: vllm`, and
`auto` falls back to transformers saying why (tests/infer/test_vllm.py runs vLLM itself)."""

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
