"""The shipped recipes validate and plan without a network, a GPU or an API key."""

from __future__ import annotations

import pytest
from helpers import REPO, run_cli

RECIPES = sorted(p.name for p in (REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_run(recipe, tmp_path):
    r = run_cli("run", f"examples/{recipe}", "--dry-run", "--set", f"run_dir={tmp_path / 'run'}")
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
    import re

    r = run_cli("run", "examples/llama3-8b-qlora-tagengo-batch.yaml", "--dry-run", "--set", f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    prices = {k: float(v) for k, v in re.findall(r"(est_\w+)=([\d.]+)", r.stdout)}
    assert prices["est_cost_usd"] == prices["est_cost_online_usd"] / 2 > 0  # collect: half the online price
    assert prices["est_judge_usd"] == prices["est_judge_online_usd"] / 2 > 0  # MT-Bench judging
    online = run_cli("run", "examples/llama3-8b-qlora-tagengo.yaml", "--dry-run", "--set", f"run_dir={tmp_path}")
    assert f"est_cost_usd={prices['est_cost_online_usd']:g}" in online.stdout
