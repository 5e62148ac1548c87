"""The `fabrika` command: one subcommand per stage, plus run, status and plan.

Thin on purpose: parse flags, load the config, call the stage's `run`, print a summary. Stage modules
are imported only when their command runs, so `fabrika --help` stays instant.
"""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fabrika.errors import FabrikaError
from fabrika.ranks import is_main_process, leave_process_group

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fabrika: an LLM factory. Distil, pretrain, fine-tune, evaluate and export from one config.")
console = Console()
if not console.is_terminal and console.width < 120:  # logs and CI: tables of numbers need room
    console = Console(width=120)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file with the stage's settings.")
SetOpt = typer.Option(None, "--set", help="Override a setting, any key of docs/configuration.md: --set KEY=VALUE, "
                      "nested keys dotted (train.lr=1e-4 in a training stage) (repeatable).")
OutOpt = typer.Option(..., "--out", "-o", help="Output directory of the stage: kept when it holds this command's "
                      "finished result, resumed when unfinished, started afresh when settings or input files changed.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
_FROM_CONFIG = re.compile(r"^@(\w+):([\w.]+)$")


def described(kind: str, key: str) -> str:
    """Help text of an option that sets the config key `key` of stage `kind`: the field's own
    description, as in docs/configuration.md. Read when help is shown, so that `fabrika --help` does
    not import every stage module."""
    return f"@{kind}:{key}"


def _help_from_config() -> None:
    from typer.core import TyperArgument, TyperOption

    def get(self) -> str | None:
        m = _FROM_CONFIG.match(self._help or "")
        if not m:
            return self._help
        from fabrika.docs import field_help
        from fabrika.pipeline import stage_module

        return field_help(stage_module(m.group(1)).CONFIG, m.group(2))

    def put(self, value: str | None) -> None:
        self._help = value

    for cls in (TyperArgument, TyperOption):
        cls.help = property(get, put)


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        print(f"fabrika {version('fabrika')}")
        raise typer.Exit()


@app.callback()
def _options(_: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                    help="Print the installed version and exit.")) -> None:
    pass


def _flags_without_type() -> None:
    """typer 0.29 prints a type after every option, flags too (`--quiet <bool>`), which reads as if a
    flag took a value; a flag's help shows its name alone, as click's plain help does."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics ({"languages": {"ru": 10}}) as one row each: languages.ru."""
    rows: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            rows.update(_flat(v, f"{prefix}{k}."))
        else:
            rows[f"{prefix}{k}"] = v
    return rows


def run_stage_command(kind: str, config: Optional[Path], flags: dict[str, Any], overrides: Optional[list[str]],
                      out: Path, quiet: bool = False, seed: int = 0, metrics_table: bool = True):
    """Run one stage outside a pipeline, by the pipeline's own rules (pipeline.run_single): the same
    `run(cfg, ctx)`, reused, resumed or restarted as a pipeline's stage would be."""
    from fabrika.config import load
    from fabrika.pipeline import run_single, stage_module

    if quiet:
        from fabrika.logs import quiet_libraries

        quiet_libraries()
    cfg = load(stage_module(kind).CONFIG, config, flags=flags, overrides=overrides)
    artifact = run_single(kind, cfg, out, seed=seed, quiet=quiet, console=console)
    if artifact.metrics and metrics_table and not quiet:
        from rich.table import Table

        table = Table(title=f"{kind}: {artifact.path}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in _flat(artifact.metrics).items():
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
        console.print(table)
    return artifact


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML."),
    set_: Optional[list[str]] = SetOpt,
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only this stage (repeatable)."),
    start: Optional[str] = typer.Option(None, "--from", help="Re-run this stage and everything after it."),
    force: Optional[list[str]] = typer.Option(None, "--force", help="Re-run this stage even if cached (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan without running."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="GPUs the --dry-run estimates assume "
                                       "(default: the launcher's WORLD_SIZE, else 1)."),
    quiet: bool = QuietOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show every library's output (bars, logs, "
                                 "warnings) on screen too; without it a terminal shows one line per stage "
                                 "and the rest goes to run.log."),
    json_logs: bool = typer.Option(False, "--json-logs", help="Only JSON events on stdout (CI, clusters); "
                                   "stage output goes to run.log."),
) -> None:
    """Run a pipeline: every stage in order, reusing finished ones whose inputs did not change."""
    from fabrika.pipeline import load_pipeline, run_pipeline
    from fabrika.runs import status_table

    if gpus is not None:
        if not dry_run:
            raise FabrikaError("--gpus sets the world size of --dry-run estimates; a run takes it from its launcher "
                               "(torchrun / accelerate launch --num_processes N)")
        import os

        os.environ["WORLD_SIZE"] = str(gpus)
    pipe = load_pipeline(pipeline, set_)
    if json_logs:
        from fabrika.logs import json_logs_to_stdout

        json_logs_to_stdout()
    run_pipeline(pipe, only=only, start=start, force=force, dry_run=dry_run, quiet=quiet, console=console,
                 json_logs=json_logs, verbose=verbose)
    if not dry_run and not json_logs and is_main_process():
        console.print(status_table(pipe.run_dir))


