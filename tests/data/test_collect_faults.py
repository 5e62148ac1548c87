"""collect keeps its promises under faults, proven at the process level: the installed `fabrika` is
killed with SIGKILL at random points and run again, its journal torn and corrupted, its pipeline
settings changed between runs, its teacher unreachable or failing, its client settings mistyped.
The source is shaped like users' data (repeated ids, typographic quotes, mixed languages, an empty
row, a huge row). The witness is the test's own teacher on 127.0.0.1: its log of every request
says what was asked and paid for."""

from __future__ import annotations

import hashlib
import json
import random
import socket
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import paid, run_fabrika, scripted_server, write_jsonl

from fabrika.data.collect import JOURNAL

CONCURRENCY = 4
TOPICS = ["entropy", "inflation", "photosynthesis", "recursion", "the Doppler effect", "compound interest",
          "plate tectonics", "a hash table"]


def user_rows() -> list[dict]:
    """What people upload: ids repeated for different prompts, a prompt repeated under another id,
    typographic quotes, three languages and a mix of them, a follow-up turn, an empty row, a huge row."""
    rows = []
    for i, t in enumerate(TOPICS):
        rows.append({"id": f"en-{i}", "language": "en",
                     "messages": [{"role": "user", "content": f"Explain “{t}” to a 12-year-old — what’s the point?"}]})
        rows.append({"id": f"ru-{i}", "language": "ru",
                     "messages": [{"role": "user", "content": f"Объясни «{t}» простыми словами, пожалуйста."}]})
        rows.append({"id": f"zh-{i}", "language": "zh",
                     "messages": [{"role": "user", "content": f"请用两句话解释“{t}”这个概念。"}]})
    rows[4]["id"] = rows[7]["id"] = rows[10]["id"] = "17"  # one id, three different prompts
    rows[5]["id"] = rows[6]["id"] = "row"
    rows.append({"id": "en-copy", "language": "en", "messages": rows[0]["messages"]})  # same prompt, new id
    rows.append({"id": "mixed", "language": "en",
                 "messages": [{"role": "user", "content": "How do I say «спасибо» and “谢谢” politely?"}]})
    rows.append({"id": "follow-up", "language": "en", "messages": [
        {"role": "user", "content": "Name a prime number, please."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And one that’s larger than 100?"}]})
    rows.append({"id": "empty", "language": "en", "messages": [{"role": "user", "content": ""}]})
    rows.append({"id": "huge", "language": "ru", "messages": [
        {"role": "user", "content": "Перескажи кратко: " + "«Длинный» текст — снова и снова… " * 3000}]})
    return rows


def answer(messages: list[dict]) -> str:
    """The teacher's rule: one answer per conversation, naming it; the huge prompt's answer is huge too
    (a journal line far longer than one read block)."""
    tag = hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()[:12]
    return f"[{tag}] " + messages[-1]["content"][::-1]


def _config(path: Path, source: Path, url: str, **extra) -> Path:
    cfg = {"source": str(source), "teacher": f"openai:teacher@{url}", "max_chars": 200_000, "max_tokens": 64,
           "filters": ["empty", "duplicate"],
           "client": {"concurrency": CONCURRENCY, "max_retries": 1, "backoff_base_s": 0.05, "timeout_s": 30}, **extra}
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def _rows(stage_dir: Path) -> list[dict]:
    """The dataset's rows, less the teacher's address (each test's teacher has its own port)."""
    import datasets

    return [{k: v for k, v in r.items() if k != "teacher"}
            for r in datasets.load_from_disk(str(stage_dir / "dataset")).to_list()]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("src") / "prompts.jsonl", user_rows())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, source) -> tuple[list[dict], set[str]]:
    """An uninterrupted run: its dataset, and the conversations it asked for."""
    work = tmp_path_factory.mktemp("reference")
    log: list[dict] = []
    with scripted_server(answer, log) as url:
        r = run_fabrika("collect", "--config", str(_config(work / "c.yaml", source, url)), "--out", str(work / "out"),
                        env={"FABRIKA_CACHE_DIR": str(work / "cache")})
    assert r.returncode == 0, r.stderr
    asked = paid(log)
    assert max(asked.values()) == 1
    rows = _rows(work / "out")
    for row in rows:  # every answer belongs to its own prompt, repeated ids or not
        assert row["messages"][-1]["content"] == answer(row["messages"][:-1])
    ids = [row["id"] for row in rows]
    assert ids.count("17") == 3 and ids.count("row") == 2 and "huge" in ids and "empty" not in ids
    assert "en-copy" not in ids and {row["language"] for row in rows} == {"en", "ru", "zh"}
    assert "3 prompts repeat the id of another prompt" in r.stdout
    return rows, set(asked)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_at_a_random_point_then_rerun_pays_once_and_equals_an_uninterrupted_run(seed, source, reference,
                                                                                         tmp_path):
    ref_rows, ref_asked = reference
    kill_at = random.Random(seed).randint(2 * CONCURRENCY, len(ref_asked) - 6)  # answers journaled, more to come
    log: list[dict] = []
    out = tmp_path / "out"
    with scripted_server(answer, log) as url:
        cfg = str(_config(tmp_path / "c.yaml", source, url))
        r = run_fabrika("collect", "--config", cfg, "--out", str(out), "--quiet", kill_when=lambda: len(log) >= kill_at)
        assert r.returncode == -9, r.stderr
        journal = out / JOURNAL
        lines = journal.read_bytes().splitlines(keepends=True)
        assert len(lines) >= 2
        torn = lines[-1][: len(lines[-1]) // 2]
        if seed == 1:  # a line ruined in the middle too (a disk error, an edit by hand)
            lines[0] = b"\x00\xff not json\n"
        journal.write_bytes(b"".join(lines) + torn)  # the kill cut the last write in half
        r = run_fabrika("collect", "--config", cfg, "--out", str(out), "--quiet")
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr and "cut a torn last line" in r.stderr
        if seed == 1:
            assert f"{journal}:1: not a JSON object, skipped" in r.stderr
    asked = paid(log)
    assert set(asked) == ref_asked
    assert sum(asked.values()) - len(asked) <= CONCURRENCY  # paid twice: only what was in flight at the kill
    assert _rows(out) == ref_rows


def test_only_filters_changed_in_a_pipeline_costs_no_new_request(source, reference, tmp_path):
    ref_rows, ref_asked = reference
    log: list[dict] = []
    with scripted_server(answer, log) as url:
        stage = yaml.safe_load(_config(tmp_path / "c.yaml", source, url).read_text(encoding="utf-8"))
        pipeline = tmp_path / "p.yaml"
        for filters in (["empty", "duplicate"], ["empty"]):
            spec = {"name": "distil", "run_dir": str(tmp_path / "run"), "stages": {"collect": {**stage, "filters": filters}}}
            pipeline.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
            r = run_fabrika("run", str(pipeline), "--quiet")
            assert r.returncode == 0, r.stderr
            assert json.loads((tmp_path / "run" / "collect" / "manifest.json").read_text())["config"]["filters"] == filters
    assert set(paid(log)) == ref_asked and max(paid(log).values()) == 1  # the second run was answered by the cache
    assert _rows(tmp_path / "run" / "collect") == ref_rows


def test_unreachable_teacher_fails_at_once(source, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(tmp_path / "c.yaml", source, f"http://127.0.0.1:{port}/v1", client={"backoff_base_s": 30})
    r = run_fabrika("collect", "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet", timeout=120)
    assert r.returncode == 2 and "cannot connect" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_retries_stop_after_max_retry_s(source, tmp_path):
    log: list[dict] = []
    with scripted_server(answer, log, down_first=10**6) as url:
        cfg = _config(tmp_path / "c.yaml", source, url,
                      client={"concurrency": 64, "max_retries": 1000, "backoff_base_s": 0.2, "max_retry_s": 1})
        r = run_fabrika("collect", "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 2 and "gave up after" in r.stderr and "run the same command again" in r.stderr
    tries = Counter(json.dumps(e["body"]["messages"]) for e in log)
    assert tries and max(tries.values()) < 10  # 0.2 + 0.4 + 0.8 s of backoff fit in the cap, not 1000


def test_client_settings_are_checked_at_load_without_echoing_secrets(source, tmp_path):
    cfg = _config(tmp_path / "c.yaml", source, "http://127.0.0.1:9/v1",
                  client={"concurency": 4, "api_key": "sk-live-do-not-print"})
    r = run_fabrika("collect", "--config", str(cfg), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "client.concurency: unknown key; did you mean 'concurrency'?" in r.stderr
    assert "client.api_key: unknown key; did you mean 'api_key_env'?" in r.stderr
    assert "sk-live" not in r.stdout + r.stderr
    stage = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "x", "stages": {"collect": {
        **stage, "client": {"api_key_env": "sk-live-do-not-print"}}}}), encoding="utf-8")  # the key, not its name
    r = run_fabrika("run", str(pipeline), "--dry-run")
    assert r.returncode == 2 and "stages.collect.client.api_key_env" in r.stderr, r.stderr
    assert "sk-live" not in r.stdout + r.stderr
