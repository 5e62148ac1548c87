"""Run the stages of one pipeline YAML in order, reusing every stage whose inputs did not change.

    fabrika run examples/tiny-cpu.yaml [--set a.b=c] [--only S] [--from S] [--force S] [--dry-run]
    fabrika status runs/tiny-cpu

A stage is reused when its directory holds a manifest with the same fingerprint (its config, its
inputs' fingerprints, the fabrika version). A stage whose directory exists without a manifest was
interrupted: it runs again in the same directory and resumes from its own checkpoint or journal. A
stage whose config changed starts from an empty directory, and so do the stages downstream of it,
because their inputs' fingerprints changed with it.
"""

from __future__ import annotations

import difflib
import glob
import importlib
import logging
import os
import re
import shutil
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Literal

from pydantic import Field
from rich.console import Console
from rich.table import Table

from fabrika import __version__, report
from fabrika.artifacts import (FAILED_FILE, FINGERPRINT_FILE, Artifact, RunContext, atomic_write_json, fingerprint,
                               path_fingerprint)
from fabrika.config import Config, apply_overrides, interpolate, load_yaml, validate
from fabrika.errors import FabrikaError
from fabrika.logs import event, quiet_libraries, stage_output
from fabrika.ranks import JOIN, NEXT, Ranks
from fabrika.relative_paths import rebase
from fabrika.runs import (PIPELINE_FILE, check_stage_name, damage_report, disk_state, format_numbers, key_metrics,
                          stage_path)

# Stage kinds and the modules that hold them: an explicit map, imported only when a stage runs.
STAGES: dict[str, str] = {
    "collect": "fabrika.data.collect",
    "tokenizer": "fabrika.models.tokenizer",
    "prepare": "fabrika.data.corpus",
    "pretrain": "fabrika.train.pretrain",
    "sft": "fabrika.train.sft",
    "prefer": "fabrika.train.prefer",
    "rl": "fabrika.train.rl",
    "export": "fabrika.export.stage",
    "evaluate": "fabrika.evaluate.stage",
}

# Kinds that every process of a multi-process launch runs together; rank 0 runs the others alone.
DISTRIBUTED = {"pretrain", "sft", "prefer", "rl"}

RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # the default run directory's name

log = logging.getLogger("fabrika")


class PipelineConfig(Config):
    name: str = Field(description="Name of the pipeline; the default run directory is runs/<name>.")
    run_dir: str | None = Field(None, description="Where every stage writes <run_dir>/<stage>/ (default runs/<name>).")
    seed: int = Field(0, description="Seed handed to every stage.")
    models: dict[str, str] = Field(default_factory=dict, description="Named model references (hf:, gguf:, openai:).")
    stages: dict[str, dict[str, Any]] = Field(description="Stages in run order; `kind` defaults to the key.")
    engine: Literal["auto", "vllm", "transformers"] | None = Field(
        None, description="Engine of local hf: models in every stage (FABRIKA_ENGINE; auto: vLLM on a CUDA GPU).")