@app.command()
def status(run_dir: Path = typer.Argument(..., help="A run directory (runs/<name>).")) -> None:
    """Show each stage of a run: done / interrupted / failed / pending, duration, key metrics."""
    from fabrika.runs import status_table

    console.print(status_table(run_dir))


@app.command()
def batches(
    run_dir: Path = typer.Argument(..., help="A run or stage directory."),
    cancel: bool = typer.Option(False, "--cancel", help="Cancel every batch still in flight."),
) -> None:
    """Show the Batch API batches of a run (mode: batch), each with its state and counts; --cancel stops them."""
    from fabrika.infer import batch

    if not run_dir.is_dir():
        raise FabrikaError(f"{run_dir}: no such directory (a run or stage directory)")
    if cancel:
        console.print(f"cancelled: {', '.join(batch.cancel(run_dir)) or 'nothing in flight'}")
    found = batch.submissions(run_dir)
    if not found:
        console.print(f"no batches under {run_dir}")
    for path, s in found:
        c = s.counts
        console.print(f"{s.batch_id or '(unconfirmed)'}  {s.status:<11} {c.get('completed', 0)}/"
                      f"{c.get('total', len(s.custom_ids))} done, {c.get('failed', 0)} failed  {path.parent}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory (runs/<name>).")) -> None:
    """Write the run's report: report.html (self-contained, with plots) and report.md."""
    from fabrika.report import build

    page, summary = build(run_dir)
    console.print(f"report: {page}\nsummary: {summary}")


@app.command()
def collect(
    source: Optional[str] = typer.Option(None, "--source", help=described("collect", "source")),
    quota: Optional[str] = typer.Option(None, "--quota", help=described("collect", "quota")),
    teacher: Optional[str] = typer.Option(None, "--teacher", help=described("collect", "teacher")),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help=described("collect", "client.concurrency")),
    out: Path = OutOpt, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt,
) -> None:
    """Build an instruction (or preference) dataset by distillation from a teacher; resumable."""
    flags = {"source": source, "quota": quota, "teacher": teacher,
             "client": {"concurrency": concurrency} if concurrency else None}
    run_stage_command("collect", config, flags, set_, out, quiet)


@app.command()
def tokenizer(
    paths: Optional[list[str]] = typer.Argument(None, help=described("tokenizer", "paths")),
    dataset: Optional[str] = typer.Option(None, help=described("tokenizer", "dataset")),
    vocab_size: Optional[int] = typer.Option(None, help=described("tokenizer", "vocab_size")),
    out: Path = OutOpt, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt,
) -> None:
    """Train a byte-level BPE tokenizer with a chat template."""
    run_stage_command("tokenizer", config, {"paths": paths or None, "dataset": dataset, "vocab_size": vocab_size},
                      set_, out, quiet)


