"""One run.log per run with every stage's output, and JSON-lines events for CI and clusters.

A stage prints through `print`, rich and the libraries it calls (transformers, TRL, datasets); while
it runs, its stdout and stderr are copied line by line into run.log with the stage's name in front
(progress-bar redraws are collapsed to their last state). With `--json-logs` the terminal gets only
the pipeline's events, one JSON object per line, and everything else goes to run.log alone.
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

    def __init__(self, terminal: TextIO, log: TextIO, prefix: str, mute: bool) -> None:
        self.terminal, self.log, self.prefix, self.mute = terminal, log, prefix, mute
        self.pending = ""

    def write(self, text: str) -> int:
        if not self.mute:
            self.terminal.write(text)
        if self.log.closed:  # a library kept this stream after the stage ended: terminal only
            return len(text)
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


@contextmanager
def stage_output(run_log: Path, stage: str, mute: bool = False) -> Iterator[None]:
    """Copy what the stage writes to stdout/stderr into run_log (prefixed with the stage name)."""
    with open(run_log, "a", encoding="utf-8") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout = _Tee(out, log, f"[{stage}] ", mute)
        sys.stderr = _Tee(err, log, f"[{stage}] ", mute)
        try:
            yield
        finally:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee) and tee.pending.strip():
                    log.write(f"{tee.prefix}{tee.pending.rsplit(chr(13), 1)[-1]}\n")
            sys.stdout, sys.stderr = out, err


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """A log line for run.log that is also a structured event for --json-logs."""
    logger.log(level, message, extra={"fields": fields})
