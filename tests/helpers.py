"""Helpers shared by tests (imported as `helpers`; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `fabrika ARGS` in a fresh process, as a user would."""
    cmd = (launcher or [sys.executable, "-m", "fabrika.cli"]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env={**os.environ, **(env or {})})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