@app.command()
def prepare(
    paths: Optional[list[str]] = typer.Argument(None, help=described("prepare", "paths")),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-t", help=described("prepare", "tokenizer")),
    dataset: Optional[str] = typer.Option(None, help=described("prepare", "dataset")),
    shard_mb: Optional[float] = typer.Option(None, help=described("prepare", "shard_mb")),
    out: Path = OutOpt, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt,
) -> None:
    """Turn raw text into token shards for pretraining (streamed, resumable)."""
    run_stage_command("prepare", config, {"paths": paths or None, "tokenizer": tokenizer, "dataset": dataset,
                                          "shard_mb": shard_mb}, set_, out, quiet)


@app.command()
def pretrain(
    data: Optional[str] = typer.Option(None, "--data", "-d", help=described("pretrain", "data")),
    arch: Optional[str] = typer.Option(None, help=described("pretrain", "model.arch")),
    size: Optional[str] = typer.Option(None, help=described("pretrain", "model.size")),
    seq_len: Optional[int] = typer.Option(None, help=described("pretrain", "seq_len")),
    max_steps: Optional[int] = typer.Option(None, help=described("pretrain", "train.max_steps")),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    out: Path = OutOpt, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt,
) -> None:
    """Pretrain a model from scratch on prepared shards (resumes from the last checkpoint)."""
    model = {k: v for k, v in {"arch": arch, "size": size}.items() if v}
    flags: dict[str, Any] = {"data": data, "seq_len": seq_len, "model": model or None,
                             "train": {"max_steps": max_steps} if max_steps else None}
    run_stage_command("pretrain", config, flags, set_, out, quiet, seed=seed or 0)


@app.command()
def sft(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=described("sft", "model")),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=described("sft", "data")),
    method: Optional[str] = typer.Option(None, help=described("sft", "method")),
    template: Optional[str] = typer.Option(None, help=described("sft", "template")),
    epochs: Optional[float] = typer.Option(None, help=described("sft", "train.epochs")),
    max_steps: Optional[int] = typer.Option(None, help=described("sft", "train.max_steps")),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    out: Path = OutOpt, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt,
) -> None:
    """Fine-tune on chat data (full, LoRA or QLoRA); resumes from the last checkpoint."""
    train = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps}.items() if v is not None}
    run_stage_command("sft", config, {"model": model, "data": data, "method": method, "template": template,
                                      "train": train or None}, set_, out, quiet, seed=seed or 0)


@app.command()
def prefer(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=described("prefer", "model")),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=described("prefer", "data")),
    loss: Optional[str] = typer.Option(None, help=described("prefer", "loss")),
    method: Optional[str] = typer.Option(None, help=described("prefer", "method")),
    max_steps: Optional[int] = typer.Option(None, help=described("prefer", "train.max_steps")),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    out: Path = OutOpt, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt,
) -> None:
    """Preference-tune (DPO and relatives) on prompt/chosen/rejected pairs."""
    run_stage_command("prefer", config, {"model": model, "data": data, "loss": loss, "method": method,
                                         "train": {"max_steps": max_steps} if max_steps else None},
                      set_, out, quiet, seed=seed or 0)


