"""The official openai client against `fabrika serve` on loopback, and fabrika's client through a
fault-injecting proxy: retries, give-up, no double sends, the cache, and concurrency."""

from __future__ import annotations

import json
import logging
import os

import httpx
import openai
import pytest
from fault_proxy import FaultProxy
from helpers import run_cli

from fabrika.errors import FabrikaError
from fabrika.infer.backends import load_generator
from fabrika.infer.generation import GenerationParams
from fabrika.infer.client import ClientConfig, JobStopped, RequestFailed, run_requests
from fabrika.infer.local import serve_in_background

HELLO = [{"role": "user", "content": "Say something."}]


def test_openai_client_plain_and_streaming(server):
    client = openai.OpenAI(base_url=server.url, api_key="x")
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 9
    assert r.usage.prompt_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == r.choices[0].message.content
    n = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=1.0, n=3, seed=1)
    assert len(n.choices) == 3
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url.replace("/v1", "/health")).json()["status"] == "ok"


def test_greedy_hf_equals_served(server, chat_model):
    params = GenerationParams(max_new_tokens=12)
    local = load_generator(f"hf:{chat_model}").generate([HELLO], params)[0][0].text
    remote = load_generator(f"openai:tiny@{server.url}").generate([HELLO], params)[0][0].text
    assert local == remote


def test_bad_requests_get_openai_style_400(server):
    url = server.url + "/chat/completions"
    r = httpx.post(url, json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "messages" in r.json()["error"]["param"]
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "word " * 2500}], "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url, content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert httpx.get(server.url.replace("/v1", "/health")).status_code == 200  # still serving


def test_api_key_is_demanded(chat_model):
    with serve_in_background(f"hf:{chat_model}", api_key="sekret") as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url, api_key="wrong").models.list()
        assert openai.OpenAI(base_url=s.url, api_key="sekret").models.list().data


def test_retries_and_no_double_sends(server, tmp_path):
    script = ["429", "500", "drop", "ok", "slow"]
    with FaultProxy(server.url.removesuffix("/v1"), script, retry_after_s=0.05, slow_s=3) as proxy:
        cfg = ClientConfig(base_url=proxy.url, concurrency=1, backoff_base_s=0.05, timeout_s=1.5,
                           cache_dir=str(tmp_path / "cache"))
        convs = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
        out = run_requests(cfg, "tiny", convs, GenerationParams(max_new_tokens=4), quiet=True)
        assert all(len(o) == 1 for o in out)
        # 4 answers; 3 failures retried; the slow one timed out and was retried once
        assert proxy.received == 4 + 3 + 1
        forwarded = proxy.forwarded
        again = run_requests(cfg, "tiny", convs, GenerationParams(max_new_tokens=4), quiet=True)
        assert proxy.received == 8 and proxy.forwarded == forwarded  # the cache answered everything
        assert [a[0].text for a in again] == [o[0].text for o in out] and all(a[0].cached for a in again)


def test_give_up_and_fatal_errors(server):
    with FaultProxy(server.url.removesuffix("/v1"), ["500"] * 10, retry_after_s=0.01) as proxy:
        cfg = ClientConfig(base_url=proxy.url, max_retries=2, backoff_base_s=0.01)
        with pytest.raises(RequestFailed, match="gave up after 3 attempts"):
            run_requests(cfg, "tiny", [HELLO], GenerationParams(max_new_tokens=2), quiet=True)
        assert proxy.received == 3


def test_401_stops_the_job_without_leaking_the_key(chat_model, caplog):
    os.environ["FABRIKA_TEST_KEY"] = "sk-secret-value-123"
    with serve_in_background(f"hf:{chat_model}", api_key="other") as s:
        cfg = ClientConfig(base_url=s.url, api_key_env="FABRIKA_TEST_KEY")
        with caplog.at_level(logging.DEBUG), pytest.raises(JobStopped) as e:
            run_requests(cfg, "tiny", [HELLO] * 3, GenerationParams(max_new_tokens=2), quiet=True)
    assert "401" in str(e.value) and "sk-secret" not in str(e.value)
    assert "sk-secret" not in caplog.text


def test_two_hundred_requests_at_concurrency_16(server):
    cfg = ClientConfig(base_url=server.url, concurrency=16)
    convs = [[{"role": "user", "content": f"number {i}"}] for i in range(200)]
    out = run_requests(cfg, "tiny", convs, GenerationParams(max_new_tokens=3), quiet=True)
    assert len(out) == 200 and all(o[0].finish_reason in ("stop", "length") for o in out)
    assert httpx.get(server.url.replace("/v1", "/health")).status_code == 200


def test_lora_adapter_loads_on_its_base(tmp_path, chat_model):
    """Merged into its base at load (no LoRA products on every decode step), computing what the adapter
    on its base computes."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(chat_model),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))  # not a no-op
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(chat_model).save_pretrained(tmp_path / "adapter")
    gen = load_generator(str(tmp_path / "adapter"))
    assert gen.generate([HELLO], GenerationParams(max_new_tokens=3))[0][0].finish_reason in ("stop", "length")
    assert not any("lora" in name for name, _ in gen.model.named_modules())
    ids = torch.tensor([gen.prompt_ids(HELLO)])
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_model), tmp_path / "adapter")
    with torch.no_grad():
        expected = unmerged.eval()(ids).logits
        torch.testing.assert_close(gen.model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(chat_model)(ids).logits, expected, atol=1e-3)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FabrikaError, match="base model"):
        load_generator(str(tmp_path / "adapter"))


def test_chat_query_interactive_and_compare(tmp_path, chat_model):
    r = run_cli("chat", f"hf:{chat_model}", "--query", "hello", "--max-tokens", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    from fabrika.infer.chat import interactive
    import io

    out = io.StringIO()
    save = tmp_path / "conv.json"
    interactive(f"hf:{chat_model}", GenerationParams(max_new_tokens=4), stdin=io.StringIO(
        f"hi\n/system be nice\nagain\n/save {save}\n/reset\n/exit\n"), out=out)
    saved = json.loads(save.read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]
    assert "history cleared" in out.getvalue()
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    r = run_cli("compare", f"hf:{chat_model}", f"hf:{chat_model}", "--prompts", str(tmp_path / "p.txt"),
                "--out", str(tmp_path / "c.md"), "--max-tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "c.md").read_text().count("\n") == 4


def test_gguf_backend_direct_and_served(tmp_path, chat_model):
    from fabrika.export.gguf import convert

    path = tmp_path / "m.gguf"
    convert(chat_model, path, "f32")
    gen = load_generator(str(path))
    local = gen.generate([HELLO], GenerationParams(max_new_tokens=6))[0][0]
    hf = load_generator(f"hf:{chat_model}").generate([HELLO], GenerationParams(max_new_tokens=6))[0][0]
    # llama.cpp and transformers agree greedily on the same weights; a random model may emit a token
    # that is half a UTF-8 character, which transformers shows as U+FFFD and llama.cpp drops
    assert local.text == hf.text.replace("\ufffd", "")
    with serve_in_background(f"gguf:{path}") as s:
        r = openai.OpenAI(base_url=s.url, api_key="x").chat.completions.create(
            model="m", messages=HELLO, max_tokens=6, temperature=0)
        assert r.choices[0].message.content == local.text
