"""MT-Bench judging with `client.mode: batch`, at the process level: the installed `fabrika eval
mtbench` killed with SIGKILL while its batch is in flight and run again, its expired batch's rows
submitted again in a new batch; the grades equal online judging's. The witness is the batch server's
log of every submission."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import yaml
from batch_server import batch_server, submitted
from helpers import run_fabrika, scripted_server, write_jsonl

from fabrika.artifacts import read_jsonl
from fabrika.evaluate import mtbench as M

QUESTIONS = 6


def verdict(messages: list[dict]) -> str:
    return f"Fair. Rating: [[{len(messages[-1]['content']) % 9 + 1}]]"


def _answers(path: Path) -> Path:
    rows = []
    for i, q in enumerate(M.load_questions("mt_bench")[0][:QUESTIONS]):
        turns = [f"“Answer” one — ответ, 回答 {i}", f"‘Answer’ two {i * 7}"]
        rows.append({"question_id": q["question_id"], "answer_id": f"a{i}", "model_id": "mine", "tstamp": 0,
                     "choices": [{"index": 0, "turns": turns}]})
    return write_jsonl(path, rows)


def _eval(tmp_path: Path, url: str, out: Path, client: dict, **run) -> subprocess.CompletedProcess:
    tmp_path.mkdir(exist_ok=True)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"mtbench": {"client": client}}), encoding="utf-8")
    return run_fabrika("eval", "mtbench", "--answers", str(_answers(tmp_path / "mine.jsonl")), "--bench", "mt_bench",
                       "--questions", str(QUESTIONS), "--judge", f"openai:judge@{url}", "--config", str(cfg),
                       "--out", str(out), env={"FABRIKA_CACHE_DIR": str(tmp_path / "cache")}, **run)


def _grades(out: Path) -> list[tuple]:
    rows = read_jsonl(out / "mt_bench" / "model_judgment" / "judge_single.jsonl")
    return sorted((r["question_id"], r["turn"], r["score"], r["judgment"], r["user_prompt"]) for r in rows)


def test_batch_judging_resumes_after_kill_and_resubmits_only_expired_rows(tmp_path):
    with scripted_server(verdict) as url:
        r = _eval(tmp_path / "online", url, tmp_path / "online" / "out", {"concurrency": 4})
    assert r.returncode == 0, r.stderr
    online = _grades(tmp_path / "online" / "out")
    assert len(online) == 2 * QUESTIONS

    log: list[dict] = []
    work, out = tmp_path / "batch", tmp_path / "batch" / "out"
    client = {"mode": "batch", "batch": {"poll_s": 0.05, "retry": "batch"}}
    with batch_server(verdict, log, polls=5, fates=["expire"]) as url:
        r = _eval(work, url, out, client, kill_when=lambda: any(e["op"] == "retrieve" for e in log))
        assert r.returncode == -9
        r = _eval(work, url, out, client)
        assert r.returncode == 0, r.stderr
    creates = [e["custom_ids"] for e in log if e["op"] == "create"]
    assert [len(c) for c in creates] == [2 * QUESTIONS, QUESTIONS]  # the expired half, once more
    assert set(creates[1]) < set(creates[0])
    assert max(Counter(submitted(log)).values()) == 2
    assert _grades(out) == online
    assert not list((out / "mt_bench" / "model_judgment").glob("batches*"))  # FastChat's folder holds only judgments
    assert (out / "mt_bench" / "batches.jsonl").is_file()


def prefer_mine(messages: list[dict]) -> str:
    """Pairwise prompts: the answer saying MINE wins; single prompts: a rating."""
    text = messages[-1]["content"]
    if "THEIRS" in text:
        return "[[A]]" if text.index("MINE") < text.index("THEIRS") else "[[B]]"
    return verdict(messages)


def test_pairwise_and_single_judging_in_batch_mode_equal_online(tmp_path):
    rows = []
    for i, q in enumerate(M.load_questions("mt_bench")[0][:QUESTIONS]):
        rows.append({"question_id": q["question_id"], "answer_id": f"t{i}", "model_id": "theirs", "tstamp": 0,
                     "choices": [{"index": 0, "turns": [f"THEIRS «{i}»", f"THEIRS again {i}"]}]})
    theirs = write_jsonl(tmp_path / "theirs.jsonl", rows)

    def run(work: Path, url: str, client: dict) -> list[tuple]:
        mine = [{**r, "model_id": "mine", "choices": [{"index": 0, "turns": [f"MINE “{i}”", f"MINE again {i}"]}]}
                for i, r in enumerate(rows)]
        work.mkdir()
        (work / "eval.yaml").write_text(yaml.safe_dump({"mtbench": {"client": client}}), encoding="utf-8")
        r = run_fabrika("eval", "mtbench", "--answers", str(write_jsonl(work / "mine.jsonl", mine)), "--bench",
                        "mt_bench", "--questions", str(QUESTIONS), "--judge", f"openai:judge@{url}", "--baseline",
                        str(theirs), "--mode", "both", "--config", str(work / "eval.yaml"), "--out", str(work / "out"),
                        env={"FABRIKA_CACHE_DIR": str(work / "cache")})
        assert r.returncode == 0, r.stderr
        pairs = read_jsonl(work / "out" / "mt_bench" / "model_judgment" / "judge_pair.jsonl")
        return _grades(work / "out") + sorted((p["question_id"], p["turn"], p["g1_winner"], p["g2_winner"])
                                              for p in pairs)

    with scripted_server(prefer_mine) as url:
        online = run(tmp_path / "online", url, {"concurrency": 4})
    log: list[dict] = []
    with batch_server(prefer_mine, log, polls=2) as url:
        batched = run(tmp_path / "batch", url, {"mode": "batch", "batch": {"poll_s": 0.05}})
    assert batched == online
    assert [len(e["custom_ids"]) for e in log if e["op"] == "create"] == [2 * QUESTIONS, 4 * QUESTIONS]
    assert max(Counter(submitted(log)).values()) == 1
    assert all(p[2] == "model_1" and p[3] == "model_1" for p in online if len(p) == 4)
