"""One run.log per run with every stage's output, and JSON-lines events for CI and clusters.

A stage prints through `print`, rich and the libraries it calls (transformers, TRL, datasets); while
it runs, its stdout and stderr are copied line by line into run.log with the stage's name in front
(progress-bar redraws are collapsed to their last state). With `--json-logs` the terminal gets only
the pipeline's events, one JSON object per line, and everything else goes to run.log alone.

On a terminal (without `--verbose`) the libraries' bars, log dicts and warnings go to run.log alone
too, and the terminal shows one live line per stage instead: the bar of whatever the stage is doing,
made by `progress`, with the stage's name in front and the few numbers that matter. A person reads
what fabrika says; whoever debugs reads run.log.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO

from rich.console import Console
from rich.progress import Progress, ProgressColumn, TextColumn


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        event.update(getattr(record, "fields", {}))
        return json.dumps(event, ensure_ascii=False, default=str)


def json_logs_to_stdout() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(lambda r: r.name.startswith("fabrika"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Tee(io.TextIOBase):
    """Writes through to the terminal (unless muted) and, a line at a time, to the run log."""

    def __init__(self, terminal: TextIO, log: TextIO, prefix: str, mute: bool, name: str) -> None:
        self.terminal, self.log, self.prefix, self.mute, self.name = terminal, log, prefix, mute, name
        self.pending = ""

    def write(self, text: str) -> int:
        if self.log.closed:
            # A library kept this stream after the stage ended (a logging handler made during the stage):
            # what it writes now goes where sys.stdout / sys.stderr go now, the next stage's run.log too.
            current = getattr(sys, self.name)
            return (self.terminal if current is self else current).write(text)
        if not self.mute:
            self.terminal.write(text)
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            line = _ANSI.sub("", line.rsplit("\r", 1)[-1])  # a progress bar's redraws: keep the last
            if line.strip():
                self.log.write(f"{self.prefix}{line}\n")
        return len(text)

    def flush(self) -> None:
        if not self.mute:
            self.terminal.flush()
        if not self.log.closed:
            self.log.flush()

    def isatty(self) -> bool:
        return False if self.mute else self.terminal.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.terminal, "encoding", "utf-8")

    def fileno(self) -> int:
        return self.terminal.fileno()


def quiet_libraries() -> None:
    """`--quiet` also silences the bars of the libraries underneath (Hub downloads, dataset maps,
    checkpoint loading, tqdm anywhere): through their environment switches, read when they are
    imported (stage modules import them later) and by the servers a stage starts, and through their
    own calls for those already imported."""
    import os

    for switch in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ[switch] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


_live: tuple[Console, str] | None = None  # (the terminal, the stage's name) while a stage shows its live line


def live() -> bool:
    """True while a stage's output goes to run.log alone and the terminal shows its live line."""
    return _live is not None


def progress(*columns: str | ProgressColumn, disable: bool = False) -> Progress:
    """A rich progress bar for a stage's work. During a live line it is that line: drawn on the real
    terminal, the stage's name in front, gone when done (the stage's one-line result follows it);
    otherwise a plain bar on the stage's output, as in `--verbose`, CI logs and run.log."""
    if _live is None:
        return Progress(*columns, disable=disable)
    terminal, stage = _live
    # not rich's default of redirecting stdout/stderr through the bar: those are the stage's output,
    # which belongs in run.log
    return Progress(TextColumn(f"[bold]{stage}[/]"), *columns, console=terminal, transient=True, disable=disable,
                    redirect_stdout=False, redirect_stderr=False)


def say(line: str) -> None:
    """A line of fabrika's own from inside a stage (rows skipped, a quota not met): a person must see
    it, so during a live line it is shown above it as well as kept in run.log."""
    print(line)  # run.log (and the terminal, when there is no live line)
    if _live is not None:
        _live[0].print(line, highlight=False, markup=False)


@contextmanager
def stage_output(run_log: Path, stage: str, mute: bool = False, live_line: bool = False) -> Iterator[None]:
    """Copy what the stage writes to stdout/stderr into run_log (prefixed with the stage name).
    `mute`: none of it reaches the terminal; `live_line`: muted too, and bars made by `progress` are
    drawn on the terminal as the stage's live line."""
    global _live
    with open(run_log, "a", encoding="utf-8") as log:
        out, err = sys.stdout, sys.stderr
        mute = mute or live_line
        sys.stdout = _Tee(out, log, f"[{stage}] ", mute, "stdout")
        sys.stderr = _Tee(err, log, f"[{stage}] ", mute, "stderr")
        _live = (Console(file=out), stage) if live_line else None
        try:
            yield
        finally:
            _live = None
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee) and tee.pending.strip():
                    log.write(f"{tee.prefix}{tee.pending.rsplit(chr(13), 1)[-1]}\n")
            sys.stdout, sys.stderr = out, err


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """A log line for run.log that is also a structured event for --json-logs."""
    logger.log(level, message, extra={"fields": fields})
