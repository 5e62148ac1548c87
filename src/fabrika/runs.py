"""Reading a run directory as `fabrika run` left it: which stages are done, damaged, stale, failed,
interrupted or pending, and the status table `fabrika status` prints.

Everything here reads what is on disk (pipeline.json, each stage's manifest and marker files), so the
pipeline that writes a run, the report and the status command all agree on what a stage's state is,
without the report having to import the runner.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.table import Table

from fabrika.artifacts import FAILED_FILE, damaged_outputs, read_json, read_manifest
from fabrika.errors import FabrikaError

PIPELINE_FILE = "pipeline.json"  # the resolved pipeline, so `status` knows the stages and their order
STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a stage's name is its directory's name: no "/", no ".."


def check_stage_name(name: Any, source: str) -> str:
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
        raise FabrikaError(f"{source}: stages: {name!r} is not a usable stage name: it names the stage's directory, "
                           "so it may hold only letters, digits, '_' and '-'")
    return name


def stage_path(run_dir: Path, name: str, source: str) -> Path:
    """<run_dir>/<name>, refused when it resolves anywhere else (a symlink out of the run directory):
    `--force` deletes this directory, and must never delete what the run does not own."""
    d = run_dir / check_stage_name(name, source)
    if d.resolve().parent != run_dir.resolve():
        raise FabrikaError(f"{d}: the directory of stage {name!r} resolves to {d.resolve()}, outside the run directory "
                           f"{run_dir}; remove that link")
    return d


def disk_state(stage_dir: Path, fingerprint: str) -> tuple[str, dict[str, Any] | None]:
    """done, damaged (done, but an output changed since), stale (finished with another config), failed,
    interrupted or pending, and the manifest."""
    manifest = read_manifest(stage_dir)
    if manifest is not None:
        if manifest.get("fingerprint") != fingerprint:
            return "stale", manifest
        return ("damaged" if damaged_outputs(stage_dir, manifest) else "done"), manifest
    if (stage_dir / FAILED_FILE).exists():
        return "failed", None
    return ("interrupted" if stage_dir.exists() else "pending"), None


def damage_report(stage_dir: Path, name: str, remedy: str = "") -> str:
    """Why a finished stage is not reused, and `remedy` (default: `--force` of `fabrika run`). A damaged
    stage is never rebuilt on its own: it may have cost money or days, and what changed its files (a
    disk, a person) is worth a look first."""
    problems = damaged_outputs(stage_dir, read_manifest(stage_dir) or {})
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return (f"stage {name!r} finished, but its outputs in {stage_dir} changed since: {'; '.join(problems[:3])}{more}. "
            + (remedy or f"Run again with --force {name} to rebuild it"))


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run directory as `fabrika run` left it: the pipeline spec, and per stage its spec entry with
    `dir`, `state` and `manifest` ({} until done)."""
    run_dir = Path(run_dir)
    spec_file = run_dir / PIPELINE_FILE
    if not spec_file.exists():
        raise FabrikaError(f"{run_dir}: not a run directory ({PIPELINE_FILE} missing); run `fabrika run` first")
    spec = read_json(spec_file)
    stages = []
    for s in spec["stages"]:
        d = stage_path(run_dir, s["name"], str(spec_file))
        state, manifest = disk_state(d, s["fingerprint"])
        stages.append({**s, "dir": d, "state": state, "manifest": manifest or {}})
    return spec, stages


def format_numbers(numbers: dict[str, Any], sep: str = ", ") -> str:
    """Numbers as `k=v`, floats to three digits and large counts with thousands separators."""
    parts = []
    for k, v in numbers.items():
        if isinstance(v, float):
            v = f"{v:.3g}"
        elif isinstance(v, int) and v >= 10_000:
            v = f"{v:,}"
        parts.append(f"{k}={v}")
    return sep.join(parts)


KEY_METRICS = ("eval_loss", "eval_ppl", "train_loss", "reward_last", "tokens_per_s", "mfu", "kept", "cost_usd",
               "mt_bench", "ppl", "train_tokens", "documents", "vocab_size", "f16_kl", "q4_k_m_kl")


def key_metrics(metrics: dict[str, Any], limit: int = 4) -> dict[str, Any]:
    """The few numbers worth a glance in a status table, most telling first."""
    picked = {k: metrics[k] for k in KEY_METRICS if isinstance(metrics.get(k), (int, float, str))}
    return dict(list(picked.items())[:limit])


def status_table(run_dir: str | Path) -> Table:
    """The state of every stage of a run directory, from what is on disk."""
    from fabrika.infer.batch import in_flight_line

    spec, stages = read_run(run_dir)
    table = Table(title=f"run {spec['name']} ({run_dir})")
    for col in ("stage", "kind", "state", "duration", "metrics"):
        table.add_column(col)
    for s in stages:
        state, m = s["state"], s["manifest"]
        duration, metrics = "", ""
        if m:
            duration = f"{m.get('duration_s', 0):.1f}s"
            metrics = format_numbers(key_metrics(m.get("metrics", {})))
        if state == "damaged":
            metrics = "; ".join(damaged_outputs(s["dir"], m))[:80]
        elif state == "failed":
            metrics = (s["dir"] / FAILED_FILE).read_text().strip()[:80]
        if flying := in_flight_line(s["dir"]):  # mode: batch
            metrics = f"{metrics} {flying}".strip()
        colour = {"done": "green", "failed": "red", "damaged": "red", "interrupted": "yellow",
                  "stale": "yellow"}.get(state, "dim")
        table.add_row(s["name"], s["kind"], f"[{colour}]{state}[/]", duration, metrics)
    return table

