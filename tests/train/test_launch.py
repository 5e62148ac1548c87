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
