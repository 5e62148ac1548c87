"""Quotas count kept rows: the installed `fabrika collect` against a teacher that refuses a third of the
prompts (GPT-4o's refusals, typographic apostrophes and all) draws more prompts from the same
language until the quota is met or the pool runs out, never asks a prompt twice, makes the same draws
after kill -9 and after the teacher fails in the middle of the refills, and a rerun of a finished run
sends nothing. The teacher's own log of answered prompts is the witness."""

from __future__ import annotations

import json
import signal
from collections import Counter

import pytest
import yaml
from helpers import run_cli, scripted_server, write_jsonl

from fabrika.artifacts import RunContext, read_jsonl
from fabrika.data import collect

TOPICS = {
    "en": ["Paris", "volcanoes", "honeybees", "the Roman Empire", "black holes", "chess openings", "sourdough bread",
           "the Amazon river", "jazz music", "electric cars", "glaciers", "octopuses", "the printing press",
           "solar panels", "the Silk Road"],
    "ru": ["Казань", "вулканы", "пчёлы", "Римская империя", "чёрные дыры", "шахматные дебюты", "ржаной хлеб",
           "река Волга", "джаз", "электромобили", "ледники", "осьминоги", "книгопечатание", "солнечные батареи",
           "Шёлковый путь"],
    "zh": ["长城", "火山", "蜜蜂", "唐朝", "黑洞", "围棋"],  # a small pool: it runs out before its quota
}
ANSWER = {"en": "Here is a short overview of {t}: it is a fascinating subject with a long history worth reading about.",
          "ru": "Вот краткий рассказ про {t}: это увлекательная тема с долгой историей, о которой стоит почитать.",
          "zh": "关于{t}的简要介绍：这是一个很有意思的话题，有着悠久的历史，值得深入阅读。"}
REFUSAL = {"en": "I’m sorry, but I can’t assist with that.", "ru": "Извините, но я не могу помочь с этим.",
           "zh": "抱歉，我无法协助满足该请求。"}
PROMPT = {"en": "Tell me about {t}, please.", "ru": "Расскажи, пожалуйста, про {t}.", "zh": "请介绍一下{t}。"}


def _teacher():
    """Each prompt's reply (every third topic refused), a log of the prompts answered, and a switch that
    makes the teacher fail (HTTP 500) once it has answered a given number of prompts."""
    replies, log, down_after = {}, [], [None]
    for lang, topics in TOPICS.items():
        for i, t in enumerate(topics):
            replies[PROMPT[lang].format(t=t)] = REFUSAL[lang] if i % 3 == 0 else ANSWER[lang].format(t=t)

    def reply(messages):
        if down_after[0] is not None and len(log) >= down_after[0]:
            raise RuntimeError("teacher down")
        log.append(messages[-1]["content"])
        return replies[messages[-1]["content"]]
    return reply, log, down_after


def _config(tmp_path, url: str) -> str:
    rows = [{"id": f"{lang}-{i:02d}", "prompt": PROMPT[lang].format(t=t), "language": lang}
            for lang, topics in TOPICS.items() for i, t in enumerate(topics)]
    source = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = {"source": str(source), "format": "prompt", "quota": {"en": 6, "ru": 6, "zh": 6},
           "teacher": f"openai:gpt-4o@{url}", "client": {"concurrency": 1, "max_retries": 0}}
    path = tmp_path / "collect.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path)


def _kept(out) -> Counter:
    return Counter(json.loads(line)["language"] for line in (out / "sharegpt.jsonl").read_text().splitlines())


def test_quota_of_kept_rows_refills_from_the_pool_and_resumes(tmp_path):
    reply, log, down_after = _teacher()
    with scripted_server(reply) as url:
        cfg = _config(tmp_path, url)
        whole = tmp_path / "whole"
        r = run_cli("collect", "--config", cfg, "--out", str(whole))
        assert r.returncode == 0, r.stderr
        assert "quota not met (zh 4 of 6): no prompts left in the zh pool" in r.stdout
        assert _kept(whole) == {"en": 6, "ru": 6, "zh": 4}
        asked = len(log)
        assert asked == len(set(log)) == len(list(read_jsonl(whole / collect.JOURNAL)))  # no prompt asked twice
        assert asked <= 27  # max_requests: 1.5x the 18 prompts the quotas need
        refused = {PROMPT[lang].format(t=t) for lang, ts in TOPICS.items() for t in ts[::3]}
        for lang in ("en", "ru"):  # one more prompt drawn for each refusal, no more
            mine = [p for p in log if p in {PROMPT[lang].format(t=t) for t in TOPICS[lang]}]
            assert len(mine) == 6 + len(set(mine) & refused)
        card = (whole / "README.md").read_text(encoding="utf-8")
        assert "### ru: refusal (3 dropped)" in card and "Извините, но я не могу помочь с этим." in card
        assert "I’m sorry, but I can’t assist with that." in card

        r = run_cli("collect", "--config", cfg, "--out", str(whole), "--quiet")
        assert r.returncode == 0 and len(log) == asked  # finished: a rerun asks nothing

        log.clear()
        resumed = tmp_path / "resumed"
        fresh = {"FABRIKA_CACHE_DIR": str(tmp_path / "cache-resumed")}  # nothing answered from the first run's cache
        r = run_cli("collect", "--config", cfg, "--out", str(resumed), "--quiet",
                    env={"FABRIKA_FAULT": "kill_after_rows=10", **fresh})
        assert r.returncode == -signal.SIGKILL
        down_after[0] = 20  # the teacher goes down in the middle of the refills
        r = run_cli("collect", "--config", cfg, "--out", str(resumed), "--quiet", env=fresh)
        assert r.returncode == 2 and "run the same command again" in r.stderr, r.stderr
        down_after[0] = None
        r = run_cli("collect", "--config", cfg, "--out", str(resumed), "--quiet", env=fresh)
        assert r.returncode == 0, r.stderr
        assert len(log) - len(set(log)) <= 1  # at most the request in flight at the kill was answered twice
        assert len(set(log)) == asked
    ids = lambda out: [j["id"] for j in read_jsonl(out / collect.JOURNAL)]  # noqa: E731
    assert sorted(ids(resumed)) == sorted(ids(whole))  # the same draws
    assert (resumed / "sharegpt.jsonl").read_text() == (whole / "sharegpt.jsonl").read_text()


def test_max_requests_bounds_the_draws(tmp_path):
    reply, log, _ = _teacher()
    with scripted_server(reply) as url:
        settings = yaml.safe_load(open(_config(tmp_path, url), encoding="utf-8"))
        cfg = collect.CONFIG(**{**settings, "quota": {"en": 6}, "max_requests": 7})
        art = collect.run(cfg, RunContext(stage="c", kind="collect", stage_dir=tmp_path / "c", quiet=True))
    assert len(log) == 7 and art.metrics["stop"] == "quota not met (en 5 of 6): max_requests (7) spent"
    assert collect.max_requests(collect.CONFIG(source="x", teacher="t", quota={"en": 10, "ru": 10}, n=2)) == 15
    with pytest.raises(ValueError, match="max_requests .3. is below the 4 prompts"):
        collect.CONFIG(source="x", teacher="t", quota={"en": 4}, max_requests=3)
