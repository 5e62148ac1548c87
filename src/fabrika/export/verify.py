"""Proof that a GGUF file is the model it came from: llama.cpp itself loads it and its next-token
distributions are compared with the Hugging Face model's on fixed calibration text.

Top-1 agreement, mean KL divergence and perplexity per file; tokenizer parity on English, Russian,
Chinese, numbers with punctuation (where pre-tokenizer regexes disagree) and a rendered chat; and
whether llama.cpp treats the end-of-turn token as end of generation.
For F32/F16/BF16 files any real disagreement is a conversion bug, so `check_lossless` fails the export.
"""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fabrika.errors import FabrikaError
from fabrika.models.tokenizer import PROBE

# Mean KL (nats/token) above which an unquantized file is wrong, not merely rounded: llama.cpp's
# f16 matmuls stay far below this on real models; a missing Q/K permutation or a wrong tensor is far above.
LOSSLESS_KL = {"f32": 1e-4, "f16": 2e-3, "bf16": 1e-2}

# What llama.cpp measured for each type against FP16 on Wikitext, without an importance matrix
# (llama.cpp, tools/perplexity/README.md: "LLaMA 3 8b Scoreboard" and "LLaMA 2 vs. LLaMA 3
# Quantization comparison"). Where that page gives both models, (Llama-2-7B, Llama-3-8B) bound what a
# healthy file of the type shows: mean KL divergence, top-token agreement ("Same top p") and the
# perplexity ratio; for the other types it gives Llama-3-8B's mean KL alone, the upper end.
LLAMA_CPP_REFERENCE: dict[str, dict[str, tuple[float | None, float]]] = {
    "q8_0": {"kl": (0.000369, 0.001355), "top1": (0.97674, 0.98846), "ppl_ratio": (1.000425, 1.000689)},
    "q6_k": {"kl": (0.002098, 0.005452), "top1": (0.96031, 0.97520), "ppl_ratio": (1.002406, 1.003490)},
    "q4_k_m": {"kl": (0.012686, 0.031273), "top1": (0.91901, 0.94665), "ppl_ratio": (1.014242, 1.028160)},
    "q2_k": {"kl": (0.108903, 0.445132), "top1": (0.71138, 0.85584), "ppl_ratio": (1.107955, 1.564849)},
    **{q: {"kl": (None, kl)} for q, kl in {
        "q5_k_m": 0.010762, "q5_k_s": 0.016595, "q5_1": 0.018045, "q5_0": 0.022239, "q4_k_s": 0.043136,
        "q4_1": 0.071683, "q4_0": 0.071940, "q3_k_l": 0.087176, "q3_k_m": 0.101913, "q3_k_s": 0.228217}.items()},
}
MEANING = {
    "top-1": "share of calibration tokens where the file and the original model predict the same next token "
             "(1.000 = always)",
    "KL": "mean KL divergence of the file's next-token distribution from the original's, nats per token "
          "(0 = identical)",
    "PPL": "perplexity of the calibration text under the file, and the ratio to the original model's "
           "(1.000 = no loss)",
    "llama.cpp range": "what llama.cpp measured for this type on Llama-2-7B and Llama-3-8B "
                       "(llama.cpp tools/perplexity/README.md); worse than that: small or undertrained models "
                       "lose more to quantization, a larger type or an importance matrix (--imatrix builtin) helps",
}


def against_reference(qtype: str, row: dict[str, Any]) -> str:
    """Whether a file's numbers are within what llama.cpp reports for its type, in words."""
    if qtype in LOSSLESS_KL:
        return f"lossless: KL within {LOSSLESS_KL[qtype]:.0e}" if row["kl"] <= LOSSLESS_KL[qtype] else "conversion error"
    ref = LLAMA_CPP_REFERENCE.get(qtype)
    if ref is None:
        return "llama.cpp publishes no reference for this type"
    measured = {"kl": row["kl"], "top1": row["top1"], "ppl_ratio": row["ppl"] / row["hf_ppl"]}
    worse = [{"kl": "KL", "top1": "top-1", "ppl_ratio": "PPL"}[k] for k, (lo, hi) in ref.items()
             if (measured[k] < lo if k == "top1" else measured[k] > hi)]
    return "within llama.cpp's range" if not worse else f"{', '.join(worse)} worse than llama.cpp's range"


