"""Pretraining runs real optimizer steps on a tiny Llama: loss falls, a killed run resumes exactly,
two processes train through DDP, and bad settings stop with a clear message."""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

import pytest
import yaml

from helpers import run_cli
from fabrika.artifacts import read_jsonl, read_manifest


def pretrain_config(data: str, **train) -> dict:
    return {
        "data": data,
        "model": {"arch": "llama", "size": "tiny"},
        "seq_len": 64,
        "train": {"batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "logging_steps": 1, "eval_steps": 10,
                  "eval_samples": 16, "save_steps": 5, **train},
    }


def write_config(path: Path, prepared: Path, **train) -> Path:
    path.write_text(yaml.safe_dump(pretrain_config(str(prepared), **train)))
    return path


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}


def test_pretrain_trains_and_saves_a_loadable_model(tmp_path, prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fabrika.artifacts import RunContext
    from fabrika.config import load
    from fabrika.train import pretrain

    cfg = load(pretrain.CONFIG, write_config(tmp_path / "c.yaml", prepared, max_steps=40, eval_steps=20))
    out = tmp_path / "run"
    art = pretrain.run(cfg, RunContext(stage="pretrain", kind="pretrain", stage_dir=out, quiet=True))

    rows = list(read_jsonl(out / "metrics.jsonl"))
    train_losses = [r["loss"] for r in rows if "loss" in r]
    vocab = AutoTokenizer.from_pretrained(art.path).vocab_size
    assert train_losses[0] > 0.8 * math.log(vocab)  # starts near uniform
    assert art.metrics["eval_loss"] < train_losses[0] - 1.0  # and clearly learns
    assert art.metrics["eval_ppl"] == pytest.approx(math.exp(art.metrics["eval_loss"]))
    assert any("tokens_per_s" in r for r in rows) and any("eval_loss" in r for r in rows)
    assert not (out / "checkpoints").exists()  # removed after success unless keep_checkpoints
    assert read_manifest(out)["metrics"]["steps"] == 40

    model = AutoModelForCausalLM.from_pretrained(art.path)
    tok = AutoTokenizer.from_pretrained(art.path)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_killed_run_resumes_exactly(tmp_path, prepared):
    cfg = write_config(tmp_path / "c.yaml", prepared, max_steps=16, eval_steps=8)
    straight = tmp_path / "straight"
    r = run_cli("pretrain", "--config", str(cfg), "--out", str(straight), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]

    resumed = tmp_path / "resumed"
    r = run_cli("pretrain", "--config", str(cfg), "--out", str(resumed), "--quiet",
                env={"FABRIKA_FAULT": "kill_at_step=12"})
    assert r.returncode == -9, r.stderr[-3000:]  # SIGKILL after step 12; last checkpoint is step 10
    assert read_manifest(resumed) is None
    assert max(losses(resumed)) > 10  # it logged past its last checkpoint before dying
    r = run_cli("pretrain", "--config", str(cfg), "--out", str(resumed), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout

    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    ma, mb = read_manifest(straight)["metrics"], read_manifest(resumed)["metrics"]
    assert mb["eval_loss"] == pytest.approx(ma["eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_pipeline_under_a_two_process_launch(tmp_path, small_corpus):
    """`fabrika run` under torchrun: rank 0 alone makes the tokenizer and the shards, both processes
    pretrain through DDP, and a second launch finds every stage cached."""
    run = tmp_path / "run"
    corpus = {"paths": [str(small_corpus)]}
    pipe = tmp_path / "ddp.yaml"
    pipe.write_text(yaml.safe_dump({"name": "ddp", "run_dir": str(run), "stages": {
        "tokenizer": {**corpus, "vocab_size": 512},
        "prepare": {**corpus, "tokenizer": "tokenizer", "shard_mb": 0.05, "val_fraction": 0.05},
        "pretrain": pretrain_config("prepare", max_steps=6, eval_steps=6, batch_size=4),
    }}))
    with socket.socket() as sock:  # a free port: torchrun's port 0 does not work with its static rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), "-m", "fabrika.cli"]
    r = run_cli("run", str(pipe), "--quiet", launcher=torchrun, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    # rank 0's words: the other rank skipped tokenizer and prepare and joined pretrain
    assert sorted(p.name for p in (run / ".ranks").glob("*/*")) == ["prepare.next", "pretrain.join", "tokenizer.next"]
    m = read_manifest(run / "pretrain")
    assert m["metrics"]["world_size"] == 2
    # 2 processes × batch 4 × 64 tokens per optimizer step
    assert m["metrics"]["train_tokens"] == 6 * 2 * 4 * 64
    assert (run / "pretrain" / "model" / "model.safetensors").exists()

    r = run_cli("run", str(pipe), "--quiet", launcher=torchrun, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.name for p in (run / ".ranks").glob("*/*")) == ["prepare.next", "pretrain.next", "tokenizer.next"]

    (tmp_path / "empty").mkdir()  # a stage that fails on rank 0 stops the other rank too, with its message
    pipe.write_text(pipe.read_text().replace(str(small_corpus), str(tmp_path / "empty")))
    r = run_cli("run", str(pipe), "--quiet", launcher=torchrun, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert "rank 0 stopped the run ('tokenizer' and later stages will not run): paths:" in r.stderr


def test_trackers_tensorboard_and_wandb_offline(tmp_path, prepared):
    cfg = write_config(tmp_path / "c.yaml", prepared, max_steps=3, eval_steps=3, report_to=["tensorboard", "wandb"])
    out = tmp_path / "tracked"
    r = run_cli("pretrain", "--config", str(cfg), "--out", str(out), "--quiet",
                env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    assert list(tmp_path.rglob("offline-run-*"))


@pytest.mark.parametrize("setting, message", [
    ("seq_len=9000", "exceeds the model's"),
    ("train.precision=fp16", "needs a CUDA GPU"),
    ("train.attn_implementation=flash_attention_2", "needs a CUDA GPU"),
    ("model.size=huge", "size"),
    ("train.lr=-1", "train.lr"),
])
def test_bad_settings_exit_2_with_a_clear_message(tmp_path, prepared, setting, message):
    cfg = write_config(tmp_path / "c.yaml", prepared, max_steps=2)
    r = run_cli("pretrain", "--config", str(cfg), "--out", str(tmp_path / "o"), "--set", setting)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr


def test_unprepared_data_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("pretrain", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a prepared dataset" in r.stderr
