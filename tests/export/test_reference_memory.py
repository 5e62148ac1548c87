"""The reference model of verification, importance matrix and perplexity: what it needs in memory,
checked before loading; where it runs; and the window-by-window comparison, which gives exactly the
numbers of one pass over all the logits."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from fabrika.errors import FabrikaError
from fabrika.export import imatrix, verify
from fabrika.models.reference import Part, Placement, check_fits, model_size, shortfall
from helpers import run_cli

CPU = Placement("cpu", "float32")
GPU = Placement("cuda", "bfloat16")
GB = 10**9
# Llama-3-8B: 8.03B parameters, 128,256 tokens; its F16 GGUF is 16.1 GB
LLAMA3_8B = dict(params=8_030_261_248, vocab=128_256)


def test_an_8b_verification_on_cpu_needs_about_50_gb_of_ram():
    parts = verify.verification_parts(**LLAMA3_8B, window=512, gguf_bytes=16_068_890_912, placement=CPU)
    assert not any(p.gpu for p in parts)
    assert 49 * GB < sum(p.bytes for p in parts) < 50 * GB  # 32.1 (fp32) + 16.1 (F16 mapped) + 1.1 (logits)
    problem = shortfall(parts, free_host=24 * GB, free_gpu=None)
    assert "needs about 49.2 GB of RAM" in problem and "24.0 GB is free" in problem
    assert "the HF model in float32 on cpu, 8.03B parameters: 32.1 GB" in problem
    assert "the largest GGUF file, memory-mapped: 16.1 GB" in problem
    assert shortfall(parts, free_host=64 * GB, free_gpu=None) is None


def test_on_a_gpu_the_model_is_bf16_there_and_ram_holds_the_file():
    parts = verify.verification_parts(**LLAMA3_8B, window=512, gguf_bytes=16_068_890_912, placement=GPU)
    on_gpu = sum(p.bytes for p in parts if p.gpu)
    assert 16 * GB < on_gpu < 16.5 * GB  # 2 bytes a parameter, and a window's logits in bf16 and fp32
    assert shortfall(parts, free_host=24 * GB, free_gpu=80 * GB) is None  # the 24 GB box of issue #17, with a GPU
    short = shortfall(parts, free_host=24 * GB, free_gpu=12 * GB)
    assert "GPU memory" in short and "12.0 GB is free" in short and "RAM" not in short
    both = shortfall(parts, free_host=8 * GB, free_gpu=12 * GB)
    assert "GPU memory" in both and "of RAM" in both


def test_importance_matrix_needs_the_model_and_a_window():
    parts = imatrix.imatrix_parts(**LLAMA3_8B, context=512, placement=CPU)
    assert 32 * GB < sum(p.bytes for p in parts) < 32.5 * GB
    assert shortfall(parts, free_host=24 * GB, free_gpu=None).startswith("needs about 32.4 GB of RAM")


def test_a_step_that_does_not_fit_fails_with_what_to_do():
    too_big = [Part("the HF model in float32 on cpu", 10**16)]
    with pytest.raises(FabrikaError, match=r"export verification: needs about 10000000\.0 GB of RAM .* is free\. "
                                            r"Skip the comparison with verify\.enabled: false"):
        check_fits("export verification", too_big, verify.VERIFY_ADVICE)
    assert "no GPU is available" in shortfall([Part("weights on the GPU", 1, gpu=True)], free_host=GB, free_gpu=None)
    check_fits("perplexity", [Part("a tiny model", 1000)], "")  # fits: nothing raised


def test_model_size_reads_the_config_only(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256).save_pretrained(tmp_path)
    params, vocab, positions = model_size(tmp_path)  # no weights in the directory: none are read
    assert (vocab, positions) == (300, 256)
    assert params == 2 * 300 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64


def test_bf16_reference_widens_the_lossless_bound():
    row = {"kl": 5e-3, "top1": 0.99}
    assert verify.against_reference("f32", row, CPU.as_dict()) == "conversion error"
    assert verify.against_reference("f32", row, GPU.as_dict()) == "lossless: KL within 1e-02 of a bfloat16 reference"
    assert verify.reference_text("f16", GPU.as_dict()) == "KL ≤ 1e-02"
    assert verify.reference_text("f16", CPU.as_dict()) == "KL ≤ 2e-03"
    report = {"reference": GPU.as_dict(), "files": {"f16": {**row, "tokenizer_parity": {}, "end_of_turn_stops": True}}}
    assert not verify.check_lossless(report)
    report["reference"] = CPU.as_dict()
    assert verify.check_lossless(report) == ["f16: mean KL 5.00e-03 against the HF model (float32 on cpu) exceeds 2e-03"]


def one_pass(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict[str, float]:
    """The comparison as one pass over all the logits (what verification computed before windows)."""
    lp, lq = verify._log_softmax(ref.astype(np.float64)), verify._log_softmax(got.astype(np.float64))
    nxt = np.array(ids[1:])
    return {"top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "kl": max(float((np.exp(lp) * (lp - lq)).sum(-1).mean()), 0.0),
            "max_abs_diff": float(np.abs(ref - got).max()),
            "ppl": float(math.exp(-lq[np.arange(len(nxt)), nxt].mean())),
            "hf_ppl": float(math.exp(-lp[np.arange(len(nxt)), nxt].mean()))}


@pytest.mark.parametrize("tokens", [2, 64, 65, 129, 512])
def test_window_stats_equal_one_pass_exactly(tokens):
    rng = np.random.default_rng(tokens)
    ref = (rng.normal(size=(tokens, 3001)) * 3).astype(np.float32)
    got = ref + (rng.normal(size=ref.shape) * 0.01).astype(np.float32)
    ids = [int(i) for i in rng.integers(0, 3001, tokens)]
    assert verify.summarize([verify.position_stats(ref, got, ids)]) == one_pass(ref, got, ids)  # bit for bit


def test_windows_aggregate_over_all_positions():
    rng = np.random.default_rng(1)
    parts = []
    for n in (100, 37):
        ref = rng.normal(size=(n, 50)).astype(np.float32)
        ids = [int(i) for i in rng.integers(0, 50, n)]
        parts.append((ref, ref + rng.normal(size=ref.shape).astype(np.float32), ids))
    total = verify.summarize([verify.position_stats(*p) for p in parts])
    each = [one_pass(*p) for p in parts]
    assert total["top1"] == pytest.approx((each[0]["top1"] * 100 + each[1]["top1"] * 37) / 137)
    assert total["kl"] == pytest.approx((each[0]["kl"] * 100 + each[1]["kl"] * 37) / 137)
    assert total["max_abs_diff"] == max(e["max_abs_diff"] for e in each)
    nll = [math.log(e["ppl"]) for e in each]
    assert math.log(total["ppl"]) == pytest.approx((nll[0] * 99 + nll[1] * 36) / 135)


def test_export_of_a_model_too_large_for_this_machine_stops_before_writing_anything(tmp_path, chat_model):
    """The installed command, on a model whose config says 300B parameters: the memory check refuses
    it, names the step and the sizes, and no GGUF file is started (its weights are never read)."""
    model = tmp_path / "huge"
    shutil.copytree(chat_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=16384, intermediate_size=53248, num_hidden_layers=96, num_attention_heads=128,
                  num_key_value_heads=8, head_dim=128)
    (model / "config.json").write_text(json.dumps(config))
    r = run_cli("export", str(model), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "export verification: needs about" in r.stderr and "is free" in r.stderr
    assert not list((tmp_path / "out").glob("*.gguf*"))
