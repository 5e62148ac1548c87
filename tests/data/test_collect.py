"""collect: filters on real refusal texts in three languages, and seeded per-language sampling of a
Tagengo-shaped sample, and the stage end to end against `fabrika serve` behind the fault proxy:
kill -9 and resume, teacher errors, bad sources."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import yaml
from fault_proxy import FaultProxy
from helpers import REPO, run_cli, scripted_server, write_jsonl

from fabrika.artifacts import RunContext, read_jsonl
from fabrika.data import collect
from fabrika.data import filters as F
from fabrika.errors import FabrikaError
from fabrika.infer.local import serve_in_background

SAMPLE = REPO / "data" / "samples" / "tagengo_sample.parquet"

REAL_REFUSALS = {
    "en": ["I'm sorry, but I can't help with that.", "Sorry, I can't assist with that request.",
           "As an AI language model, I cannot provide medical advice."],
    "ru": ["Извините, но я не могу помочь с этим запросом.", "К сожалению, я не могу выполнить эту просьбу.",
           "Я не могу предоставить такую информацию."],
    "zh": ["抱歉，我无法帮助您完成这个请求。", "对不起，我不能提供这方面的信息。", "作为一个人工智能，我不能回答这个问题。"],
}
GOOD = {"en": "Paris is the capital of France, and it is known for its museums.",
        "ru": "Столица Франции — Париж. Этот город известен своими музеями.",
        "zh": "法国的首都是巴黎，这座城市以博物馆闻名。"}


def test_filters_on_real_texts():
    codes = ("en", "ru", "zh")
    for lang, texts in REAL_REFUSALS.items():
        for t in texts:
            assert F.drop_reason(t, "stop", lang, list(F.FILTERS), codes) == "refusal", t
        assert F.drop_reason(GOOD[lang], "stop", lang, list(F.FILTERS), codes) is None
    assert F.drop_reason(GOOD["en"], "stop", "ru", list(F.FILTERS), codes) == "language_mismatch"
    assert F.drop_reason(GOOD["en"], "length", "en", list(F.FILTERS), codes) == "truncated"
    assert F.drop_reason("  ", "stop", "en", list(F.FILTERS), codes) == "empty"
    assert F.language_code("Russian") == "ru" and F.language_code("zh-CN") == "zh"


def test_sampling_quotas_dedup_and_malformed(capsys):
    cfg = collect.CONFIG(source=str(SAMPLE), quota="ru=5,en=7,zh=20", teacher="x")
    pools, stats = collect.sample_prompts(cfg, str(SAMPLE))
    assert set(pools) == {"ru", "en", "zh"} and all(p["language"] == lang for lang in pools for p in pools[lang])
    assert len(pools["zh"]) >= 20 and stats["pool_ru"] == len(pools["ru"]) >= 5
    assert stats["malformed_rows"] == 1 and "bad-1" in capsys.readouterr().out
    again, _ = collect.sample_prompts(cfg, str(SAMPLE))
    assert {k: [p["id"] for p in v] for k, v in again.items()} == {k: [p["id"] for p in v] for k, v in pools.items()}
    more = collect.CONFIG(source=str(SAMPLE), quota={"ru": 25}, teacher="x")
    pools, _ = collect.sample_prompts(more, str(SAMPLE))
    assert len(pools["ru"]) == 20 and "only 20 ru prompts" in capsys.readouterr().out


def _collect_config(tmp_path, url: str, **extra) -> Path:
    cfg = {"source": str(SAMPLE), "quota": {"ru": 3, "en": 3, "zh": 3}, "teacher": f"openai:tiny@{url}",
           "max_tokens": 6, "filters": ["empty", "duplicate"],
           "client": {"concurrency": 1, "max_retries": 2, "backoff_base_s": 0.05, "timeout_s": 30}, **extra}
    path = tmp_path / f"collect-{len(list(tmp_path.glob('collect-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def _rows(out: Path) -> list[dict]:
    import datasets

    return datasets.load_from_disk(str(out / "dataset")).to_list()


def test_kill_and_resume_asks_only_for_what_is_missing(server, tmp_path):
    with FaultProxy(server.url.removesuffix("/v1")) as proxy:
        cfg = _collect_config(tmp_path, proxy.url)
        out = tmp_path / "run"
        r = run_cli("collect", "--config", str(cfg), "--out", str(out), "--quiet",
                    env={"FABRIKA_FAULT": "kill_after_rows=4"})
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert len(list(read_jsonl(out / collect.JOURNAL))) == 4
        time.sleep(0.5)
        before = proxy.received  # 4, or 5 when the next request was in flight at the kill
        r = run_cli("collect", "--config", str(cfg), "--out", str(out))
        assert r.returncode == 0, r.stderr
        ids = [j["id"] for j in read_jsonl(out / collect.JOURNAL)]
        assert len(ids) == len(set(ids)) >= 9  # more when duplicates were dropped and refilled
        assert proxy.received - before == len(ids) - 4  # the 4 journaled prompts were not asked again
        assert "collect" in r.stdout and "sampled" in r.stdout  # the summary table

        whole = tmp_path / "whole"
        assert run_cli("collect", "--config", str(cfg), "--out", str(whole), "--quiet").returncode == 0
    assert _rows(out) == _rows(whole)  # resumed = uninterrupted
    rows = _rows(out)
    assert {r["language"] for r in rows} == {"ru", "en", "zh"}
    assert {"messages", "id", "teacher", "finish_reason", "prompt_tokens", "completion_tokens"} <= set(rows[0])
    assert rows[0]["messages"][-1]["role"] == "assistant"
    assert (out / "data.parquet").exists() and (out / "sharegpt.jsonl").exists()
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| ru | 3 | " in card and "drawing stopped: quotas met" in card


def test_teacher_errors_stop_with_the_journal_intact(chat_model, tmp_path):
    with serve_in_background(f"hf:{chat_model}", name="tiny", api_key="sekret") as locked:
        r = run_cli("collect", "--config", str(_collect_config(tmp_path, locked.url)), "--out", str(tmp_path / "a"),
                    "--quiet")
        assert r.returncode == 2 and "API key was rejected" in r.stderr and "Traceback" not in r.stderr
    with FaultProxy(locked.url.removesuffix("/v1"), ["500"] * 100) as down:
        r = run_cli("collect", "--config", str(_collect_config(tmp_path, down.url)), "--out", str(tmp_path / "b"),
                    "--quiet")
        assert r.returncode == 2 and "run the same command again" in r.stderr, r.stderr
        assert down.received == 9 * 3  # every prompt tried three times, then the stage stopped


def test_bad_sources_name_what_is_wrong(tmp_path):
    rows = write_jsonl(tmp_path / "p.jsonl", [{"question": "What is two plus two?", "lang": "en"}])
    for extra, expect in [({"format": "prompt"}, "no column 'prompt'"),
                          ({}, "cannot tell the format"),
                          ({"format": "prompt", "prompt_field": "question", "quota": {"xx": 1}}, "xx")]:
        cfg = collect.CONFIG(**{"source": str(rows), "teacher": "x", **extra})
        with pytest.raises(FabrikaError, match=expect) as e:
            collect.sample_prompts(cfg, str(rows))
        assert "question" in str(e.value) or "xx" in str(e.value)


def _answer_in(messages: list[dict]) -> str:
    text = messages[-1]["content"]
    if "[The Start of Assistant's Answer]" in text:  # FastChat's single-v1 prompt
        return text.split("[The Start of Assistant's Answer]\n", 1)[1].split("\n[The End of Assistant's Answer]")[0]
    return text.split("[Answer]\n", 1)[1]


def _grade(text: str) -> int:
    return len(text) % 9 + 1


def test_preference_pairs_graded_by_a_judge(server, tmp_path):
    with scripted_server(lambda m: f"Fair answer. Rating: [[{_grade(_answer_in(m))}]]") as judge:
        cfg = collect.CONFIG(source=str(SAMPLE), quota={"en": 3, "ru": 3}, teacher=f"openai:tiny@{server.url}",
                             max_tokens=12, filters=["empty"], preference={"k": 3, "judge": f"openai:j@{judge}"})
        art = collect.run(cfg, RunContext(stage="c", kind="collect", stage_dir=tmp_path / "p", quiet=True))
    rows = _rows(art.dir)
    assert rows and art.metrics["kept"] == len(rows)
    for r in rows:
        assert r["chosen_score"] == _grade(r["chosen"][0]["content"]) > r["rejected_score"]
        assert r["rejected_score"] == _grade(r["rejected"][0]["content"])
        assert "Rating: [[" in r["reasons"][0] and r["prompt"][-1]["role"] == "user"


def test_preference_pairs_teacher_over_student_and_llm_refusal_check(server, tmp_path):
    teacher = f"openai:tiny@{server.url}"
    with scripted_server(lambda m: "A student's attempt.") as student:
        cfg = collect.CONFIG(source=str(SAMPLE), quota={"zh": 4}, teacher=teacher, max_tokens=12, filters=["empty"],
                             preference={"k": 1, "judge": None, "student": f"openai:s@{student}"})
        rows = _rows(collect.run(cfg, RunContext(stage="c", kind="collect", stage_dir=tmp_path / "s", quiet=True)).dir)
    assert len(rows) == 4 and all(r["rejected"][0]["content"] == "A student's attempt." for r in rows)
    assert all(r["chosen_model"] == teacher and r["chosen_score"] is None for r in rows)

    with scripted_server(lambda m: "YES" if len(_answer_in(m)) % 2 == 0 else "NO") as classifier:
        cfg = collect.CONFIG(source=str(SAMPLE), quota={"en": 6}, teacher=teacher, max_tokens=12, filters=["empty"],
                             n=2, temperature=0.9, refusal_judge=f"openai:c@{classifier}")
        art = collect.run(cfg, RunContext(stage="c", kind="collect", stage_dir=tmp_path / "r", quiet=True))
    kept = [r["messages"][-1]["content"] for r in _rows(art.dir)]
    assert kept and all(len(t) % 2 == 1 for t in kept)
    dropped = art.metrics["by_language"]["en"].get("dropped:refusal_llm", 0)
    asked = sum(r["kind"] == "answer" for r in read_jsonl(art.dir / collect.JOURNAL))
    assert dropped > 0 and dropped + len(kept) == 2 * asked  # refills: 3 prompts for 6 rows, then up to 5
    assert len(kept) >= 6 or art.metrics["stop"].endswith("max_requests (5) spent")


def test_failed_judge_requests_are_never_recorded_as_verdicts(server, tmp_path):
    with scripted_server(lambda m: "NO") as classifier, \
            FaultProxy(classifier.removesuffix("/v1"), ["500"] * 3) as flaky:
        cfg = collect.CONFIG(source=str(SAMPLE), quota={"en": 3}, teacher=f"openai:tiny@{server.url}", max_tokens=8,
                             filters=["empty"], refusal_judge=f"openai:c@{flaky.url}", client={"max_retries": 0})
        ctx = RunContext(stage="c", kind="collect", stage_dir=tmp_path / "r", quiet=True)
        with pytest.raises(FabrikaError, match="3 of 3 requests .* failed.*run the same command again"):
            collect.run(cfg, ctx)
        journal = list(read_jsonl(tmp_path / "r" / collect.JOURNAL))
        assert [r["kind"] for r in journal] == ["answer"] * 3  # answers kept, no verdict from a failure
        art = collect.run(cfg, ctx)  # the judge is back: only its requests are sent again
        assert flaky.received == 6 and art.metrics["kept"] == 3