def stage_module(kind: str) -> ModuleType:
    if kind not in STAGES:
        guess = difflib.get_close_matches(kind, STAGES, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise FabrikaError(f"unknown stage kind {kind!r}{hint} (known: {', '.join(STAGES)})")
    return importlib.import_module(STAGES[kind])


@dataclass
class Stage:
    name: str
    kind: str
    module: ModuleType
    cfg: Any
    deps: list[str]
    refs: list[str]
    fingerprint: str = ""


@dataclass
class Pipeline:
    cfg: PipelineConfig
    source: str
    run_dir: Path
    stages: list[Stage]  # in run (topological) order

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        guess = difflib.get_close_matches(name, [s.name for s in self.stages], n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise FabrikaError(f"{self.source}: no stage named {name!r}{hint} (stages: "
                           f"{', '.join(s.name for s in self.stages)})")

    def stage_dir(self, name: str) -> Path:
        return stage_path(self.run_dir, name, self.source)

    def context(self, stage: Stage, quiet: bool = False) -> RunContext:
        inputs = {d: Artifact.load(self.stage_dir(d)) for d in stage.deps}
        return RunContext(stage=stage.name, kind=stage.kind, stage_dir=self.stage_dir(stage.name),
                          seed=self.cfg.seed, inputs=inputs, models=self.cfg.models,
                          fingerprint=stage.fingerprint, quiet=quiet)


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Parse, validate and order a pipeline file; every stage config is checked before anything runs."""
    source = str(path)
    data = interpolate(apply_overrides(load_yaml(path), overrides))
    cfg = validate(PipelineConfig, data, source)
    if cfg.engine:  # read where local models are loaded (infer/vllm_engine.py), launched stages included
        os.environ["FABRIKA_ENGINE"] = cfg.engine
    if not cfg.stages:
        raise FabrikaError(f"{source}: stages: the pipeline has no stages")
    if cfg.run_dir is None and not RUN_NAME.fullmatch(cfg.name):
        raise FabrikaError(f"{source}: name: {cfg.name!r} would name the run directory runs/<name>, so it may hold only "
                           "letters, digits, '_', '-' and '.' (or set run_dir)")
    run_dir = Path(cfg.run_dir or f"runs/{cfg.name}")
    folder, names = Path(path).parent, set(cfg.stages) | set(cfg.models)
    cfg.models = {k: rebase(v, folder, names, source, f"models.{k}") for k, v in cfg.models.items()}

    parsed: dict[str, Stage] = {}
    for name, raw in cfg.stages.items():
        check_stage_name(name, source)
        if not isinstance(raw, dict):
            raise FabrikaError(f"{source}: stages.{name}: expected a mapping of settings, got {type(raw).__name__}")
        raw = dict(raw)
        kind = raw.pop("kind", name)
        raw = rebase(raw, folder, names, source, f"stages.{name}")
        try:
            module = stage_module(kind)
        except FabrikaError as e:
            raise FabrikaError(f"{source}: stages.{name}.kind: {e}") from None
        stage_cfg = validate(module.CONFIG, raw, source, prefix=f"stages.{name}")
        refs = [r for r in module.inputs(stage_cfg) if r]
        deps = [r for r in refs if r in cfg.stages]
        for r in refs:
            _check_reference(r, name, cfg, source)
        if name in deps:
            raise FabrikaError(f"{source}: stages.{name}: a stage cannot take its own output as input")
        parsed[name] = Stage(name, kind, module, stage_cfg, deps, refs)

    ordered = _topological(parsed, source)
    for stage in ordered:
        stage.fingerprint = stage_fingerprint(stage, {r: parsed[r].fingerprint if r in parsed
                                                      else _external_fingerprint(cfg.models.get(r, r))
                                                      for r in stage.refs}, cfg.seed)
    return Pipeline(cfg=cfg, source=source, run_dir=run_dir, stages=ordered)


def stage_fingerprint(stage: Stage, inputs: dict[str, Any], seed: int) -> str:
    """What a stage's result depends on: its config, its inputs' fingerprints, the seed and fabrika's
    version. The same recipe in a pipeline and for a single-stage command, so both reuse, resume and
    restart a stage for the same reasons."""
    return fingerprint({"kind": stage.kind, "config": stage.cfg.model_dump(mode="json"), "inputs": inputs,
                        "seed": seed, "fabrika": __version__})


def _check_reference(ref: str, stage: str, cfg: PipelineConfig, source: str) -> None:
    """A bare word that is no stage, no named model and no file, but nearly the name of one, is a typo
    (Hub ids have a slash, model references a colon): say so before anything runs."""
    if ref in cfg.stages or ref in cfg.models or any(ch in ref for ch in "/:.*?[") or Path(ref).exists():
        return
    guess = difflib.get_close_matches(ref, list(cfg.stages) + list(cfg.models), n=1, cutoff=0.75)
    if guess:
        raise FabrikaError(f"{source}: stages.{stage}: {ref!r} is not a stage of this pipeline, a named model or "
                           f"an existing path; did you mean {guess[0]!r}? (stages: {', '.join(cfg.stages)})")


def _external_fingerprint(ref: str) -> Any:
    """A path (or glob) is identified by its files, also behind hf: or gguf: (a model retrained at the
    same path must not reuse results of the old one); a Hub id or an API model by its name."""
    if any(ch in ref for ch in "*?["):
        return [path_fingerprint(m) for m in sorted(glob.glob(ref, recursive=True))]
    scheme, sep, rest = ref.partition(":")
    if sep and scheme in ("hf", "gguf") and Path(rest).exists():
        return [scheme, path_fingerprint(rest)]
    return path_fingerprint(ref) if Path(ref).exists() else ref


def _topological(stages: dict[str, Stage], source: str) -> list[Stage]:
    """YAML order, except that a stage always comes after the stages it reads; cycles are errors."""
    done: list[Stage] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join(chain[chain.index(name):] + [name])
            raise FabrikaError(f"{source}: stages form a cycle: {cycle}")
        state[name] = "visiting"
        for dep in stages[name].deps:
            visit(dep, chain + [name])
        state[name] = "done"
        done.append(stages[name])

    for name in stages:
        visit(name, [])
    return done


def stage_state(pipe: Pipeline, stage: Stage) -> str:
    return disk_state(pipe.stage_dir(stage.name), stage.fingerprint)[0]


def _select(pipe: Pipeline, only: list[str] | None, start: str | None, force: list[str] | None) -> tuple[set[str], set[str]]:
    names = [s.name for s in pipe.stages]
    for n in (only or []) + (force or []) + ([start] if start else []):
        pipe.stage(n)  # validates the name
    selected = set(only) if only else set(names)
    forced = set(force or [])
    if start:
        after = names[names.index(start):]
        selected &= set(after)
        forced |= set(after)
    return selected, forced


def run_pipeline(pipe: Pipeline, only: list[str] | None = None, start: str | None = None,
                 force: list[str] | None = None, dry_run: bool = False, quiet: bool = False,
                 console: Console | None = None, json_logs: bool = False, verbose: bool = False) -> dict[str, Artifact]:
    """Run the selected stages in order. With `json_logs` the terminal gets only JSON events (see
    fabrika.logs) and the stages' own output goes to run.log alone. On a terminal each stage shows one
    live line and its libraries' output goes to run.log alone, unless `verbose`."""
    quiet = quiet or json_logs
    console = Console(quiet=True) if json_logs else (console or Console(quiet=quiet))
    live_line = console.is_terminal and not (quiet or verbose)
    if quiet:
        quiet_libraries()
    selected, forced = _select(pipe, only, start, force)
    if dry_run:
        print_plan(pipe, selected, forced, console)
        return {}

    pipe.run_dir.mkdir(parents=True, exist_ok=True)
    ranks = Ranks(pipe.run_dir)
    if not ranks.leader:
        for stage in pipe.stages:
            if ranks.hear(stage.name) == JOIN:
                stage.module.run(stage.cfg, pipe.context(stage, quiet=True))
        return {}
    atomic_write_json(pipe.run_dir / PIPELINE_FILE, {
        "name": pipe.cfg.name, "source": pipe.source, "seed": pipe.cfg.seed,
        "stages": [{"name": s.name, "kind": s.kind, "fingerprint": s.fingerprint, "deps": s.deps} for s in pipe.stages],
    })
    handler = _attach_run_log(pipe.run_dir)
    results: dict[str, Artifact] = {}
    error: BaseException | None = None
    t0 = time.time()
    try:
        for stage in pipe.stages:
            d = pipe.stage_dir(stage.name)
            state = stage_state(pipe, stage)
            if stage.name not in selected:
                if state == "done":
                    results[stage.name] = Artifact.load(d)
                ranks.tell(stage.name, NEXT)
                continue
            if state == "done" and stage.name not in forced:
                results[stage.name] = _cached(stage, d, console)
                ranks.tell(stage.name, NEXT)
                continue
            if state == "damaged" and stage.name not in forced:
                raise FabrikaError(damage_report(d, stage.name))
            missing = [dep for dep in stage.deps if stage_state(pipe, pipe.stage(dep)) != "done"]
            if missing:
                raise FabrikaError(f"stage {stage.name!r} needs {', '.join(missing)} to be done first "
                                   f"(run without --only, or with --only {' '.join(missing)})")
            results[stage.name] = run_stage(stage, d, lambda: pipe.context(stage, quiet=quiet),
                                            restart=state == "stale" or stage.name in forced, console=console,
                                            ranks=ranks, run_log=pipe.run_dir / "run.log",
                                            mute=json_logs or quiet, live_line=live_line)
    except BaseException as e:
        error = e
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        _write_report(pipe.run_dir, console)
        if error is not None:  # last: the launcher stops rank 0 as soon as another rank exits
            ranks.abort(str(error) or type(error).__name__)
    console.print(f"pipeline {pipe.cfg.name}: finished in {time.time() - t0:.1f}s")
    event(log, f"pipeline {pipe.cfg.name}: finished", event="pipeline_done", pipeline=pipe.cfg.name,
          seconds=round(time.time() - t0, 3), run_dir=str(pipe.run_dir))
    return results


def _write_report(run_dir: Path, console: Console) -> None:
    """The report is written after every run, finished or not; a report that cannot be made is worth
    a warning, never the run's failure."""
    try:
        page, _ = report.build(run_dir)
    except Exception as e:  # noqa: BLE001
        console.print(f"[yellow]report not written: {e}[/]")
        log.warning("report not written: %s", e)
        return
    console.print(f"report: {page}")
    event(log, f"report: {page}", event="report", path=str(page))


def _cached(stage: Stage, d: Path, console: Console) -> Artifact:
    console.print(f"[green]✓[/] {stage.name}: cached (fingerprint {stage.fingerprint})")
    event(log, f"{stage.name}: cached", event="stage_cached", stage=stage.name, fingerprint=stage.fingerprint)
    return Artifact.load(d)


def run_stage(stage: Stage, d: Path, context: Callable[[], RunContext], restart: bool, console: Console,
              ranks: Ranks, run_log: Path | None = None, mute: bool = False, live_line: bool = False) -> Artifact:
    """Run `stage` in its directory `d`: from an empty one when `restart` or when an earlier attempt had
    another fingerprint, else resumed from whatever the attempt left. `context` is called once the
    directory is ready. With `run_log` the stage's stdout and stderr are copied there (`mute`: there
    alone)."""
    fp_file = d / FINGERPRINT_FILE
    previous = fp_file.read_text().strip() if fp_file.exists() else None
    if restart or (previous is not None and previous != stage.fingerprint):
        shutil.rmtree(d, ignore_errors=True)
        resumed = False
    else:
        resumed = d.exists()
    d.mkdir(parents=True, exist_ok=True)
    (d / FAILED_FILE).unlink(missing_ok=True)
    fp_file.write_text(stage.fingerprint + "\n")
    distributed = stage.kind in DISTRIBUTED
    if distributed:
        ranks.tell(stage.name, JOIN)
    verb = "resuming" if resumed else "running"
    console.rule(f"[bold]{stage.name}[/] ({stage.kind}) — {verb}")
    event(log, f"{stage.name}: {verb} ({stage.kind})", event="stage_started", stage=stage.name, kind=stage.kind,
          resumed=resumed)
    ctx = context()
    output = stage_output(run_log, stage.name, mute=mute, live_line=live_line) if run_log else nullcontext()
    try:
        with output:
            artifact = stage.module.run(stage.cfg, ctx)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            (d / FAILED_FILE).write_text(f"{type(e).__name__}: {e}\n")
            if run_log:
                with open(run_log, "a", encoding="utf-8") as f:  # for whoever debugs it
                    f.write(traceback.format_exc())
            event(log, f"{stage.name} failed: {e}", logging.ERROR, event="stage_failed", stage=stage.name,
                  error=str(e))
        raise
    if not distributed:
        ranks.tell(stage.name, NEXT)
    took = time.time() - ctx.started
    numbers = format_numbers(key_metrics(artifact.metrics or {}))
    console.print(f"[green]✓[/] {stage.name}: done in {took:.1f}s" + (f" — {numbers}" if numbers else ""))
    event(log, f"{stage.name}: done in {took:.1f}s, metrics {artifact.metrics}", event="stage_done",
          stage=stage.name, seconds=round(took, 3), metrics=artifact.metrics)
    return artifact


def run_single(kind: str, cfg: Any, out: Path, seed: int = 0, quiet: bool = False,
               console: Console | None = None) -> Artifact:
    """One stage outside a pipeline (`fabrika sft ... --out D`), run by the pipeline's own rules: reused
    when D holds a finished result of the same fingerprint, resumed when D holds an unfinished attempt
    of it, restarted from an empty D when the config, the seed or an input file changed. The stage is
    named after its kind, as its manifest says. Under a launcher, rank 0 prepares D and the other ranks
    join training stages only, as in a pipeline whose run directory is D's parent."""
    module = stage_module(kind)
    stage = Stage(kind, kind, module, cfg, deps=[], refs=[r for r in module.inputs(cfg) if r])
    stage.fingerprint = stage_fingerprint(stage, {r: _external_fingerprint(r) for r in stage.refs}, seed)
    console = console or Console(quiet=quiet)

    def context() -> RunContext:
        return RunContext(stage=kind, kind=kind, stage_dir=out, seed=seed, fingerprint=stage.fingerprint, quiet=quiet)

    ranks = Ranks(out.parent)
    if not ranks.leader:
        return module.run(cfg, context()) if ranks.hear(kind) == JOIN else Artifact.load(out)
    try:
        state = disk_state(out, stage.fingerprint)[0]
        if state == "done":
            ranks.tell(kind, NEXT)
            return _cached(stage, out, console)
        if state == "damaged":
            raise FabrikaError(damage_report(out, kind, remedy=f"Delete {out} (or choose another --out) to run it again"))
        return run_stage(stage, out, context, restart=state == "stale", console=console, ranks=ranks)
    except BaseException as e:
        ranks.abort(str(e) or type(e).__name__)
        raise


def _attach_run_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def print_plan(pipe: Pipeline, selected: set[str], forced: set[str], console: Console) -> None:
    """What a run would do, validated but without running: stage, state, inputs and estimates."""
    from fabrika import dry_run

    table = Table(title=f"pipeline {pipe.cfg.name} (dry run) → {pipe.run_dir}; estimates for {dry_run.gpus()} GPU(s) "
                        "(WORLD_SIZE or --gpus)")
    for col in ("stage", "kind", "inputs", "action"):
        table.add_column(col)
    table.add_column("estimate", overflow="fold", ratio=1)
    estimates: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for stage in pipe.stages:
        state = stage_state(pipe, stage)
        if stage.name not in selected:
            action = "skipped (not selected)"
        elif state == "done" and stage.name not in forced:
            action = "cached"
        elif state == "interrupted":
            action = "resume"
        elif state == "damaged" and stage.name not in forced:
            action = "stop: outputs changed (--force rebuilds)"
        else:
            action = "run"
        estimate = ""
        if action in ("run", "resume") and hasattr(stage.module, "estimate"):
            ctx = RunContext(stage=stage.name, kind=stage.kind, stage_dir=pipe.stage_dir(stage.name),
                             seed=pipe.cfg.seed, models=pipe.cfg.models, quiet=True, estimates=estimates)
            estimates[stage.name] = stage.module.estimate(stage.cfg, ctx)
            if stage.kind == "pretrain" and "train_tokens" in estimates[stage.name]:
                data_dir = pipe.stage_dir(stage.cfg.data) if stage.cfg.data in stage.deps else None
                warning = dry_run.repeated_corpus(estimates, stage.cfg.data, data_dir,
                                                  estimates[stage.name]["train_tokens"])
                warnings += [f"{stage.name}: {warning}"] if warning else []
            estimate = format_numbers({k: v for k, v in estimates[stage.name].items() if not k.startswith("_")},
                                        sep="\n")
        table.add_row(stage.name, stage.kind, ", ".join(stage.refs), action, estimate)
    console.print(table)
    for warning in warnings:
        console.print(f"[yellow]warning[/]: {warning}")
    console.print(dry_run.totals([s for s in pipe.stages if s.name in estimates], estimates))


