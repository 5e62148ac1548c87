"""MT-Bench judging keeps its promises under faults, at the process level: the installed `fabrika eval
mtbench` killed with SIGKILL at random points and run again, and a judge that is down, then up.
The witness is the test's own judge on 127.0.0.1 and its log of every request."""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import paid, run_fabrika, scripted_server, write_jsonl

from fabrika.artifacts import read_jsonl
from fabrika.evaluate import mtbench as M

QUESTIONS = 10
CONCURRENCY = 4


def verdict(messages: list[dict]) -> str:
    """The judge's rule: a rating read off the answer it is shown."""
    score = re.findall(r"score (\d+)", messages[-1]["content"])[-1]
    return f"Fair. Rating: [[{score}]]"


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> Path:
    """FastChat answer rows (typographic quotes and three scripts included), as another tool wrote them."""
    rows = []
    for i, q in enumerate(M.load_questions("mt_bench")[0][:QUESTIONS]):
        turns = [f"“Answer” one — ответ, 回答 score {i % 9 + 1}", f"‘Answer’ two score {(i + 3) % 9 + 1}"]
        rows.append({"question_id": q["question_id"], "answer_id": f"a{i}", "model_id": "mine", "tstamp": 0,
                     "choices": [{"index": 0, "turns": turns}]})
    return write_jsonl(tmp_path_factory.mktemp("answers") / "mine.jsonl", rows)


def _eval(answers: Path, url: str, out: Path, **options) -> subprocess.CompletedProcess:
    cfg = out.parent / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"mtbench": {"client": {"concurrency": CONCURRENCY, "max_retries": 1,
                                                          "backoff_base_s": 0.05}}}), encoding="utf-8")
    return run_fabrika("eval", "mtbench", "--answers", str(answers), "--bench", "mt_bench", "--questions",
                       str(QUESTIONS), "--judge", f"openai:judge@{url}", "--config", str(cfg), "--out", str(out), **options)


def _grades(out: Path) -> list[tuple]:
    rows = read_jsonl(out / "mt_bench" / "model_judgment" / "judge_single.jsonl")
    return sorted((r["question_id"], r["turn"], r["score"], r["judgment"], r["user_prompt"]) for r in rows)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, answers) -> list[tuple]:
    work = tmp_path_factory.mktemp("reference")
    log: list[dict] = []
    with scripted_server(verdict, log) as url:
        r = _eval(answers, url, work / "out", env={"FABRIKA_CACHE_DIR": str(work / "cache")})
    assert r.returncode == 0, r.stderr
    grades = _grades(work / "out")
    assert len(grades) == len(log) == 2 * QUESTIONS and all(g[2] != -1 for g in grades)
    return grades


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_judging_killed_at_a_random_point_then_rerun_pays_once(seed, answers, reference, tmp_path):
    kill_at = random.Random(seed).randint(CONCURRENCY, len(reference) - 6)
    log: list[dict] = []
    with scripted_server(verdict, log) as url:
        r = _eval(answers, url, tmp_path / "out", kill_when=lambda: len(log) >= kill_at)
        assert r.returncode == -9, r.stderr
        r = _eval(answers, url, tmp_path / "out")
        assert r.returncode == 0, r.stderr
    asked = paid(log)
    assert len(asked) == len(reference)
    assert sum(asked.values()) - len(asked) <= CONCURRENCY  # asked twice: only what was in flight at the kill
    assert _grades(tmp_path / "out") == reference


def test_a_judge_down_then_up_grades_everything_once(answers, reference, tmp_path):
    down = tmp_path / "judge-is-down"
    down.touch()
    log: list[dict] = []
    with scripted_server(verdict, log, down_while=down) as url:
        r = _eval(answers, url, tmp_path / "out")
        assert r.returncode == 2 and "run the same command again" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert _grades(tmp_path / "out") == []  # a failure is never a grade
        assert not (tmp_path / "out" / "manifest.json").exists()
        down.unlink()
        r = _eval(answers, url, tmp_path / "out")
        assert r.returncode == 0, r.stderr
    assert sorted(paid(log).values()) == [1] * len(reference)
    assert _grades(tmp_path / "out") == reference