def reference_text(qtype: str) -> str:
    ref = LLAMA_CPP_REFERENCE.get(qtype)
    if ref is None:
        return f"KL ≤ {LOSSLESS_KL[qtype]:.0e}" if qtype in LOSSLESS_KL else "—"
    parts = []
    for key, (lo, hi) in ref.items():
        if key == "top1":
            parts.append(f"top-1 {lo:.3f}–{hi:.3f}")
        elif key == "ppl_ratio":
            parts.append(f"PPL ×{lo:.3f}–{hi:.3f}")
        else:
            parts.append(f"KL {lo:.4f}–{hi:.4f}" if lo is not None else f"KL ≤ {hi:.4f}")
    return ", ".join(parts)


def calibration_text(spec: str = "builtin", setting: str = "export.verify.calibration") -> str:
    if spec == "builtin":
        return resources.files("fabrika.export").joinpath("calibration.txt").read_text(encoding="utf-8")
    p = Path(spec)
    if not p.is_file():
        raise FabrikaError(f"{setting}: {spec} is not a file (or use 'builtin')")
    return p.read_text(encoding="utf-8")


def load_llama(path: str | Path, n_ctx: int, logits_all: bool = True):
    try:
        import llama_cpp
    except ImportError:
        raise FabrikaError("GGUF verification needs llama-cpp-python: pip install 'fabrika[llama]'") from None
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                           n_threads=max(1, min(4, (os.cpu_count() or 2) - 1)),
                           type_k=0, type_v=0)  # f32 KV cache: tight comparisons need it


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def compare(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict[str, float]:
    lp, lq = _log_softmax(ref.astype(np.float64)), _log_softmax(got.astype(np.float64))
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    nxt = np.array(ids[1:])
    nll = -lq[np.arange(len(nxt)), nxt].mean()
    ref_nll = -lp[np.arange(len(nxt)), nxt].mean()
    return {"top1": float((ref.argmax(-1) == got.argmax(-1)).mean()), "kl": max(kl, 0.0),
            "max_abs_diff": float(np.abs(ref - got).max()), "ppl": float(math.exp(nll)),
            "hf_ppl": float(math.exp(ref_nll))}


def tokenizer_parity(llm, tok, samples: dict[str, str]) -> dict[str, bool]:
    out = {}
    for name, text in samples.items():
        hf = tok(text, add_special_tokens=False)["input_ids"]
        cpp = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        out[name] = hf == cpp
    return out


def eog_ok(llm, token_id: int | None) -> bool | None:
    """Whether llama.cpp stops generating at this token (the end-of-turn of the chat template)."""
    if token_id is None:
        return None
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return bool(llama_cpp.llama_vocab_is_eog(vocab, token_id))


def verify(model_dir: str | Path, files: dict[str, Path], calibration: str = "builtin",
           max_tokens: int = 512) -> dict[str, Any]:
    """Compare every GGUF file with the HF model; returns {type: metrics} plus tokenizer checks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    text = calibration_text(calibration)
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    ids = ids[: min(len(ids), limit)]
    ref = hf_logits(model, ids)

    samples = {lang: part.strip()[:400] for lang, part in zip(("en", "ru", "zh"), text.split("\n\n\n"))}
    samples["numbers"] = PROBE
    if tok.chat_template:
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Привет! 你好?"},
                {"role": "assistant", "content": "Hello."}]
        samples["chat"] = tok.apply_chat_template(chat, tokenize=False)
    gen = model.generation_config.eos_token_id
    eot = (gen[0] if isinstance(gen, list) else gen) if gen is not None else tok.eos_token_id

    report: dict[str, Any] = {"tokens": len(ids), "files": {}}
    for qtype, path in files.items():
        llm = load_llama(path, n_ctx=max(len(ids), 64) + 8)
        row = compare(ref, gguf_logits(llm, ids), ids)
        row["tokenizer_parity"] = tokenizer_parity(llm, tok, samples)
        row["end_of_turn_stops"] = eog_ok(llm, eot)
        row["bytes"] = Path(path).stat().st_size
        row["llama_cpp_range"] = reference_text(qtype)
        row["verdict"] = against_reference(qtype, row)
        report["files"][qtype] = row
        del llm
    return report


def check_lossless(report: dict[str, Any]) -> list[str]:
    """Problems that mean the conversion itself is wrong (not quantization noise)."""
    problems = []
    for qtype, row in report["files"].items():
        if qtype in LOSSLESS_KL and row["kl"] > LOSSLESS_KL[qtype]:
            problems.append(f"{qtype}: mean KL {row['kl']:.2e} against the HF model exceeds {LOSSLESS_KL[qtype]:.0e}")
        bad = [k for k, ok in row["tokenizer_parity"].items() if not ok]
        if bad:
            problems.append(f"{qtype}: llama.cpp tokenizes {', '.join(bad)} differently from transformers")
        if row["end_of_turn_stops"] is False:
            problems.append(f"{qtype}: llama.cpp does not stop at the end-of-turn token")
    return problems
