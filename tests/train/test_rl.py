"""The `rl` stage (GRPO through TRL): rewards scored as specified, a tiny model that measurably learns
a rule-based reward, a judge run killed with -9 and resumed without grading anything twice (the
judge's own request log is the witness), and bad input stopped with one message and exit 2."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_cli, serving, write_jsonl

from fabrika.artifacts import RunContext, read_jsonl, read_manifest
from fabrika.train import rewards as R
from fabrika.train import rl

PROMPTS = [  # shaped like users' data: mixed languages, typographic quotes, a duplicate, an empty row
    {"prompt": "Tell me about the king’s “new” castle.", "language": "en", "answer": "42"},
    {"prompt": "Что такое «любовь»?", "language": "Russian", "answer": "7"},
    {"prompt": "城堡在哪里？", "language": "zh", "answer": "3"},
    {"prompt": "Who speaks first in the play?", "language": "en", "answer": "1,200"},
    {"prompt": "Who speaks first in the play?", "language": "en", "answer": "1,200"},
    {"prompt": "", "language": "en", "answer": "0"},
    {"prompt": "Почему небо голубое?", "language": "Klingon", "answer": "5"},
]


def prompts_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


# --- rewards, one by one ------------------------------------------------------------------------

def test_verifiable_modes():
    numeric = R.VerifiableReward(reference="answer")
    assert R.verifiable_score(numeric, "So 600 + 600 = \\boxed{1,200}.", {"answer": "1200"}) == 1.0
    assert R.verifiable_score(numeric, "The total is 1200.0\n", {"answer": "1,200"}) == 1.0
    assert R.verifiable_score(numeric, "about 1199", {"answer": "1200"}) == 0.0
    assert R.verifiable_score(numeric, "no number here", {"answer": "1200"}) == 0.0
    exact = R.VerifiableReward(mode="exact")
    assert R.verifiable_score(exact, "Let me think.\nParis.", {"answer": " paris"}) == 1.0
    assert R.verifiable_score(exact, "Lyon", {"answer": "Paris"}) == 0.0
    regex = R.VerifiableReward(mode="regex", pattern=r"^\d{3}-\d{4}$", reference=None)
    assert R.verifiable_score(regex, "555-1234", {}) == 1.0 and R.verifiable_score(regex, "call 555", {}) == 0.0
    per_row = R.VerifiableReward(mode="regex", reference="answer")
    assert R.verifiable_score(per_row, "colour", {"answer": "colou?r"}) == 1.0
    as_json = R.VerifiableReward(mode="json", reference=None)
    assert R.verifiable_score(as_json, 'Here:\n```json\n{"a": 1}\n```', {}) == 1.0
    assert R.verifiable_score(as_json, "{'a': 1}", {}) == 0.0
    with pytest.raises(ValueError, match="needs `pattern` or a `reference`"):
        R.VerifiableReward(mode="regex", reference=None)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        R.VerifiableReward(mode="regex", pattern="(unclosed")


def test_json_schema_checked():
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    cfg = R.VerifiableReward(mode="json", reference=None, schema=schema)
    assert R.verifiable_score(cfg, '{"name": "Ада"}', {}) == 1.0
    assert R.verifiable_score(cfg, '{"name": 3}', {}) == 0.0
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        R.VerifiableReward(mode="json", reference=None, schema={"type": "no-such-type"})


def test_length_format_and_language():
    length = R.LengthReward(min_chars=4, max_chars=10)
    assert R.length_score(length, "x" * 7) == 0.0
    assert R.length_score(length, "x" * 15) == -0.5 and R.length_score(length, "x") == -0.75
    fmt = R.FormatReward(pattern=r"Answer: .+", ends_with=".", stopped=True)
    assert R.format_score(fmt, "Answer: yes.", stopped=True) == 1.0
    assert R.format_score(fmt, "yes", stopped=True) == pytest.approx(1 / 3)
    lang = R.LanguageReward()
    codes = ("en", "ru", "zh")
    assert R.language_score(lang, "Любовь — это чувство глубокой привязанности.", "ru", codes) == 1.0
    assert R.language_score(lang, "Love is a feeling of deep attachment.", "ru", codes) == 0.0
    assert R.language_score(lang, "", "ru", codes) == 0.0
    assert R.language_score(lang, "anything", None, codes) is None  # unknown prompt language: not scored


def test_trl_reward_function_reads_rows_and_stopping():
    fn = R.trl_function("format", R.rule_scorer("format", R.FormatReward(stopped=True), ()), {7})
    out = fn(prompts=[[{"role": "user", "content": "q"}]] * 2,
             completions=[[{"role": "assistant", "content": "a"}]] * 2, completion_ids=[[1, 7], [1, 2]],
             answer=["x", "y"], trainer_state=None)
    assert out == [1.0, 0.0] and fn.__name__ == "format"


def test_prompts_from_files_and_collect_output(tmp_path):
    cfg = rl.CONFIG(model="m", data="d", rewards={"verifiable": {}, "language": {}})
    rows, stats = rl.load_prompts(cfg, str(prompts_file(tmp_path)), need_language=True)
    assert stats == {"prompts": 6, "malformed": 1, "languages": ["en", "ru", "zh"]}
    assert rows[1]["language"] == "ru" and rows[3]["answer"] == "1,200"  # an English name becomes its code
    assert rows[5]["language"] == "ru"  # a language lingua does not know: detected from the prompt
    assert rows[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]["prompt"]}]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Сколько будет два плюс два?"},
        {"role": "assistant", "content": "Четыре."}]}])
    cfg = rl.CONFIG(model="m", data="d", rewards={"language": {}})
    rows, _ = rl.load_prompts(cfg, str(chats), need_language=True)
    assert rows[0]["prompt"][-1]["role"] == "user" and len(rows[0]["prompt"]) == 2  # the answer is cut off
    assert rows[0]["language"] == "ru"  # detected: the file has no language column


# --- bad input: one clear message, exit 2 --------------------------------------------------------

def test_bad_input_exits_2_with_one_message(tmp_path, chat_model):
    data = str(prompts_file(tmp_path))
    base = ["rl", "--model", str(chat_model), "--data", data, "--out", str(tmp_path / "o"), "-q"]
    cfg = tmp_path / "rl.yaml"
    cfg.write_text(yaml.safe_dump({"rewards": {"language": {"weight": "a lot"}}}))
    cases = [
        (["--reward", "judgee=1"], "rewards.judgee: unknown key; did you mean 'judge'?"),
        (["--reward", "language=heavy"], "--reward 'language=heavy': the weight 'heavy' is not a number"),
        (["--config", str(cfg)], "rewards.language.weight: Input should be a valid number"),
        (["--reward", "verifiable", "--set", "rewards.verifiable.reference=solution"],
         "rl.rewards.verifiable.reference: the prompts in", "no column 'solution'"),
        (["--set", "rewards={}"], "no reward configured"),
        (["--reward", "language", "--set", "rollouts.backend=vllm"], "rl.rollouts.backend: vllm generation in training "
         "needs a CUDA GPU"),
        (["--reward", "language", "--method", "qlora"], "rl.method: qlora needs a CUDA GPU"),
        (["--reward", "language", "--set", "rollouts.num_generations=3"],
         "must be a multiple of rollouts.num_generations"),
    ]
    for args, *messages in cases:
        r = run_cli(*base, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert all(m in r.stderr for m in messages), (args, r.stderr[-2000:])


# --- learning ----------------------------------------------------------------------------------

def _tiny_rl(tmp_path: Path, model: Path, data: Path, **overrides) -> dict:
    cfg = {"model": str(model), "data": str(data), "method": "full", "beta": 0.04,
           "rewards": {"length": {"max_chars": 12}},
           "rollouts": {"num_generations": 4, "max_completion_length": 12},
           "train": {"max_steps": 30, "batch_size": 8, "lr": 2e-2, "logging_steps": 1, "save_steps": 1000}}
    for k, v in overrides.items():
        cfg[k] = {**cfg[k], **v} if k in ("rollouts", "train") else v
    return cfg


@pytest.mark.slow
def test_tiny_model_learns_a_rule_reward_over_seeds(tmp_path, chat_model):
    """Random tiny Llama, 12-token answers, a length reward (at most 12 characters): GRPO must move
    the reward's mean over the last steps clearly above the first steps', for every seed."""
    from fabrika import report

    data = prompts_file(tmp_path)
    for seed in (0, 1, 2):
        out = tmp_path / f"seed{seed}"
        cfg = rl.CONFIG(**_tiny_rl(tmp_path, chat_model, data, train={"lr": 3e-2}))
        art = rl.run(cfg, RunContext(stage="rl", kind="rl", stage_dir=out, seed=seed, quiet=True))
        m = art.metrics
        assert m["steps"] == 30 and m["prompts"] == 6
        assert m["reward_length_last"] > m["reward_length_first"] + 0.5, (seed, m)  # measured: -0.94 → -0.08
        rows = list(read_jsonl(out / "metrics.jsonl"))
        logged = rows[0]
        for key in ("rewards/length/mean", "rewards/length/std", "kl", "completions/mean_length", "reward"):
            assert key in logged, key
        assert any("tokens_per_s" in r for r in rows) and "kl" in m and "tokens_per_s" in m
        assert (art.path / "model.safetensors").exists() and not (out / "checkpoints").exists()
    assert report.training_plot(rows, "rl").startswith("data:image/png;base64,")


def test_killed_rl_resumes_exactly(tmp_path, chat_model):
    """kill -9 after step 4 of 5 with the last checkpoint at step 2, in the middle of the first pass over
    the prompts (3 steps each): the resumed run skips into that pass, starts the second with the same
    order, and logs the same rewards and losses, step by step, as an uninterrupted run."""
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(_tiny_rl(tmp_path, chat_model, prompts_file(tmp_path),
                                            train={"max_steps": 5, "save_steps": 2}), allow_unicode=True))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli("rl", "--config", str(path), "--out", str(straight), "-q").returncode == 0
    r = run_cli("rl", "--config", str(path), "--out", str(resumed), "-q", env={"FABRIKA_FAULT": "kill_at_step=4"})
    assert r.returncode == -9, r.stderr[-3000:]
    r = run_cli("rl", "--config", str(path), "--out", str(resumed), "-q")
    assert r.returncode == 0 and "(step 2)" in r.stdout, r.stderr[-3000:]

    def curve(out: Path) -> list:
        rows = read_jsonl(out / "metrics.jsonl")
        return [(x["step"], x["rewards/length/mean"], x["loss"]) for x in rows if "loss" in x]

    a, b = curve(straight), curve(resumed)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, 6))
    assert [v for row in a for v in row] == pytest.approx([v for row in b for v in row], rel=1e-4, abs=1e-6)


# --- the judge: killed and resumed, nothing graded twice --------------------------------------

@contextmanager
def logging_judge(log: Path, reply=lambda answer: f"Fine. Rating: [[{len(answer) % 10 + 1}]]", delay_s: float = 0.15):
    """A real OpenAI-compatible judge on loopback that appends every grading request it receives
    (question, answer) to `log` before answering, slowly enough that requests are in flight at a kill."""
    from fastapi import FastAPI

    app = FastAPI()
    lock = threading.Lock()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        user = body["messages"][-1]["content"]
        question = user.split("[Question]\n", 1)[1].split("\n\n[The Start of Assistant's Answer]", 1)[0]
        answer = user.split("[The Start of Assistant's Answer]\n", 1)[1].split("\n[The End of Assistant's Answer]")[0]
        with lock, open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"question": question, "answer": answer, "t": time.time()}, ensure_ascii=False) + "\n")
        await asyncio.sleep(delay_s)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply(answer)},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    with serving(app) as url:
        yield url


def _requests(log: Path) -> list[tuple[str, str]]:
    return [(r["question"], r["answer"]) for r in read_jsonl(log)]


def _judge_config(tmp_path: Path, chat_model: Path, url: str, steps: int = 8) -> Path:
    cfg = _tiny_rl(tmp_path, chat_model, prompts_file(tmp_path),
                   rewards={"judge": {"model": f"openai:judge@{url}", "client": {"concurrency": 4}},
                            "language": {"weight": 0.5}},
                   train={"max_steps": steps, "batch_size": 8, "lr": 1e-2, "logging_steps": 1, "save_steps": 2})
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def test_judge_run_killed_and_resumed_grades_nothing_twice(tmp_path, chat_model):
    log, out = tmp_path / "judge.log", tmp_path / "run"
    concurrency = 4
    with logging_judge(log) as url:
        config = _judge_config(tmp_path, chat_model, url)
        cmd = [sys.executable, "-m", "fabrika.cli", "rl", "--config", str(config), "--out", str(out), "-q"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # kill -9 in the middle of step 5's gradings
            if (out / "checkpoints" / "checkpoint-4").exists():
                seen = len(_requests(log))  # 4 of step 5's requests answered and cached, up to 4 in flight
                while len(_requests(log)) < seen + concurrency + 2 and time.time() < deadline:
                    time.sleep(0.01)
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        assert proc.returncode == -9, proc.stderr.read()[-3000:]
        before_kill = _requests(log)
        assert read_manifest(out) is None and len(set(before_kill)) == len(before_kill)
        r = run_cli("rl", "--config", str(config), "--out", str(out), "-q")
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    every = _requests(log)
    twice = {k for k in set(every) if every.count(k) > 1}
    # only what was in flight at the kill (sent, not yet answered into the cache) may be asked again
    in_flight = set(before_kill[-concurrency:])
    assert twice <= in_flight, (twice, len(every))
    m = read_manifest(out)["metrics"]
    assert m["steps"] == 8 and "reward_judge_last" in m and "reward_language_last" in m
    # the resumed run redid step 5 with the same completions (exact resume): what was paid came from the cache
    assert m["judge_cached"] >= 1 and m["judge_graded"] == m["judge_cached"] + m["judge_requests"]
    journal = list(read_jsonl(out / "judge.jsonl"))
    assert journal and all(1 <= j["rating"] <= 10 for j in journal)


@pytest.mark.parametrize("on_failure,unrated", [("skip", None), ("zero", 0.0)])
def test_judge_counts_unrated_answers_and_asks_once_per_distinct_answer(tmp_path, on_failure, unrated):
    from fabrika.train.judge_reward import Judge, JudgeReward

    log = tmp_path / "judge.log"
    reply = lambda answer: "Rating: [[8]]" if answer.startswith("good") else "I cannot say."  # noqa: E731
    with logging_judge(log, reply=reply, delay_s=0) as url:
        cfg = JudgeReward(model=f"openai:judge@{url}", on_failure=on_failure)
        logged: dict[str, float] = {}
        prompts = [[{"role": "user", "content": "Что такое «любовь»?"}]] * 3
        answers = [[{"role": "assistant", "content": t}] for t in ("good answer", "good answer", "meh")]
        with Judge(cfg, cfg.model, tmp_path) as judge:
            scores = judge(prompts, answers, language=["ru"] * 3, log_metric=logged.__setitem__)
            for lang, multilingual in (("ru", True), ("en", False), (None, False)):  # FastChat's prompt for English
                asked = judge.messages("q", "a", {"language": lang})[-1]["content"]
                assert ("responded in the correct language" in asked) is multilingual
    assert scores == [0.8, 0.8, unrated]
    assert logged == {"judge/requests": 2.0, "judge/cached": 0.0, "judge/unrated": 1.0, "judge/failed": 0.0}
    assert len(_requests(log)) == 2  # the repeated answer was graded once
    journal = list(read_jsonl(tmp_path / "judge.jsonl"))
    assert sorted(j["rating"] is None for j in journal) == [False, True]


def test_a_judge_that_never_rates_stops_the_run(tmp_path, chat_model):
    """A local judge (served on loopback for the stage) too small to follow the grading format."""
    cfg = _tiny_rl(tmp_path, chat_model, prompts_file(tmp_path),
                   rewards={"judge": {"model": f"hf:{chat_model}", "max_tokens": 16}}, train={"max_steps": 2})
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    r = run_cli("rl", "--config", str(path), "--out", str(tmp_path / "run"), "-q")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "rated none of the 8 answers of step 0" in r.stderr and "[[rating]]" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_lora_rl_keeps_the_chat_contract(tmp_path, chat_model):
    """LoRA with a format and a verifiable reward: adapter and merged model saved, generation still
    stopping at the end-of-turn token the model was given, speed and MFU recorded."""
    cfg = rl.CONFIG(**_tiny_rl(tmp_path, chat_model, prompts_file(tmp_path), method="lora",
                               rewards={"format": {"stopped": True, "ends_with": "."},
                                        "verifiable": {"mode": "numeric", "weight": 2}},
                               train={"max_steps": 2, "lr": 1e-3, "peak_tflops": 1.0}))
    art = rl.run(cfg, RunContext(stage="rl", kind="rl", stage_dir=tmp_path / "out", quiet=True))
    out = tmp_path / "out"
    # speed is counted as in every training stage: tokens/s, and MFU once a peak is known (given here)
    assert all("tokens_per_s" in r and "mfu" in r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r)
    assert art.metrics["tokens_per_s"] > 0 and art.metrics["mfu"] > 0
    assert (out / "adapter" / "adapter_config.json").exists() and art.path == out / "model"
    gen = json.loads((art.path / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(art.path).convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    rows = list(read_jsonl(out / "metrics.jsonl"))
    assert {"rewards/format/mean", "rewards/verifiable/mean"} <= set(rows[0])
    extra = read_manifest(out)["artifact"]["extra"]
    assert extra["rewards"] == {"verifiable": 2.0, "format": 1.0} and extra["eot"] == "<|im_end|>"
