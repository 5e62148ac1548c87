"""Crash points for the process-level crash tests.

fabrika promises that a stage killed at any moment (kill -9, an OOM killer, a preempted node) resumes
without losing or repeating work that cost hours or money. Only a real process that dies at a chosen
point proves it, so the tests start `fabrika` with one variable naming one crash point and its number,
e.g. `FABRIKA_FAULT=kill_at_step=3`, and the code at that point asks `fault(name)`. Without the
variable every point is inert.
"""

from __future__ import annotations

import os

from fabrika.errors import FabrikaError

VARIABLE = "FABRIKA_FAULT"

HOOKS = {  # name -> where the process kills itself once the number is reached
    "kill_at_step": "training, after optimizer step N",
    "exit_after_shards": "prepare, once N shards are written",
    "kill_after_rows": "collect, after N answers are journaled",
    "kill_after_batch_create": "the Batch API with N=1, after a batch is created and before its id is journaled",
}


def fault(name: str) -> int | None:
    """N when `FABRIKA_FAULT` is `name=N`; None when it is unset or names another crash point."""
    if name not in HOOKS:
        raise ValueError(f"no crash point {name!r}")
    raw = os.environ.get(VARIABLE, "")
    if not raw:
        return None
    hook, _, number = raw.partition("=")
    if hook not in HOOKS or not number.isdigit() or int(number) < 1:
        known = ", ".join(f"{h}=N ({where})" for h, where in HOOKS.items())
        raise FabrikaError(f"{VARIABLE}={raw!r} is not a crash point; expected one of: {known}")
    return int(number) if hook == name else None