@app.command()
def rl(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=described("rl", "model")),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=described("rl", "data")),
    reward: Optional[list[str]] = typer.Option(None, "--reward", help="Rewards and weights: judge=1,language=0.5 "
                                               "(judge, verifiable, language, length, format; repeatable)."),
    judge: Optional[str] = typer.Option(None, "--judge", help=described("rl", "rewards.judge.model")),
    method: Optional[str] = typer.Option(None, help=described("rl", "method")),
    max_steps: Optional[int] = typer.Option(None, help=described("rl", "train.max_steps")),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    out: Path = OutOpt, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt,
) -> None:
    """Reinforcement learning (GRPO) from named, weighted rewards; resumes from the last checkpoint."""
    rewards: dict[str, dict[str, Any]] = {}
    for item in (part.strip() for value in reward or [] for part in value.split(",") if part.strip()):
        name, sep, weight = item.partition("=")
        try:
            rewards[name.strip()] = {"weight": float(weight)} if sep else {}
        except ValueError:
            raise FabrikaError(f"--reward {item!r}: the weight {weight!r} is not a number; expected NAME or "
                               "NAME=WEIGHT, e.g. --reward judge=1,language=0.5") from None
    if judge:
        rewards.setdefault("judge", {})["model"] = judge
    run_stage_command("rl", config, {"model": model, "data": data, "method": method, "rewards": rewards or None,
                                     "train": {"max_steps": max_steps} if max_steps else None},
                      set_, out, quiet, seed=seed or 0)


@app.command()
def export(
    model: Optional[str] = typer.Argument(None, help=described("export", "model")),
    quant: Optional[str] = typer.Option(None, "--quant", help=described("export", "quant")),
    imatrix: Optional[str] = typer.Option(None, "--imatrix", help=described("export", "imatrix")),
    out: Path = OutOpt, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt,
) -> None:
    """Convert to GGUF for llama.cpp, quantize, and verify against the original."""
    run_stage_command("export", config, {"model": model, "quant": quant, "imatrix": imatrix}, set_, out, quiet)


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models: MT-Bench, scores from judgment files.")
app.add_typer(eval_app, name="eval")


@eval_app.command("mtbench")
def eval_mtbench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=described("evaluate", "model")),
    bench: Optional[list[str]] = typer.Option(None, "--bench", help=described("evaluate", "mtbench.bench")),
    judge: Optional[str] = typer.Option(None, "--judge", help=described("evaluate", "mtbench.judge")),
    answers: Optional[str] = typer.Option(None, "--answers", help=described("evaluate", "mtbench.answers")),
    questions: Optional[int] = typer.Option(None, "--questions", help=described("evaluate", "mtbench.questions")),
    model_id: Optional[str] = typer.Option(None, "--model-id", help=described("evaluate", "model_id")),
    baseline: Optional[str] = typer.Option(None, "--baseline", help=described("evaluate", "mtbench.baseline")),
    mode: Optional[str] = typer.Option(None, "--mode", help=described("evaluate", "mtbench.mode")),
    out: Path = OutOpt, config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt,
) -> None:
    """Generate MT-Bench answers and grade them with an LLM judge (FastChat-compatible files)."""
    if baseline and not mode:
        mode = "pairwise"
    mt = {k: v for k, v in {"bench": bench or None, "judge": judge, "answers": answers, "questions": questions,
                            "baseline": baseline, "mode": mode}.items() if v is not None}
    art = run_stage_command("evaluate", config, {"model": model, "model_id": model_id, "mtbench": mt or None},
                            set_, out, quiet, metrics_table=False)  # results.md holds the same numbers, per bench
    console.print(Path(art.dir / "results.md").read_text(encoding="utf-8"))


@eval_app.command("show")
def eval_show(files: list[Path] = typer.Argument(..., help="model_judgment/*_single.jsonl (or *_pair.jsonl with "
                                                  "--pairwise) files, FastChat's or ours."),
              pairwise: bool = typer.Option(False, "--pairwise", help="The files are pairwise judgments.")) -> None:
    """Scores from judgment files, as FastChat's show_result.py computes them, plus per category."""
    from fabrika.evaluate.render import pairwise_table, single_tables

    for shown in [pairwise_table(files)] if pairwise else single_tables(files):
        console.print(shown)


