"""Every `fabrika` command in README.md's bash blocks runs as written, in order, in one folder.

Only what the test cannot have is swapped for a stand-in of the same shape (SUBSTITUTE): Hub models
and datasets for tiny local ones, `openai:gpt-4o` for a scripted OpenAI-compatible server, a GPU-only
method for its CPU sibling, long step counts for short ones. Placeholders in capitals (PIPELINE.yaml,
NAME) name files the test writes, and `[optional parts]` of a synopsis are left out. A line that
starts anything else (make, accelerate, srun) is not a fabrika command and is not run here."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import FABRIKA, REPO, run_cli, scripted_server


def readme_commands() -> list[str]:
    """The fabrika command lines of README.md's ```bash blocks: continuations joined, comments and
    `[optional]` groups removed."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("fabrika "):
                while re.search(r"\[[^\[\]]*\]", line):
                    line = re.sub(r"\s*\[[^\[\]]*\]", "", line)
                commands.append(" ".join(line.split()))
    return commands


def reply(messages: list[dict]) -> str:
    """A teacher that answers, a judge that grades and a pairwise judge that prefers the first answer."""
    asked = str(messages)
    if "[[A]]" in asked:
        return "Verdict: [[A]]"
    if "[[rating]]" in asked:
        return "Rating: [[6]]"
    return f"Ответ: {messages[-1]['content'][:40]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # about two and a half minutes on two busy cores
def test_readme_commands_run(tmp_path, small_corpus, chat_model):
    commands = readme_commands()
    assert len(commands) > 20 and commands[0].startswith("fabrika run PIPELINE.yaml")
    (tmp_path / "data").symlink_to(REPO / "data")
    for name in ("base", "A", "B"):
        (tmp_path / name).symlink_to(chat_model)
    (tmp_path / "p.txt").write_text("Привет!\nWhat is 2+2?\n", encoding="utf-8")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Как дела?"}\n{"prompt": "What is 2+2?"}\n', encoding="utf-8")
    (tmp_path / "PIPELINE.yaml").write_text(yaml.safe_dump({
        "name": "NAME", "stages": {"tok": {"kind": "tokenizer", "paths": [str(small_corpus)], "vocab_size": 300}}}))
    env = {**os.environ, "PATH": f"{Path(FABRIKA).parent}:{os.environ['PATH']}", "COLUMNS": "200"}

    with scripted_server(reply) as url:
        substitute = {
            "openai:gpt-4o": f"openai:gpt-4o@{url}",
            "lightblue/tagengo-gpt4": "data/samples/tagengo_sample.parquet",
            "ru=1000,en=1000,zh=1000": "ru=2,en=2,zh=2",
            "meta-llama/Meta-Llama-3-8B": str(chat_model),
            "--method qlora": "--method lora --max-steps 2",  # QLoRA needs CUDA
            "--max-steps 200": "--max-steps 2",
            "--bench ru_mt_bench": "--bench ru_mt_bench --questions 1 --set mtbench.max_new_tokens=4",
            "--baseline hf:base": "--baseline hf:base --questions 1 --set mtbench.max_new_tokens=4",
            "path/to/config.json": str(chat_model / "config.json"),
            "--vocab-size 8192": "--vocab-size 512",
            "--reward judge=1,language=0.5": "--reward judge=1,language=0.5 --max-steps 1 --set train.batch_size=2 "
                                             "--set rollouts.num_generations=2 --set rollouts.max_completion_length=8",
            "fabrika prepare data/corpus": f"fabrika prepare {small_corpus}",
            "fabrika tokenizer data/corpus": f"fabrika tokenizer {small_corpus}",
        }
        for command in commands:
            run = command
            for stand_in, real in substitute.items():
                run = run.replace(stand_in, real)
            if run.startswith("fabrika serve"):
                check_serve(run, tmp_path, env)
                continue
            r = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True,
                               input="hello\n/exit\n", timeout=300)
            assert r.returncode == 0, f"README: {command}\nran: {run}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def check_serve(run: str, cwd: Path, env: dict) -> None:
    """`fabrika serve` runs until stopped: it must answer, then stop cleanly on SIGTERM."""
    port = free_port()
    proc = subprocess.Popen(shlex.split(run) + ["--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_help_examples_run():
    """The examples written in backquotes in `fabrika plan --help` run as written (with the data size
    a plan needs)."""
    shown = run_cli("plan", "--help", env={"COLUMNS": "400"})
    examples = re.findall(r"`(--[^`]+)`", shown.stdout)
    assert "--arch mixtral --size 8x7b" in examples and "--tokens 20e9" in examples
    for example in examples:
        extra = [] if "--tokens" in example or example == "--size list" else ["--tokens", "20e9"]
        r = run_cli("plan", *example.split(), *extra)
        assert r.returncode == 0, f"fabrika plan {example}: {r.stderr}"
