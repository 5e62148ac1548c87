"""vLLM as the engine: its own server started by fabrika on a tiny Llama (float32, no graph capture),
greedy answers equal to the transformers engine's, MT-Bench answers and collect through it, and a
collect killed mid-way that leaves no server behind and resumes. Runs where .venv-vllm exists
(`make vllm`); one server for the module, plus the two that the killed-and-resumed collect starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import CORPUS, make_chat_model, run_fabrika, write_jsonl

from fabrika.data.collect import JOURNAL
from fabrika.infer import vllm_engine
from fabrika.infer.backends import OpenAIGenerator, load_generator
from fabrika.infer.generation import GenerationParams

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(vllm_engine.vllm_python() is None, reason="vLLM is not installed (make vllm)")]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "What is the moon made of?"}],
    [{"role": "user", "content": "Переведи «спасибо» на китайский."}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
     {"role": "user", "content": "A larger one?"}],
]


@pytest.fixture(scope="module", autouse=True)
def small_vllm(tmp_path_factory):
    """What a CPU test machine affords: a 1 GiB KV cache, one process, caches in a temporary folder."""
    cache = tmp_path_factory.mktemp("vllm-cache")
    saved = dict(os.environ)
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CACHE_ROOT=str(cache),
                      TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), FABRIKA_VLLM_ARGS="--max-model-len 1024")
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny chat Llama of conftest with 64-dimensional heads: vLLM's CPU attention kernels have no
    16-dimensional ones ("Unsupported CPU attention configuration: head_dim=16")."""
    return make_chat_model(tmp_path_factory.mktemp("vllm_chat_model"), tiny_tokenizer, hidden_size=128,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=256)


@pytest.fixture(scope="module")
def vllm(chat_model, small_vllm):
    with vllm_engine.vllm_server(str(chat_model), name="tiny") as server:
        yield server


def test_greedy_answers_match_transformers(vllm, chat_model):
    params = GenerationParams(max_new_tokens=24)
    ours = load_generator(f"hf:{chat_model}", engine="transformers").generate(CONVERSATIONS, params)
    theirs = OpenAIGenerator("tiny", vllm.url).generate(CONVERSATIONS, params)
    assert [c[0].text for c in theirs] == [c[0].text for c in ours]
    assert [c[0].finish_reason for c in theirs] == [c[0].finish_reason for c in ours]
    # the model's own stop tokens: an answer that ended did so at <|im_end|>, which is never in the text
    assert all("<|im_end|>" not in c[0].text for c in theirs)


def test_mtbench_answers_through_vllm(vllm, chat_model, tmp_path):
    from fabrika.evaluate import judge as J
    from fabrika.evaluate import mtbench as M

    questions = M.load_questions("mt_bench")[0][:6]
    answers = M.generate_answers(OpenAIGenerator("tiny", vllm.url), questions, tmp_path / "vllm.jsonl", "tiny", 16)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(len(a["choices"][0]["turns"]) == len(q["turns"]) for a, q in zip(answers, questions))
    greedy = [q for q in questions if J.TEMPERATURE.get(q.get("category", ""), 0.7) == 0]
    if greedy:  # greedy categories (math, reasoning, coding) answer as the transformers engine does
        hf = M.generate_answers(load_generator(f"hf:{chat_model}", engine="transformers"), greedy,
                                tmp_path / "hf.jsonl", "tiny", 16)
        by_id = {a["question_id"]: a["choices"][0]["turns"] for a in answers}
        assert all(by_id[a["question_id"]] == a["choices"][0]["turns"] for a in hf)


def _vllm_servers(name: str) -> list[int]:
    """Pids of vLLM servers that serve `name` (read from /proc: the orphans a killed fabrika could leave)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if vllm_engine.SERVER_MODULE.encode() in args and name.encode() in args:
            pids.append(int(proc.name))
    return pids


def test_collect_on_vllm_killed_midway_resumes_and_leaves_no_server(tmp_path, chat_model):
    import time

    lines = [line for line in (CORPUS / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()
             if len(line) > 30][:40]  # distinct prompts: near-duplicates would be filtered out
    prompts = [{"id": str(i), "messages": [{"role": "user", "content": f"What does “{line}” mean?"}]}
               for i, line in enumerate(lines)]
    source = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    cfg = tmp_path / "collect.yaml"
    cfg.write_text(yaml.safe_dump({"source": str(source), "teacher": f"vllm:{chat_model}", "max_tokens": 48,
                                   "filters": ["empty"], "client": {"concurrency": 2}}))
    out = tmp_path / "out"
    journal = out / JOURNAL

    def some_answers() -> bool:
        return journal.exists() and len(journal.read_text(encoding="utf-8").splitlines()) >= 5

    others = set(_vllm_servers(str(chat_model)))  # the module's own server serves the same model
    r = run_fabrika("collect", "--config", str(cfg), "--out", str(out), "--quiet", kill_when=some_answers)
    assert r.returncode == -9, r.stderr[-3000:]
    kept = [json.loads(line) for line in journal.read_text(encoding="utf-8").split("\n")[:-1]]  # whole lines
    assert 5 <= len(kept) < len(prompts)
    deadline = time.monotonic() + 120  # ~3 s when idle; much longer on a loaded 2-core machine
    while set(_vllm_servers(str(chat_model))) - others and time.monotonic() < deadline:  # SIGTERM from the kernel
        time.sleep(0.5)
    assert set(_vllm_servers(str(chat_model))) - others == set()

    r = run_fabrika("collect", "--config", str(cfg), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vllm| " in r.stderr  # vLLM's own log, copied into fabrika's output (and so into run.log)
    final = [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines()]
    assert final[:len(kept)] == kept  # what was paid for before the kill is kept, and not asked again
    assert sorted(r["id"] for r in final) == sorted(p["id"] for p in prompts)
    assert (out / "manifest.json").is_file()
    assert set(_vllm_servers(str(chat_model))) - others == set()  # stopped on a clean exit too
