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


def test_every_flag_a_help_text_names_exists():
    """A help text that says `--bytes-per-token` promises the command has that flag."""
    import re

    import click
    import typer

    from fabrika import cli

    cli._register_phase_commands()
    missing = []

    def walk(cmd: click.Command, path: str) -> None:
        flags = {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", []))} | {"--help"}
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        texts = [re.sub(r"`(?!fabrika|--)[^`]*`", "", t) for t in texts]  # another program's command line
        missing.extend(f"{path}: {f}" for t in texts for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", t)
                       if f not in flags)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(cli.app), "fabrika")
    assert not missing, missing
