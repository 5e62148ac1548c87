"""GGUF export checked by llama.cpp itself: tiny models of every supported architecture and both
tokenizer kinds are converted, loaded by llama-cpp-python and compared with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, run_cli, run_fabrika

from fabrika.artifacts import Artifact, RunContext
from fabrika.errors import FabrikaError
from fabrika.export import gguf as writer
from fabrika.export import stage, verify
from fabrika.infer.llamacpp import load_llama

pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the test install (make test)")

DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def sharpen(model) -> None:
    """Scale Q and K so attention is far from uniform: a wrong rotary layout then shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "c_attn.weight")):
                p.mul_(8.0)


def build(arch: str, tok, out: Path, **dims) -> Path:
    from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, MixtralConfig,
                              Qwen2Config)

    special = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    d = {**DIMS, **dims}
    configs = {
        "llama": lambda: LlamaConfig(**d, **special, tie_word_embeddings=False),
        "mistral": lambda: MistralConfig(**d, **special, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**d, **special, tie_word_embeddings=True),
        "mixtral": lambda: MixtralConfig(**d, **special, num_local_experts=4, num_experts_per_tok=2),
        "gpt2": lambda: GPT2Config(n_embd=d["hidden_size"], n_layer=2, n_head=4, n_positions=512, **special),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[arch]())
    sharpen(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bpe_tok(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def parity(model_dir: Path, gguf_path: Path) -> dict:
    files = {"f32": gguf_path}
    return verify.verify(model_dir, files, max_tokens=128)["files"]["f32"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "mixtral", "gpt2"])
def test_f32_logits_match_transformers(tmp_path, bpe_tok, arch):
    model_dir = build(arch, bpe_tok, tmp_path / arch)
    report = writer.convert(model_dir, tmp_path / "m.gguf", "f32")
    assert report["architecture"] == writer.ARCHS[arch] and not report["fallbacks"]
    row = parity(model_dir, tmp_path / "m.gguf")
    assert row["max_abs_diff"] < 1e-3, row
    assert row["top1"] == 1.0 and row["kl"] < 1e-6
    assert all(row["tokenizer_parity"].values()), row["tokenizer_parity"]  # en, ru, zh and a ChatML chat


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    text = (CORPUS / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    ru = sorted((CORPUS / "ru").glob("*.txt"))[0].read_text(encoding="utf-8")[:30_000]
    (tmp_path / "train.txt").write_text(text + "\n" + ru, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=800, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    tok_dir = tmp_path / "sp-tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model_dir = build("llama", tok, tmp_path / "sp-llama")
    (model_dir / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    writer.convert(model_dir, tmp_path / "sp.gguf", "f32")
    llm = load_llama(tmp_path / "sp.gguf", 256)
    for sample in ("To be, or not to be: that is the question.", "Мой дядя самых честных правил"):
        assert llm.tokenize(sample.encode(), add_bos=False) == tok(sample, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(sample.encode()) == tok(sample)["input_ids"]  # BOS first, as add_bos_token says
    row = parity(model_dir, tmp_path / "sp.gguf")
    assert row["top1"] == 1.0 and row["max_abs_diff"] < 1e-3


def test_export_stage_quantizes_and_verifies(tmp_path, bpe_tok):
    # hidden 256 so that K-quants apply to the attention weights; the FFN (512) too
    model_dir = build("llama", bpe_tok, tmp_path / "llama", hidden_size=256, intermediate_size=512)
    out = tmp_path / "out"
    r = run_fabrika("export", str(model_dir), "--quant", "f16,q8_0,q4_k_m,q6_k", "--set", "base_type=f32",
                    "--out", str(out), env={"COLUMNS": "250"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "verification.json").read_text())
    files = rep["verification"]["files"]
    assert set(files) == {"f16", "q8_0", "q4_k_m", "q6_k"}
    assert sorted(p.name for p in out.glob("*.gguf")) == [f"model-{q}.gguf" for q in ("f16", "q4_k_m", "q6_k", "q8_0")]
    assert files["f16"]["kl"] < files["q8_0"]["kl"] + 1e-6 < files["q4_k_m"]["kl"] + 2e-6
    assert files["q4_k_m"]["bytes"] < files["q8_0"]["bytes"] < files["f16"]["bytes"]
    assert "Q4_K" in rep["tensor_types"]["q4_k_m"] and "Q6_K" in rep["tensor_types"]["q6_k"]
    assert files["q4_k_m"]["llama_cpp_range"] == "KL 0.0127–0.0313, top-1 0.919–0.947, PPL ×1.014–1.028"
    assert files["f16"]["verdict"].startswith("lossless")
    # the original model ran where the memory check allowed, and the report says where (a tiny model fits)
    placement = {"device": "cuda", "dtype": "bfloat16"} if torch.cuda.is_available() else {"device": "cpu",
                                                                                          "dtype": "float32"}
    assert rep["verification"]["reference"] == placement and rep["verification"]["windows"] == 1
    assert f"original in {placement['dtype']} on {placement['device']}" in r.stdout
    # what the user reads: every file with its numbers, the range llama.cpp reports, and what they mean
    lines = {q: next(line for line in r.stdout.splitlines() if f"model-{q}.gguf" in line) for q in files}
    assert "KL 0.0127–0.0313" in lines["q4_k_m"] and files["q4_k_m"]["verdict"][:30] in lines["q4_k_m"]
    assert "KL 0.0004–0.0014" in lines["q8_0"] and "lossless" in lines["f16"]
    for name in verify.MEANING:
        assert f"{name}: " in r.stdout
    art = Artifact.load(out)
    assert art.path == out / "model-f16.gguf" and "q4_k_m_kl" in art.metrics
    assert art.metrics["reference"] == placement
    mf = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in mf and 'PARAMETER stop "<|im_end|>"' in mf


def test_trained_chat_model_stops_in_llama_cpp(tmp_path, plain_base):
    """The template contract end to end: SFT, export, and llama.cpp's own chat formatting."""
    from helpers import write_jsonl

    from fabrika.train import sft

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Who are you?"},
                                                            {"role": "assistant", "content": "I am fabrika."}]}] * 8)
    cfg = sft.CONFIG(model=str(plain_base), data=str(data), method="lora", lora={"r": 8, "alpha": 16},
                     max_length=64, eval_fraction=0,
                     train={"max_steps": 60, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0,
                            "eval_steps": None, "save_steps": 1000})
    art = sft.run(cfg, RunContext(stage="sft", kind="sft", stage_dir=tmp_path / "sft", quiet=True))
    # export the *adapter*: the stage merges it onto its base first
    ecfg = stage.CONFIG(model=str(tmp_path / "sft" / "adapter"), quant=["f16"])
    exp = stage.run(ecfg, RunContext(stage="export", kind="export", stage_dir=tmp_path / "exp", quiet=True))
    llm = load_llama(exp.path, 256)
    out = llm.create_chat_completion([{"role": "user", "content": "Who are you?"}], max_tokens=30, temperature=0)
    choice = out["choices"][0]
    assert choice["message"]["content"].strip() == "I am fabrika." and choice["finish_reason"] == "stop"
    assert art.path.name == "model"


def test_unsupported_and_corrupt_models(tmp_path, bpe_tok):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(bpe_tok), hidden_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=128)).save_pretrained(neox)
    with pytest.raises(FabrikaError, match="gpt_neox.*supported: llama"):
        writer.convert(neox, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf*"))

    bad = build("llama", bpe_tok, tmp_path / "bad")
    blob = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(FabrikaError, match="model.safetensors"):
        writer.convert(bad, tmp_path / "y.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*.tmp"))

    r = run_cli("export", str(build("llama", bpe_tok, tmp_path / "ok")), "--quant", "q4_k_zz", "--out",
                str(tmp_path / "e"))
    assert r.returncode == 2 and "unknown type" in r.stderr and "q4_k_m" in r.stderr
    r = run_cli("export", str(tmp_path / "ok"), "--imatrix", "calib.txt", "--out", str(tmp_path / "e2"))
    assert r.returncode == 2 and "export.imatrix: calib.txt is not a file" in r.stderr


