"""docs/configuration.md is the config models written out, and `--help` reads the same descriptions."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import REPO, run_cli

from fabrika.docs import field_help, render
from fabrika.pipeline import STAGES, stage_module


def test_reference_is_current():
    """Fails when a field, default or description changed without `python -m fabrika.docs`."""
    check = subprocess.run([sys.executable, "-m", "fabrika.docs", "--check"], capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert text == render()
    for kind in STAGES:
        assert f"## `{kind}`" in text
    assert "| `train.max_steps` |" in text and "| `client.concurrency` |" in text  # nested models too


def test_every_key_is_described():
    rows = [line for line in render().splitlines() if line.startswith("| `")]
    cells = [re.split(r"(?<!\\)\|", row) for row in rows]  # | key | type | default | meaning |
    blank = [c[1].strip() for c in cells if not c[4].strip()]
    assert rows and not blank, f"keys without a description: {blank}"


@pytest.mark.parametrize("command, option, kind, key", [
    (["sft"], "--method", "sft", "method"),
    (["collect"], "--concurrency", "collect", "client.concurrency"),
    (["eval", "mtbench"], "--judge", "evaluate", "mtbench.judge"),
    (["pretrain"], "--max-steps", "pretrain", "train.max_steps"),
    (["rl"], "--judge", "rl", "rewards.judge.model"),
])
def test_cli_help_comes_from_the_field(command, option, kind, key):
    described = field_help(stage_module(kind).CONFIG, key)
    shown = run_cli(*command, "--help", env={"COLUMNS": "300"})
    assert shown.returncode == 0, shown.stderr
    line = next(ln for ln in shown.stdout.splitlines() if option in ln)
    assert described in line
