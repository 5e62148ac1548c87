"""The pipeline runner on real stages: order, caching, partial re-runs, status, dry run, bad files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from helpers import run_cli
from fabrika.errors import FabrikaError
from fabrika.pipeline import load_pipeline, run_pipeline, stage_state
from fabrika.runs import status_table


def write_pipeline(tmp_path: Path, corpus: Path, **pretrain_train) -> Path:
    spec = {
        "name": "t",
        "run_dir": str(tmp_path / "runs" / "${name}"),
        "seed": 1,
        "stages": {
            # listed out of order on purpose: the runner orders by inputs
            "pretrain": {"data": "prepare", "model": {"arch": "llama", "size": "tiny"}, "seq_len": 32,
                         "train": {"max_steps": 4, "batch_size": 4, "logging_steps": 2, "eval_steps": 4,
                                   "eval_samples": 4, "save_steps": 4, **pretrain_train}},
            "tok": {"kind": "tokenizer", "paths": [str(corpus)], "vocab_size": 512},
            "prepare": {"tokenizer": "tok", "paths": [str(corpus)], "shard_mb": 0.05, "val_fraction": 0.05},
        },
    }
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def test_run_cache_and_partial_rerun(tmp_path, small_corpus):
    path = write_pipeline(tmp_path, small_corpus)
    pipe = load_pipeline(path)
    assert [s.name for s in pipe.stages] == ["tok", "prepare", "pretrain"]
    arts = run_pipeline(pipe, quiet=True)
    assert set(arts) == {"tok", "prepare", "pretrain"}
    mtimes = {s.name: (pipe.stage_dir(s.name) / "manifest.json").stat().st_mtime_ns for s in pipe.stages}

    # unchanged: nothing re-runs, and it says so quickly
    t0 = time.time()
    r = run_cli("run", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("cached") == 3 and time.time() - t0 < 30
    assert all((pipe.stage_dir(n) / "manifest.json").stat().st_mtime_ns == m for n, m in mtimes.items())

    # a change to the last stage re-runs only it
    pipe2 = load_pipeline(path, ["stages.pretrain.train.lr=1e-3"])
    assert [stage_state(pipe2, s) for s in pipe2.stages] == ["done", "done", "stale"]
    run_pipeline(pipe2, quiet=True)
    for n in ("tok", "prepare"):
        assert (pipe.stage_dir(n) / "manifest.json").stat().st_mtime_ns == mtimes[n]

    # a change upstream re-runs it and everything downstream
    pipe3 = load_pipeline(path, ["stages.prepare.val_fraction=0.1"])
    assert [stage_state(pipe3, s) for s in pipe3.stages] == ["done", "stale", "stale"]

    # --force and --only
    run_pipeline(pipe, only=["tok"], force=["tok"], quiet=True)
    assert (pipe.stage_dir("tok") / "manifest.json").stat().st_mtime_ns != mtimes["tok"]

    r = run_cli("status", str(pipe.run_dir))
    assert r.returncode == 0 and "tok" in r.stdout and "done" in r.stdout


def test_interrupted_stage_is_reported_and_resumed(tmp_path, small_corpus):
    path = write_pipeline(tmp_path, small_corpus, max_steps=8, save_steps=4)
    r = run_cli("run", str(path), env={"FABRIKA_FAULT": "kill_at_step=6"})
    assert r.returncode == -9
    r = run_cli("status", str(tmp_path / "runs" / "t"))
    assert "interrupted" in r.stdout
    r = run_cli("run", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    pipe = load_pipeline(path)
    assert all(stage_state(pipe, s) == "done" for s in pipe.stages)


def test_failed_stage_shows_in_status_and_earlier_artifacts_stay(tmp_path, small_corpus):
    path = write_pipeline(tmp_path, small_corpus)
    r = run_cli("run", str(path), "--set", "stages.pretrain.seq_len=100000")
    assert r.returncode == 2 and "exceeds" in r.stderr
    table = status_table(tmp_path / "runs" / "t")
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "failed" in text and text.count("done") == 2


def test_dry_run_validates_and_writes_nothing(tmp_path, small_corpus):
    path = write_pipeline(tmp_path, small_corpus)
    r = run_cli("run", str(path), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "dry run" in r.stdout and "tokens_per_step" in r.stdout
    assert not (tmp_path / "runs").exists()


def test_bad_pipelines(tmp_path, small_corpus):
    path = write_pipeline(tmp_path, small_corpus)
    spec = yaml.safe_load(path.read_text())

    def check(mutate, message):
        s = yaml.safe_load(yaml.safe_dump(spec))
        mutate(s)
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(s))
        with pytest.raises(FabrikaError) as e:
            load_pipeline(p)
        assert message in str(e.value), str(e.value)
        assert str(p) in str(e.value) or "stage" in str(e.value)

    check(lambda s: s["stages"]["prepare"].update(shard_mbb=1), "did you mean 'shard_mb'")
    check(lambda s: s["stages"]["tok"].update(kind="tokenizr"), "did you mean 'tokenizer'")
    check(lambda s: s["stages"]["pretrain"]["train"].update(lr="fast"), "stages.pretrain.train.lr")
    check(lambda s: s.update(stages={}), "no stages")
    check(lambda s: s["stages"]["pretrain"].update(data="prepar"), "'prepar' is not a stage of this pipeline")
    check(lambda s: s["stages"]["pretrain"].update(data="prepar"), "did you mean 'prepare'")
    check(lambda s: s["stages"].update(tok={"kind": "prepare", "tokenizer": "prepare", "paths": [str(small_corpus)]}),
          "cycle")
    r = run_cli("run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def _file_size_limit(limit: int):
    """A child process whose files cannot grow past `limit` bytes: writes fail as on a full disk."""
    import resource
    import signal

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_leaves_no_complete_looking_artifact(tmp_path, small_corpus):
    import subprocess

    from helpers import FABRIKA, REPO

    path = write_pipeline(tmp_path, small_corpus)
    r = subprocess.run([FABRIKA, "run", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       preexec_fn=_file_size_limit(1_000_000))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no room on disk" in r.stderr and "Traceback" not in r.stderr
    run_dir = tmp_path / "runs" / "t"
    assert not (run_dir / "pretrain" / "manifest.json").exists()  # the model did not fit: not done
    pipe = load_pipeline(path)
    assert [stage_state(pipe, s) for s in pipe.stages] == ["done", "done", "failed"]
    r = run_cli("run", str(path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("cached") == 2 and all(stage_state(pipe, s) == "done" for s in pipe.stages)


def test_json_logs_and_one_run_log(tmp_path, small_corpus):
    path = write_pipeline(tmp_path, small_corpus)
    r = run_cli("run", str(path), "--json-logs")
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]  # nothing but JSON
    done = [e["stage"] for e in events if e.get("event") == "stage_done"]
    assert done == ["tok", "prepare", "pretrain"] and events[-1]["event"] == "pipeline_done"
    assert "train_loss" in events[[e.get("stage") for e in events].index("pretrain") + 1]["metrics"]

    r = run_cli("run", str(path), "--force", "pretrain")  # not quiet: stage output is copied to run.log
    log = (tmp_path / "runs" / "t" / "run.log").read_text()
    assert "[pretrain]" in log and "pretrain: done" in log and "prepare: cached" in log


def write_tokenizer_pipeline(tmp_path: Path, corpus: Path, stage: str = "tok") -> Path:
    """The cheapest real pipeline: one tokenizer stage (about a second)."""
    spec = {"name": "t", "run_dir": str(tmp_path / "runs" / "t"),
            "stages": {stage: {"kind": "tokenizer", "paths": [str(corpus)], "vocab_size": 300}}}
    p = tmp_path / "tok.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.mark.parametrize("name", ["../outside", "a/b", "..", "tok.bak", "tok enizer"])
def test_stage_names_that_are_not_plain_names_are_refused(tmp_path, small_corpus, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    path = write_tokenizer_pipeline(tmp_path, small_corpus, stage=name)
    r = run_cli("run", str(path), "--force", name)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "not a usable stage name" in r.stderr and "letters, digits" in r.stderr
    assert (outside / "keep.txt").read_text() == "precious" and not (tmp_path / "runs").exists()


def test_force_never_deletes_through_a_link_out_of_the_run_dir(tmp_path, small_corpus):
    path = write_tokenizer_pipeline(tmp_path, small_corpus)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "tok").symlink_to(outside, target_is_directory=True)
    r = run_cli("run", str(path), "--force", "tok")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "outside the run directory" in r.stderr and str(outside) in r.stderr
    assert (outside / "keep.txt").read_text() == "precious"


def test_a_reused_stage_whose_output_changed_is_refused_until_forced(tmp_path, small_corpus):
    """A finished stage whose output files no longer have the sizes its manifest recorded (a truncated
    copy, a deleted file) is never reused silently, and never rebuilt silently either: `run` stops with
    the file and the fix (`--force STAGE`), `status` shows it as damaged, and `--force` rebuilds it."""
    path = write_tokenizer_pipeline(tmp_path, small_corpus)
    run_dir = tmp_path / "runs" / "t"
    r = run_cli("run", str(path))
    assert r.returncode == 0, r.stderr[-2000:]
    tok_json = run_dir / "tok" / "tokenizer" / "tokenizer.json"
    good = tok_json.read_bytes()
    tok_json.write_bytes(good[: len(good) // 2])  # a copy cut short

    r = run_cli("run", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "tokenizer/tokenizer.json is" in r.stderr and "--force tok" in r.stderr
    assert tok_json.stat().st_size == len(good) // 2  # nothing was rebuilt behind the user's back
    status = run_cli("status", str(run_dir)).stdout
    assert "damaged" in status and "tokenizer/tokenizer.json" in status

    (run_dir / "tok" / "tokenizer" / "tokenizer_config.json").unlink()
    r = run_cli("run", str(path))
    assert r.returncode == 2 and "tokenizer_config.json is missing" in r.stderr

    r = run_cli("run", str(path), "--force", "tok")
    assert r.returncode == 0, r.stderr[-2000:]
    assert tok_json.read_bytes() == good  # the same inputs build the same tokenizer
    r = run_cli("run", str(path))
    assert r.returncode == 0 and "cached" in r.stdout


def test_outputs_are_synced_and_listed_before_the_manifest(tmp_path, monkeypatch):
    """fsync reaches every output file and the stage directory before the manifest is written."""
    import os

    from fabrika import artifacts
    from fabrika.artifacts import MANIFEST, RunContext

    stage_dir = tmp_path / "s"
    (stage_dir / "model").mkdir(parents=True)
    (stage_dir / "model" / "weights.bin").write_bytes(b"\0" * 1000)
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(artifacts.os, "fsync", spy)
    ctx = RunContext(stage="s", kind="k", stage_dir=stage_dir, fingerprint="f")
    ctx.finish(stage_dir / "model", {})
    manifest = next(i for i, p in enumerate(synced) if Path(p).name.startswith(f".{MANIFEST}."))
    assert str(stage_dir / "model" / "weights.bin") in synced[:manifest]
    assert str(stage_dir / "model") in synced[:manifest] and str(stage_dir) in synced[:manifest]
    assert synced[-1] == str(stage_dir)  # and the manifest's rename, last
    assert (stage_dir / MANIFEST).exists()


def test_local_models_behind_hf_and_gguf_are_fingerprinted_by_their_files(tmp_path, chat_model):
    """A model retrained at the same path is a new input: the stage that read it runs again."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(chat_model, model)
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question. " * 20)
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF v1")
    spec = {"name": "fp", "run_dir": str(tmp_path / "runs" / "fp"), "models": {"exported": f"gguf:{gguf_file}"},
            "stages": {"ppl": {"kind": "evaluate", "model": f"hf:{model}",
                               "perplexity": {"data": str(tmp_path / "text.txt"), "context": 32, "max_tokens": 64}},
                       "ppl_gguf": {"kind": "evaluate", "model": "exported", "tokenizer": str(model),
                                    "perplexity": {"data": str(tmp_path / "text.txt"), "context": 32,
                                                   "max_tokens": 64}}}}
    path = tmp_path / "fp.yaml"
    path.write_text(yaml.safe_dump(spec))
    pipe = load_pipeline(path)
    run_pipeline(pipe, only=["ppl"], quiet=True)
    first = (pipe.stage_dir("ppl") / "manifest.json").stat().st_mtime_ns
    assert stage_state(load_pipeline(path), pipe.stage("ppl")) == "done"

    with open(model / "config.json", "a") as f:  # the same path, another model
        f.write("\n")
    again = load_pipeline(path)
    assert stage_state(again, again.stage("ppl")) == "stale"
    run_pipeline(again, only=["ppl"], quiet=True)
    assert (pipe.stage_dir("ppl") / "manifest.json").stat().st_mtime_ns != first

    before = load_pipeline(path).stage("ppl_gguf").fingerprint
    gguf_file.write_bytes(b"GGUF v2, longer")  # a re-exported file under a named model
    assert load_pipeline(path).stage("ppl_gguf").fingerprint != before


def test_report_escapes_what_the_run_wrote(tmp_path):
    """Names, paths and configs come from files a user (or a teacher model) wrote: none may become markup."""
    from fabrika.artifacts import atomic_write_json

    run_dir = tmp_path / "run"
    evil = "<script>alert(1)</script>"
    atomic_write_json(run_dir / "pipeline.json", {
        "name": evil, "source": f"{evil}.yaml", "seed": 0,
        "stages": [{"name": "ev", "kind": "evaluate", "fingerprint": "f1", "deps": []}]})
    atomic_write_json(run_dir / "ev" / "manifest.json", {
        "stage": "ev", "kind": "evaluate", "fingerprint": "f1", "config": {"model": evil},
        "artifact": {"path": "results.json"}, "outputs": [], "metrics": {}, "duration_s": 1.0})
    atomic_write_json(run_dir / "ev" / "results.json", {"model": evil, "perplexity": {"source": evil, "ppl": 3.0}})
    r = run_cli("report", str(run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    page = (run_dir / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
