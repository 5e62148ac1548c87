"""What a training stage decides before its first step, checked through the functions the stages call:
the dtype weights load in and the learning rate per method, and speed that counts training time only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import LlamaConfig

from fabrika.train import finetune, prefer, setup, sft


@pytest.mark.parametrize("method, precision, sharded, dtype", [
    ("full", "bf16", None, "fp32"),       # one GPU or DDP: fp32 master weights, bf16 autocast
    ("full", "bf16", "FSDP", "bf16"),     # FSDP upcasts the trained weights itself
    ("full", "bf16", "DeepSpeed", "bf16"),  # DeepSpeed keeps fp32 master copies
    ("full", "fp32", None, "fp32"),
    ("lora", "bf16", None, "bf16"),       # frozen base: read only
    ("lora", "fp32", None, "auto"),       # as saved, as before
    ("qlora", "bf16", None, "bf16"),
])
def test_weights_dtype_per_method_and_sharding(monkeypatch, method, precision, sharded, dtype):
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    if sharded:
        monkeypatch.setenv({"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}[sharded], "true")
    assert setup.weights_dtype(method, precision) == dtype


def _lr(stage, method, train=None):
    cfg = stage.CONFIG(model="m", data="d", method=method, **({"train": train} if train is not None else {}))
    return finetune.training_params(cfg.train, cfg.method, setup.set_by_user(cfg, "train", "lr")).lr


def test_full_fine_tuning_gets_its_own_learning_rate_unless_one_is_given():
    assert _lr(sft, "lora") == 2e-4  # LoRA keeps sft's default
    assert _lr(sft, "full") == finetune.FULL_LR == 1e-5
    assert _lr(sft, "full", {"max_steps": 5}) == 1e-5  # other settings given, lr not
    assert _lr(sft, "full", {"lr": 3e-4}) == 3e-4  # the user's own value is kept
    assert _lr(prefer, "full") == 5e-6  # already below: unchanged


def _config():
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=256)


def test_evaluation_and_saving_time_is_left_out_of_tokens_per_second(tmp_path, monkeypatch):
    """Steps of 1 s each; after step 2 an evaluation of 5 s and a checkpoint of 3 s. The interval that
    holds them still reads one step per second, as does the one without."""
    clock = [0.0]
    monkeypatch.setattr(setup.time, "perf_counter", lambda: clock[0])
    params = setup.TrainParams(batch_size=1, grad_accum=1, peak_tflops=1.0)
    logger = setup.make_callbacks(tmp_path, params, _config(), seq_len=100)[0]
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    logger.on_train_begin(None, state, None)

    def step(seconds=1.0):
        clock[0] += seconds
        state.global_step += 1
        logger.on_step_end(None, state, None)

    def log():
        logger.on_log(None, state, None, logs={"loss": 1.0})

    step(), step(), log()
    clock[0] += 5.0  # the evaluation: its own log row comes before on_evaluate
    logger.on_log(None, state, None, logs={"eval_loss": 2.0})
    logger.on_evaluate(None, state, None)
    clock[0] += 3.0  # the checkpoint
    logger.on_save(None, state, None)
    step(), step(), log()
    step(), step(), log()
    rows = [json.loads(line) for line in (tmp_path / setup.METRICS).read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    assert speeds == pytest.approx([100.0, 100.0, 100.0])
    assert all(r["mfu"] > 0 for r in rows if "tokens_per_s" in r)