@eval_app.command("leaderboard")
def eval_leaderboard(dirs: list[Path] = typer.Argument(..., help="Results folders (searched at any depth)."),
                     out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write it as Markdown.")) -> None:
    """Every model evaluated in these folders, per bench, beside the published scores."""
    from fabrika.artifacts import atomic_write_text
    from fabrika.evaluate.render import leaderboard_tables

    tables, md = leaderboard_tables(dirs)
    for table in tables:
        console.print(table)
    if out:
        atomic_write_text(out, md)
        console.print(f"written: {out}")


@app.command()
def plan(
    arch: str = typer.Option("llama", help="Architecture: llama, mistral, mixtral, qwen2 or gpt2."),
    size: str = typer.Option("8b", help="Size preset of --arch, e.g. `--size 70b`, `--arch mixtral --size 8x7b`; "
                            "`--size list` shows them all."),
    model: Optional[str] = typer.Option(None, help="A HF model dir, its config.json, or a Hub id instead of "
                                        "arch/size."),
    tokens: Optional[float] = typer.Option(None, help="Training tokens, e.g. `--tokens 20e9`."),
    data_gb: Optional[float] = typer.Option(None, help="Or: GB of raw text (converted at --bytes-per-token)."),
    bytes_per_token: float = typer.Option(4.0, help="Bytes of raw text per token, for --data-gb."),
    gpu: str = typer.Option("h100", help="GPU type."),
    gpus: int = typer.Option(1, help="Number of GPUs."),
    mfu: float = typer.Option(0.4, help="Model FLOPs utilisation assumed."),
    price: Optional[float] = typer.Option(None, help="$ per GPU-hour (default: a typical rental price)."),
    seq_len: Optional[int] = typer.Option(None, help="Sequence length."),
    micro_batch: int = typer.Option(1, help="Sequences per GPU per micro-step."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Estimate parameters, FLOPs, data, memory, time and cost before spending money."""
    from fabrika.models.plan import plan_command

    plan_command(arch=arch, size=size, model=model, tokens=tokens, data_gb=data_gb, gpu=gpu, gpus=gpus, mfu=mfu,
                 price=price, seq_len=seq_len, micro_batch=micro_batch, json_out=json_out,
                 bytes_per_token=bytes_per_token)


@app.command("accelerate-config")
def accelerate_config(name: str = typer.Argument(..., help="ddp, fsdp, deepspeed-zero2, deepspeed-zero3, ...")) -> None:
    """Print the path of a shipped accelerate config, for `accelerate launch --config_file`."""
    from fabrika.train.launch import config_path

    print(config_path(name))


def _register_phase_commands() -> None:
    """Each phase adds its own commands; their modules import only typer at import time."""
    from fabrika.infer.commands import register as register_infer

    register_infer(app)


_DISK_FULL = re.compile(r"No space left on device|File too large|Disk quota exceeded|os error (?:27|28|122)\b")


def _disk_full(e: BaseException | None) -> bool:
    """A write that failed for lack of space, also when a library (safetensors, arrow) wraps the OSError."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if _DISK_FULL.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _interrupted(e: BaseException | None) -> bool:
    """typer turns Ctrl-C inside a command into a silent `sys.exit(130)`: the KeyboardInterrupt is still in
    the exception's chain, and fabrika answers it with its own message instead of none."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False


def main() -> None:
    _register_phase_commands()
    _flags_without_type()
    _help_from_config()

    try:
        try:
            app()
        except SystemExit as e:
            if e.code in (None, 0):
                leave_process_group()
            raise
        leave_process_group()
    except FabrikaError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001
        from pydantic import ValidationError

        if isinstance(e, ValidationError):  # settings built from command-line values without a config file
            from fabrika.config import describe_validation_error

            message = describe_validation_error(e, None, "command line")
            Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
            sys.exit(2)
        if not _disk_full(e):
            raise
        where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/] no room on disk{where} ({escape(str(e))[:300]}). Nothing half-written counts "
            "as done: free some space and run the same command again to continue.", highlight=False)
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and not _interrupted(e):
            raise
        Console(stderr=True, soft_wrap=True).print("[yellow]interrupted[/]: run the same command again to continue where it stopped")
        sys.exit(130)


if __name__ == "__main__":
    main()
