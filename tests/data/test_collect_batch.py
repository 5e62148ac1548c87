"""collect with `client.mode: batch`, at the process level: the installed `fabrika collect` killed with
SIGKILL after submitting and before its batches end (also in the instant between `batches.create`
and the write of the batch id), then run again; cancelled by `fabrika batches --cancel`; shown by
`fabrika batches`. The witness is the batch server's own log of every submission: no request is
submitted twice."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from batch_server import batch_server, submitted
from helpers import run_cli, run_fabrika, write_jsonl

from fabrika.infer import batch as B


def user_rows() -> list[dict]:
    """Repeated ids, typographic quotes, three languages."""
    rows = []
    for i, t in enumerate(["entropy", "inflation", "recursion", "a hash table"]):
        for rid, lang, text in [(f"en-{i}", "en", f"Explain “{t}” — why?"), (f"ru-{i}", "ru", f"Объясни «{t}»."),
                                ("17", "zh", f"请解释“{t}”这个概念。")]:
            rows.append({"id": rid, "language": lang, "messages": [{"role": "user", "content": text}]})
    return rows


def answer(messages: list[dict]) -> str:
    return "Answer: " + messages[-1]["content"][::-1]


def _collect(tmp_path: Path, url: str, out: Path, env: dict | None = None, **run) -> subprocess.CompletedProcess:
    source = write_jsonl(tmp_path / "prompts.jsonl", user_rows())
    cfg = tmp_path / "collect.yaml"
    cfg.write_text(yaml.safe_dump({
        "source": str(source), "teacher": f"openai:teacher@{url}", "max_tokens": 64, "filters": ["empty", "duplicate"],
        "client": {"mode": "batch", "max_retries": 1, "prices": {"teacher": [2.0, 8.0]},
                   "batch": {"poll_s": 0.05, "max_requests": 5}}}, allow_unicode=True), encoding="utf-8")
    return run_fabrika("collect", "--config", str(cfg), "--out", str(out),
                       env={"FABRIKA_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}, **run)


def _answers(out: Path) -> dict[str, str]:
    import datasets

    rows = datasets.load_from_disk(str(out / "dataset")).to_list()
    return {r["messages"][-1]["content"]: r["messages"][0]["content"] for r in rows}


def _check_dataset(out: Path) -> None:
    got = _answers(out)
    assert sorted(got.values()) == sorted(r["messages"][0]["content"] for r in user_rows())
    assert all(a == answer([{"content": q}]) for a, q in got.items())


def test_killed_after_submitting_resumes_the_same_batches(tmp_path):
    log: list[dict] = []
    out = tmp_path / "out"
    with batch_server(answer, log, polls=6) as url:
        r = _collect(tmp_path, url, out, kill_when=lambda: any(e["op"] == "retrieve" for e in log))
        assert r.returncode == -9, r.stderr
        first = {e["batch_id"] for e in log if e["op"] == "create"}
        assert first and not (out / "dataset").exists()
        n = len(log)
        r = _collect(tmp_path, url, out)
        assert r.returncode == 0, r.stderr
    ids = submitted(log)
    assert len(ids) == 12 and max(Counter(ids).values()) == 1  # each request submitted once, over both runs
    assert first <= {e["batch_id"] for e in log[n:] if e["op"] == "retrieve"}  # polled again, not resubmitted
    _check_dataset(out)
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["cost_usd"] == pytest.approx(12 * (10 * 2.0 + 20 * 8.0) / 1e6 / 2, abs=1e-4)
    shown = run_cli("batches", str(out))
    assert shown.returncode == 0 and shown.stdout.count("completed") == 3, shown.stdout


def test_killed_between_create_and_journal_finds_the_batch_by_its_tag(tmp_path):
    log: list[dict] = []
    out = tmp_path / "out"
    with batch_server(answer, log, polls=2) as url:
        r = _collect(tmp_path, url, out, env={"FABRIKA_FAULT": "kill_after_batch_create=1"})
        assert r.returncode == -9
        assert len([e for e in log if e["op"] == "create"]) == 1
        r = _collect(tmp_path, url, out)
        assert r.returncode == 0, r.stderr
    assert [e["op"] for e in log].count("list") == 1
    assert "found again by its tag" in r.stdout
    ids = submitted(log)
    assert len(ids) == 12 and max(Counter(ids).values()) == 1
    _check_dataset(out)


def test_cancel_stops_a_running_collect(tmp_path):
    log: list[dict] = []
    out = tmp_path / "out"
    with batch_server(answer, log, polls=10 ** 6) as url:
        import threading

        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=_collect(tmp_path, url, out)))
        t.start()
        while not any(e["op"] == "retrieve" for e in log):
            time.sleep(0.02)
        status = run_cli("batches", str(out))
        assert "in_progress" in status.stdout or "validating" in status.stdout, status.stdout
        cancel = run_cli("batches", str(out), "--cancel")
        assert cancel.returncode == 0 and "batch_1" in cancel.stdout, cancel.stderr
        t.join(120)
    r = result["r"]
    assert r.returncode == 2 and "cancelled" in r.stderr, r.stderr
    assert [e["op"] for e in log].count("cancel") >= 1
    assert B.in_flight_line(out) == ""


def test_status_shows_the_batches_in_flight_and_a_restarted_stage_adopts_them(tmp_path):
    """`fabrika status` names the batches in flight; the stage run again with other settings (the
    pipeline starts it afresh in a new directory) polls them instead of submitting anew."""
    log: list[dict] = []
    source = write_jsonl(tmp_path / "prompts.jsonl", user_rows())
    pipe = tmp_path / "pipe.yaml"

    def write(filters: list[str], url: str) -> None:
        pipe.write_text(yaml.safe_dump({"name": "distil", "run_dir": str(tmp_path / "run"), "stages": {"collect": {
            "source": str(source), "teacher": f"openai:teacher@{url}", "filters": filters,
            "client": {"mode": "batch", "batch": {"poll_s": 0.05, "max_requests": 5}}}}}), encoding="utf-8")

    with batch_server(answer, log, polls=8) as url:
        write(["empty"], url)
        env = {"FABRIKA_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}
        r = run_fabrika("run", str(pipe), env=env, kill_when=lambda: any(e["op"] == "retrieve" for e in log))
        assert r.returncode == -9
        status = run_fabrika("status", str(tmp_path / "run"), env=env)
        assert "3 batches in flight" in status.stdout, status.stdout
        write(["empty", "duplicate"], url)
        r = run_fabrika("run", str(pipe), env=env)
        assert r.returncode == 0, r.stderr
        status = run_fabrika("status", str(tmp_path / "run"), env=env)
    assert "in flight" not in status.stdout and "done" in status.stdout
    assert max(Counter(submitted(log)).values()) == 1


def test_batches_cancelled_between_runs_are_submitted_anew(tmp_path):
    log: list[dict] = []
    out = tmp_path / "out"
    with batch_server(answer, log, polls=6) as url:
        r = _collect(tmp_path, url, out, kill_when=lambda: any(e["op"] == "retrieve" for e in log))
        assert r.returncode == -9
        cancel = run_cli("batches", str(out), "--cancel")
        assert cancel.returncode == 0 and "batch_1, batch_2, batch_3" in cancel.stdout, cancel.stdout + cancel.stderr
        r = _collect(tmp_path, url, out)
        assert r.returncode == 0, r.stderr
    counts = Counter(submitted(log))
    assert len(counts) == 12 and set(counts.values()) == {2}  # cancelled once, then answered
    _check_dataset(out)


def teacher_and_judges(messages: list[dict]) -> str:
    """The teacher refuses to explain entropy; the refusal judge says so; the grader prefers the
    first candidate of each prompt to its variant."""
    text = messages[-1]["content"]
    if "YES or NO" in text:
        return "YES" if "I cannot" in text else "NO"
    if "[[rating]]" in text:
        return "Rating: [[3]]" if "(variant 1)" in text else "Rating: [[9]]"
    return "I cannot help with that." if "entropy" in text else answer(messages)


def _collect_with(tmp_path: Path, url: str, out: Path, **extra) -> subprocess.CompletedProcess:
    tmp_path.mkdir(exist_ok=True)
    source = write_jsonl(tmp_path / "prompts.jsonl", user_rows())
    cfg = tmp_path / "collect.yaml"
    cfg.write_text(yaml.safe_dump({
        "source": str(source), "teacher": f"openai:teacher@{url}", "filters": ["empty"],
        "client": {"mode": "batch", "batch": {"poll_s": 0.05}}, **extra}, allow_unicode=True), encoding="utf-8")
    return run_fabrika("collect", "--config", str(cfg), "--out", str(out),
                       env={"FABRIKA_CACHE_DIR": str(tmp_path / "cache")})


def test_refusal_checks_and_preference_grades_go_through_batches(tmp_path):
    import datasets

    log: list[dict] = []
    with batch_server(teacher_and_judges, log, polls=2) as url:
        r = _collect_with(tmp_path / "sft", url, tmp_path / "sft" / "out", refusal_judge=f"openai:judge@{url}")
        assert r.returncode == 0, r.stderr
        creates = [len(e["custom_ids"]) for e in log if e["op"] == "create"]
        assert creates == [12, 12]  # the answers, then one refusal check per answer
        rows = datasets.load_from_disk(str(tmp_path / "sft" / "out" / "dataset")).to_list()
        assert len(rows) == 9 and not any("entropy" in str(r["messages"]) for r in rows)
        log.clear()
        r = _collect_with(tmp_path / "pref", url, tmp_path / "pref" / "out",
                          preference={"k": 2, "judge": f"openai:judge@{url}"})
        assert r.returncode == 0, r.stderr
    creates = [len(e["custom_ids"]) for e in log if e["op"] == "create"]
    assert creates == [12, 24]  # k=2 candidates per prompt in one request each, then a grade per candidate
    assert max(Counter(submitted(log)).values()) == 1
    pairs = datasets.load_from_disk(str(tmp_path / "pref" / "out" / "dataset")).to_list()
    assert len(pairs) == 12
    assert all("(variant 1)" in p["rejected"][0]["content"] and p["chosen_score"] == 9 for p in pairs)


def test_a_batch_created_whose_reply_was_lost_is_found_not_submitted_again(tmp_path):
    log: list[dict] = []
    out = tmp_path / "out"
    with batch_server(answer, log, polls=2, lose_creates=1) as url:
        r = _collect(tmp_path, url, out)
        assert r.returncode == 2 and "submitting a batch: HTTP 500" in r.stderr and "Traceback" not in r.stderr
        r = _collect(tmp_path, url, out)
        assert r.returncode == 0, r.stderr
    assert "found again by its tag" in r.stdout
    assert len(submitted(log)) == 12 and max(Counter(submitted(log)).values()) == 1
    _check_dataset(out)
