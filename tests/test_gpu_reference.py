"""The GPU reference job's script runs its whole path on CPU with --tiny: model and data built, the
baseline SFT and each performance switch in its own process (those that need CUDA skipped with the
reason), the adapter saved and merged, MT-Bench answers, decode steps with the adapter unmerged and
merged, GGUF F16 and Q4_K_M, and the tables appended."""

import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.slow
def test_gpu_reference_tiny_runs_on_cpu(tmp_path):
    results = tmp_path / "RESULTS.md"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_reference.py"), "--tiny", "--results", str(results)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = results.read_text(encoding="utf-8")
    assert "GPU reference job (tiny, CPU" in table and "projected 3,000 × 3-epoch SFT" in table
    assert "MT-Bench answers (transformers, 4 turns)" in table or "MT-Bench answers (vLLM, 4 turns)" in table
    assert "engine for " in r.stdout  # which engine answered, and why
    assert "sdpa / grouped" in table and "time: GGUF Q4_K_M" in table
    assert "| ≤ 10-minute goal | not met: needs " in table and "(article: ~30 min)" in table
    assert "| adapter save: time / peak host / peak GPU | " in table
    assert "| merge into the base: time / peak host / peak GPU | " in table
    assert "| decode ms/step, adapter / merged (2 prompts) | " in table
    # every switch has a row: measured against the baseline, or the reason it did not run
    assert "| switch | tokens/s | Δ vs baseline | peak GPU GiB |" in table
    assert "| baseline (sdpa, grouped, checkpointing on) | " in table
    for measured in ("checkpointing off", "batching packed", "batching padded"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {measured} | "))
        assert "%" in row, row
    assert "| attention flash_attention_2 | needs a CUDA GPU |" in table
    assert "| Liger kernels on | needs a CUDA GPU |" in table
    assert "| torch.compile on | not on --tiny" in table


def test_a_failing_or_slow_switch_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_reference

    base = {"attention": "sdpa", "batching": "grouped"}
    args = dict(out=tmp_path, model=str(tmp_path / "no_model"), data="d", method="lora", seq=64, batch=1, accum=1,
                steps=1)
    tries = [("bad setting", {"no_such_setting": 1}), ("absent", "not installed"), ("no model", {"compile": True})]
    done = dict(gpu_reference.measure_switches(base, tries, seconds=600, limit=60, **args))
    assert done["bad setting"].startswith("failed: ") and "no_such_setting" in done["bad setting"]
    assert done["absent"] == "not installed"
    assert done["no model"].startswith("failed: ") and "no_model" in done["no model"]
    stopped = dict(gpu_reference.measure_switches(base, [("slow", {})], seconds=600, limit=1, **args))
    assert stopped["slow"] == "failed: stopped at its 1 s limit"
