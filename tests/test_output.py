"""What a person sees: on a terminal one live line per stage and fabrika's own lines, the libraries'
bars, log dicts and warnings in run.log (on screen too with --verbose); with -q no bar anywhere.

The terminal is a real pseudo-terminal, so rich and tqdm decide as they would for a person."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios

import pytest
import yaml

from helpers import FABRIKA, REPO, run_cli, scripted_server, write_jsonl
from test_pipeline import write_pipeline

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NOISE = ("'loss':", "FutureWarning", "it/s]", "s/it]")


def run_on_terminal(*args: str, timeout: int = 300) -> tuple[int, str]:
    """`fabrika ARGS` with a 160-column pseudo-terminal as stdin, stdout and stderr; what it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TERM", "COLUMNS")}
    proc = subprocess.Popen([FABRIKA, *args], stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                            env={**env, "TERM": "xterm-256color"})
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the last holder of the terminal closed it
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(timeout=timeout), ANSI.sub("", shown.decode("utf-8", "replace"))


@pytest.mark.slow  # two pipeline runs, about a minute each on two busy cores
def test_terminal_shows_fabrika_lines_and_run_log_keeps_the_rest(tmp_path, small_corpus):
    path = write_pipeline(tmp_path, small_corpus)
    rc, shown = run_on_terminal("run", str(path))
    assert rc == 0, shown[-3000:]
    for line in ("✓ tok: done", "✓ prepare: done", "✓ pretrain: done", "train_loss=", "report:"):
        assert line in shown, shown[-3000:]
    assert "steps, left" in shown  # the training stage's live line: step/total, time left, loss, tokens/s
    assert not [n for n in NOISE if n in shown], shown[-3000:]
    log = (tmp_path / "runs" / "t" / "run.log").read_text(encoding="utf-8")
    assert "[pretrain] {'loss':" in log  # the libraries' own output, as before

    rc, shown = run_on_terminal("run", str(path), "--force", "pretrain", "--verbose")
    assert rc == 0, shown[-3000:]
    assert "'loss':" in shown and "✓ pretrain: done" in shown


def test_quiet_means_no_bar_anywhere(tmp_path, small_corpus, chat_model):
    path = write_pipeline(tmp_path, small_corpus)
    r = run_cli("run", str(path), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    bars = ("it/s", "s/it", "%|", "MB read")  # tqdm's bars, and the prepare stage's own
    assert not [b for b in bars if b in r.stdout + r.stderr], (r.stdout + r.stderr)[-3000:]

    # a single stage through datasets' maps, TRL and the Trainer: still no bar
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"Вопрос {i} “в кавычках”?"},
                      {"role": "assistant", "content": f"Answer {i}. 答案。"}]} for i in range(8)])
    r = run_cli("sft", "-m", str(chat_model), "-d", str(data), "--max-steps", "1", "-o", str(tmp_path / "sft"),
                "--set", "train.batch_size=2", "--set", "train.eval_steps=null", "--set", "eval_fraction=0", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [b for b in bars if b in r.stdout + r.stderr], (r.stdout + r.stderr)[-3000:]
    # --max-steps and the --set train settings change only themselves: sft's own defaults stay
    train = json.loads((tmp_path / "sft" / "manifest.json").read_text())["config"]["train"]
    assert (train["max_steps"], train["batch_size"], train["lr"], train["grad_accum"]) == (1, 2, 2e-4, 4)


def test_what_fabrika_says_inside_a_stage_stays_on_screen(tmp_path):
    """A stage's own notes (rows skipped, why it stopped) are shown above the live line, not only in run.log."""
    rows = [{"messages": [{"role": "user", "content": f"Сколько будет {i}+{i}? “быстро”"}]} for i in range(6)]
    rows.append({"messages": [{"role": "alien", "content": "??"}]})
    source = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with scripted_server(lambda messages: "Ответ: четыре.") as url:
        spec = {"name": "c", "run_dir": str(tmp_path / "run"),
                "stages": {"collect": {"source": str(source), "teacher": f"openai:m@{url}", "filters": ["empty"]}}}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
        rc, shown = run_on_terminal("run", str(path))
    assert rc == 0, shown[-3000:]
    assert "skipped 1 malformed rows" in shown and "✓ collect: done" in shown and "kept=" in shown, shown[-3000:]
