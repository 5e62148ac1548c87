"""The GPU reference job's script runs its whole path on CPU with --tiny: model and data built, SFT with
checkpointing on and off, MT-Bench answers, GGUF F16 and Q4_K_M, and a results table appended."""

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