def test_quantization_with_an_importance_matrix(tmp_path, bpe_tok):
    model_dir = build("llama", bpe_tok, tmp_path / "llama", hidden_size=256, intermediate_size=512)
    plain = stage.run(stage.CONFIG(model=str(model_dir), quant="q4_k_m"),
                      RunContext(stage="export", kind="export", stage_dir=tmp_path / "plain", quiet=True))
    r = run_cli("export", str(model_dir), "--quant", "q4_k_m", "--imatrix", "builtin", "--out", str(tmp_path / "im"),
                "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "im" / "verification.json").read_text())
    assert "blk.0.attn_q.weight" in rep["imatrix"]["tensors"] and "blk.1.ffn_down.weight" in rep["imatrix"]["tensors"]
    weighted = (tmp_path / "im" / "model-q4_k_m.gguf").read_bytes()
    assert weighted != (plain.dir / "model-q4_k_m.gguf").read_bytes()  # the quantizer used the matrix
    baseline = json.loads((plain.dir / "verification.json").read_text())["verification"]["files"]["q4_k_m"]
    assert rep["verification"]["files"]["q4_k_m"]["kl"] < 1.5 * baseline["kl"]  # a sane matrix: no worse
    assert "imatrix" not in json.loads((plain.dir / "verification.json").read_text())
