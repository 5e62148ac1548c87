"""The shipped recipes validate and plan without a network, a GPU or an API key."""

from __future__ import annotations

import re

import pytest
from helpers import REPO, run_cli

RECIPES = sorted(p.name for p in (REPO / "examples").glob("*.yaml"))


# Recipes that fine-tune on another recipe's collected dataset: planned here on a shipped sample instead.
READS_ANOTHER_RUN = {"multi-gpu-fsdp.yaml", "multi-gpu-deepspeed.yaml"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_run(recipe, tmp_path):
    data = ["--set", f"stages.sft.data={REPO / 'data/samples/tagengo_sample.parquet'}"] if recipe in READS_ANOTHER_RUN else []
    r = run_cli("run", f"examples/{recipe}", "--dry-run", "--set", f"run_dir={tmp_path / 'run'}", *data)
    assert r.returncode == 0, r.stderr
    assert "dry run" in r.stdout and not (tmp_path / "run").exists()


def test_reference_recipe_plan_shows_cost_and_gpu_time(tmp_path):
    r = run_cli("run", "examples/llama3-8b-qlora-tagengo.yaml", "--dry-run", "--set", f"run_dir={tmp_path}")
    out = r.stdout
    for expected in ("api_calls=3000", "est_cost_usd=", "api_calls_max=4500", "est_cost_max_usd=", "method=qlora", "train_tokens=7,200,000", "h100_hours=",
                     "judge_calls=160", "types=q4_k_m"):
        assert expected in out, (expected, out)
    assert {"llama3-8b-qlora-tagengo.yaml", "pretrain-from-scratch.yaml", "multi-gpu-fsdp.yaml",
            "multi-gpu-deepspeed.yaml", "tiny-cpu.yaml"} <= set(RECIPES)


def test_batch_variant_plan_shows_batch_and_online_prices(tmp_path):

    r = run_cli("run", "examples/llama3-8b-qlora-tagengo-batch.yaml", "--dry-run", "--set", f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    prices = {k: float(v) for k, v in re.findall(r"(est_\w+)=([\d.]+)", r.stdout)}
    assert prices["est_cost_usd"] == prices["est_cost_online_usd"] / 2 > 0  # collect: half the online price
    assert prices["est_judge_usd"] == prices["est_judge_online_usd"] / 2 > 0  # MT-Bench judging
    online = run_cli("run", "examples/llama3-8b-qlora-tagengo.yaml", "--dry-run", "--set", f"run_dir={tmp_path}")
    assert f"est_cost_usd={prices['est_cost_online_usd']:g}" in online.stdout


def test_dry_run_states_world_size_repetition_and_a_total(tmp_path):
    """The 8-GPU pretraining recipe, planned as its launcher would run it (WORLD_SIZE or --gpus)."""
    args = ["run", "examples/pretrain-from-scratch.yaml", "--dry-run", "--set", f"run_dir={tmp_path}"]
    one, eight, launched = run_cli(*args), run_cli(*args, "--gpus", "8"), run_cli(*args, env={"WORLD_SIZE": "8"})
    for r in (one, eight, launched):
        assert r.returncode == 0, r.stderr
    flat = [" ".join(r.stdout.split()) for r in (one, eight, launched)]
    assert "estimates for 1 GPU(s)" in flat[0] and "estimates for 8 GPU(s)" in flat[1] == flat[2]
    tokens = [int(re.search(r"train_tokens=([\d,]+)", f).group(1).replace(",", "")) for f in flat]
    assert tokens[1] == tokens[2] == 8 * tokens[0]
    assert "repeats the" in flat[1] and "corpus of 'prepare'" in flat[1]  # the shipped corpus, billions of tokens
    total = re.search(r"total: ~.* wall, ([\d.]+) H100 GPU-hours on 8 GPU\(s\), \$([\d.,]+) API", flat[1])
    assert total and float(total.group(1)) > 0

    r = run_cli("run", "examples/llama3-8b-qlora-tagengo.yaml", "--dry-run", "--set", f"run_dir={tmp_path}")
    total = re.search(r"total: .* \$([\d.,]+) \(up to \$([\d.,]+)", " ".join(r.stdout.split()))
    assert total and 0 < float(total.group(1)) < float(total.group(2))  # collect and the judge, priced

    r = run_cli(*args[:2], "--gpus", "8")  # a real run takes its world size from its launcher
    assert r.returncode == 2 and "--gpus" in r.stderr
