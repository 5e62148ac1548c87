"""The `fabrika` executable itself: every command it lists is driven by a test through the installed
console script, and the commands no other test file runs get a cheap run here."""

from __future__ import annotations

import json
import re
from pathlib import Path

from helpers import FABRIKA, run_cli, scripted_server, write_jsonl

TESTS = Path(__file__).parent


def listed_commands(*group: str) -> list[str]:
    r = run_cli(*group, "--help")
    assert r.returncode == 0, r.stderr
    panel = r.stdout.split("Commands")[-1]
    return re.findall(r"^│ ([a-z][\w-]*)\s{2,}", panel, re.M)


def test_every_listed_command_is_run_through_the_installed_executable():
    from test_bad_input import CASES

    assert Path(FABRIKA).name == "fabrika" and Path(FABRIKA).is_file()
    commands = listed_commands() + [f"eval {c}" for c in listed_commands("eval")]
    assert {"run", "sft", "serve", "eval mtbench", "eval show"} <= set(commands)
    driven = {" ".join(c.argv[:2]) if c.argv[0] == "eval" else c.argv[0] for c in CASES}
    for path in TESTS.rglob("test_*.py"):
        text = path.read_text(encoding="utf-8")
        driven |= {f"eval {m}" for m in re.findall(r'run_cli\(\s*"eval",\s*"([\w-]+)"', text)}
        driven |= set(re.findall(r'run_cli\(\s*"([\w-]+)"', text))
    assert not [c for c in commands if c not in driven and c != "eval"]


def test_tokenizer_command(tmp_path, small_corpus):
    r = run_cli("tokenizer", str(small_corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok"), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["metrics"]["vocab_size"] == 300
    assert (tmp_path / "tok" / manifest["artifact"]["path"] / "tokenizer.json").is_file()


def test_eval_mtbench_grades_an_answer_file_and_never_asks_twice(tmp_path):
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": qid, "answer_id": str(qid), "model_id": "mine", "tstamp": 0,
         "choices": [{"index": 0, "turns": ["Ответ «первый».", "Second answer."]}]} for qid in (81, 82)])
    calls: list[int] = []
    with scripted_server(lambda messages: calls.append(1) or "Fine. Rating: [[7]]") as judge:
        args = ["eval", "mtbench", "--answers", str(answers), "--bench", "mt_bench", "--questions", "2",
                "--judge", f"openai:judge@{judge}", "--out", str(tmp_path / "ev")]
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(calls) == 4  # two questions, two turns each: the server's own count
        results = json.loads((tmp_path / "ev" / "results.json").read_text())["mtbench"]["mt_bench"]
        assert results["overall"] == 7.0 and results["n"] == 4 and "| mt_bench | 7" in r.stdout
        r = run_cli(*args)  # the same command again: every judgment is on disk already
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(calls) == 4
