"""The shipped multi-GPU configs parse with accelerate's own loader and say what their names claim."""

import pytest
from helpers import run_cli

from fabrika.errors import FabrikaError
from fabrika.train.launch import CONFIGS, config_path


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(path)) for name, path in CONFIGS.items()}
    assert str(kinds["ddp"].distributed_type).endswith("MULTI_GPU")
    assert kinds["fsdp"].fsdp_config["fsdp_version"] == 2
    assert kinds["fsdp"].fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"  # the final save is whole
    assert kinds["deepspeed-zero3-offload"].deepspeed_config["offload_param_device"] == "cpu"
    assert kinds["deepspeed-zero2"].deepspeed_config["zero_stage"] == 2
    with pytest.raises(FabrikaError, match="shipped: "):
        config_path("zero9")
    r = run_cli("accelerate-config", "fsdp")
    assert r.returncode == 0 and r.stdout.strip().endswith("fsdp.yaml")


def test_sharded_strategies_refuse_a_cpu_machine(tmp_path):
    r = run_cli("sft", "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"),
                env={"ACCELERATE_USE_FSDP": "true"})
    assert r.returncode == 2 and "FSDP needs CUDA GPUs" in r.stderr and "torchrun" in r.stderr


def test_several_gpus_without_a_launcher_are_refused_and_ranks_take_their_own_gpu(monkeypatch):
    """Decided before any model is loaded: one process on an 8-GPU machine would become nn.DataParallel
    (TRL refuses it after loading the model; pretraining would silently use it), and a stand-alone
    command under a launcher puts each rank on its own GPU (4-bit weights included)."""
    import torch

    from fabrika.train import setup

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    params = setup.TrainParams(precision="bf16")
    with pytest.raises(FabrikaError, match="8 GPUs.*accelerate launch --num_processes 8.*CUDA_VISIBLE_DEVICES=0"):
        setup.check_device(params)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert setup.check_device(params) == "bf16" and chosen == [5]


def test_auto_attention_skips_a_flash_attn_build_that_does_not_load(tmp_path, monkeypatch):
    import sys

    import torch

    from fabrika.train import setup

    broken = tmp_path / "flash_attn"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert setup.attention(setup.TrainParams(), "bf16", fine_tuning=True) == "sdpa"
    (broken / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    assert setup.attention(setup.TrainParams(), "bf16", fine_tuning=True) == "flash_attention_2"
