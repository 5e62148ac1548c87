import json

import pytest
import torch
from helpers import run_cli

from fabrika.errors import FabrikaError
from fabrika.models.plan import make_plan, render_plan
from fabrika.models.presets import ARCHS, ModelSpec, count_parameters, make_config

NOMINAL = {"125m": 125e6, "350m": 350e6, "1b": 1e9, "3b": 3e9, "8b": 8e9}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_size_lands_near_its_name(arch):
    for size, nominal in NOMINAL.items():
        counts = count_parameters(make_config(arch, size, vocab_size=32000))
        assert 0.6 * nominal < counts["total"] < 1.45 * nominal, (arch, size, counts)


def test_llama_8b_is_llama_3_8b():
    counts = count_parameters(make_config("llama", "8b"))
    assert counts["total"] == 8_030_261_248
    mix = count_parameters(make_config("mixtral", "8b"))
    assert mix["active"] < mix["total"] / 2


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_presets_train_and_reload(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(ModelSpec(arch=arch, size="tiny").to_hf_config(vocab_size=300))
    x = torch.randint(0, 300, (2, 16))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is type(model)


def test_bad_presets():
    with pytest.raises(FabrikaError, match="did you mean 'llama'"):
        make_config("lama", "tiny")
    with pytest.raises(FabrikaError, match="choose from tiny"):
        make_config("llama", "7b")
    with pytest.raises(FabrikaError, match="num_hidden_layers"):
        make_config("llama", "tiny", num_hiden_layers=3)
    assert make_config("llama", "tiny", num_hidden_layers=3).num_hidden_layers == 3


def test_plan_numbers_follow_the_stated_formulas():
    p = make_plan("llama", "8b", tokens=20e9, gpu="h100", gpus=8, mfu=0.4)
    n = p.params["total"]
    assert p.chinchilla_tokens == 20 * n
    assert p.total_flops == pytest.approx(p.flops_per_token * 20e9)
    assert 6 * (n - p.params["embedding"]) < p.flops_per_token < 8 * n  # 6N plus attention
    assert p.hours == pytest.approx(p.total_flops / (8 * 989e12 * 0.4) / 3600)
    assert p.cost == pytest.approx(p.hours * 8 * 2.5)
    full, lora, qlora = p.memory["full"], p.memory["lora"], p.memory["qlora"]
    assert full.weights + full.gradients + full.optimizer == pytest.approx(16 * n / 8)
    assert qlora.total < lora.total and qlora.weights < 0.4 * lora.weights
    assert "fewer tokens than Chinchilla" in p.data_verdict
    single = make_plan("llama", "8b", data_gb=20, gpus=1)
    assert single.tokens == 5e9 and not single.fits("full") and single.fits("qlora")
    assert "beyond Chinchilla" in make_plan("llama", "125m", tokens=1e12).data_verdict


def test_plan_from_a_config_directory_and_errors(tmp_path):
    make_config("qwen2", "350m").save_pretrained(tmp_path)
    assert make_plan(model=str(tmp_path), tokens=1e9).params["total"] == count_parameters(
        make_config("qwen2", "350m"))["total"]
    with pytest.raises(FabrikaError, match="h100"):
        make_plan(tokens=1e9, gpu="tpu")
    with pytest.raises(FabrikaError, match="--tokens"):
        make_plan()


def test_plan_cli_one_screen_and_json():
    from rich.console import Console

    console = Console(record=True, width=120)
    render_plan(make_plan("llama", "8b", tokens=20e9, gpus=8), console)
    text = console.export_text()
    for word in ("FLOPs per token", "Chinchilla", "wall-clock", "cost", "qlora", "assumptions"):
        assert word in text
    r = run_cli("plan", "--size", "1b", "--tokens", "2e10", "--gpu", "a100-80gb", "--gpus", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["gpus"] == 2
    r = run_cli("plan", "--gpu", "tpu", "--tokens", "1e9")
    assert r.returncode == 2 and "known: h100" in r.stderr
    r = run_cli("plan", "--gpu", "b200", "--tokens", "1e9")  # a GPU whose rental price is not typical yet
    assert r.returncode == 2 and "--price" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("plan", "--gpu", "b200", "--price", "5", "--tokens", "1e9", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["cost"] > 0, r.stderr


def test_published_shapes_are_presets():
    """Parameter counts of the released models, as their model cards give them."""
    assert count_parameters(make_config("llama", "70b"))["total"] == 70_553_706_496
    mix = count_parameters(make_config("mixtral", "8x7b"))
    assert mix["total"] == 46_702_792_704 and mix["active"] == 12_879_925_248
    assert count_parameters(make_config("qwen2", "7b"))["total"] == 7_615_616_512
    assert count_parameters(make_config("mistral", "7b"))["total"] == 7_241_732_096
    with pytest.raises(FabrikaError, match="70b"):
        make_config("mistral", "70b")
    with pytest.raises(ValueError, match="choose from"):
        ModelSpec(arch="gpt2", size="8x7b")


def test_plan_cli_units_sizes_and_local_configs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    fabrika = str(Path(sys.executable).parent / "fabrika")

    def plan(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([fabrika, "plan", *args], capture_output=True, text=True, timeout=300)

    r = plan("--arch", "llama", "--size", "8b", "--tokens", "20e9", "--gpus", "8")
    assert r.returncode == 0, r.stderr
    assert "8.03B parameters" in r.stdout and "G parameters" not in r.stdout
    flops = next(line for line in r.stdout.splitlines() if "total FLOPs" in line)
    assert "e+20" in flops or "e+21" in flops
    r = plan("--size", "list")
    assert r.returncode == 0 and "Mixtral-8x7B-v0.1" in r.stdout and "Qwen2-72B" in r.stdout
    r = plan("--size", "7b", "--tokens", "1e9")
    assert r.returncode == 2 and "70b" in r.stderr and "8b" in r.stderr and "Traceback" not in r.stderr
    make_config("qwen2", "350m").save_pretrained(tmp_path / "qwen")
    by_dir = plan("--model", str(tmp_path / "qwen"), "--data-gb", "1", "--bytes-per-token", "2", "--json")
    by_file = plan("--model", str(tmp_path / "qwen" / "config.json"), "--data-gb", "1", "--bytes-per-token", "2",
                   "--json")
    assert by_dir.returncode == 0 and by_file.returncode == 0, by_file.stderr
    assert json.loads(by_dir.stdout)["params"] == json.loads(by_file.stdout)["params"]
    assert json.loads(by_file.stdout)["tokens"] == 0.5e9
    (tmp_path / "empty").mkdir()
    r = plan("--model", str(tmp_path / "empty"), "--tokens", "1e9")
    assert r.returncode == 2 and "config.json" in r.stderr
