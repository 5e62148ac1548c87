"""The first commands a new user types: `fabrika --version` and the help screens."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

FABRIKA = str(Path(sys.executable).parent / "fabrika")


def fabrika(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FABRIKA, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120"})


def test_version():
    r = fabrika("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fabrika {version('fabrika')}"


def test_flags_are_shown_as_flags():
    r = fabrika("run", "--help")
    assert r.returncode == 0
    dry_run = next(line for line in r.stdout.splitlines() if "--dry-run" in line)
    assert "<bool>" not in r.stdout and "<" not in dry_run
    assert "<path>" in r.stdout  # options that take a value still say what they take
