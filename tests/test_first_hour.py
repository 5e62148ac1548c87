"""A new user's first hour: a failed attempt never blocks the retry, Ctrl-C ends with fabrika's own message
and state saved, and the collected folder loads with `datasets.load_dataset` like any Hub dataset."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import yaml

from fabrika.artifacts import read_jsonl
from fabrika.data import collect
from helpers import FABRIKA, REPO, run_cli, scripted_server, write_jsonl

QUESTIONS = ["Why is the sky blue?", "Как испечь хлеб дома?", "What does a “compiler” do?", "月亮为什么有阴晴圆缺？",
             "Name three rivers in Africa.", "Сколько лап у паука?", "How do vaccines train the immune system?",
             "Explain recursion to a child.", "Что такое фотосинтез?", "Write a haiku about rain.",
             "How far is the Moon from the Earth?", "Why do cats purr?"]
PROMPTS = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}]} for i, q in enumerate(QUESTIONS)]


def _config(tmp_path, url: str, **extra) -> str:
    cfg = {"source": str(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)), "teacher": f"openai:teacher@{url}",
           "max_tokens": 8, "client": {"concurrency": 1, "max_retries": 0, "backoff_base_s": 0.01, "timeout_s": 30},
           **extra}
    path = tmp_path / f"collect-{len(list(tmp_path.glob('collect-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_a_failed_first_attempt_does_not_block_the_retry(tmp_path):
    out = tmp_path / "d"
    r = run_cli("collect", "-c", _config(tmp_path, "http://127.0.0.1:9/v1"), "-o", str(out), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (out / ".fingerprint").exists()  # the failed attempt's settings
    with scripted_server(lambda m: f"The answer to {m[-1]['content']}") as url:  # the corrected teacher: other settings, same --out
        r = run_cli("collect", "-c", _config(tmp_path, url), "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert len(list(read_jsonl(out / collect.JOURNAL))) == len(PROMPTS)

    import datasets

    kept = datasets.load_from_disk(str(out / "dataset")).to_list()
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf-cache"))  # journal and manifest beside it
    assert list(loaded) == ["train"] and loaded["train"].to_list() == kept
    assert (out / "sharegpt.jsonl").exists()


def test_ctrl_c_says_how_to_continue_and_the_rerun_continues(tmp_path):
    def slow(messages: list[dict]) -> str:
        time.sleep(0.2)
        return f"The answer to {messages[-1]['content']}"

    out = tmp_path / "d"
    journal = out / collect.JOURNAL
    with scripted_server(slow) as url:
        cfg = _config(tmp_path, url)
        proc = subprocess.Popen([FABRIKA, "collect", "-c", cfg, "-o", str(out), "--quiet"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        deadline = time.time() + 120
        while time.time() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "run the same command again" in err and "Aborted" not in err
        assert "Traceback" not in err, err
        before = [row["id"] for row in read_jsonl(journal)]
        assert 2 <= len(before) < len(PROMPTS)

        r = run_cli("collect", "-c", cfg, "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    after = [row["id"] for row in read_jsonl(journal)]
    assert after[:len(before)] == before and sorted(after) == sorted(p["id"] for p in PROMPTS)
