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
