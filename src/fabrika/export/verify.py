"""Proof that a GGUF file is the model it came from: llama.cpp itself loads it and its next-token
distributions are compared with the Hugging Face model's on fixed calibration text.

Top-1 agreement, mean KL divergence and perplexity per file; tokenizer parity on English, Russian,
Chinese, numbers with punctuation (where pre-tokenizer regexes disagree) and a rendered chat; and
whether llama.cpp treats the end-of-turn token as end of generation.
For F32/F16/BF16 files any real disagreement is a conversion bug, so `check_lossless` fails the export.

The HF model runs in bf16 on the GPU when there is one, else in fp32 on CPU (fabrika.models.reference);
the text is compared window by window, so only one window's full-vocabulary logits are held at a
time, and the memory the comparison needs is checked before anything is loaded.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fabrika.errors import FabrikaError
from fabrika.evaluate.perplexity import windows
from fabrika.infer.llamacpp import F32_KV_CACHE, load_llama, physical_cores
from fabrika.models.reference import (Part, Placement, check_fits, load_reference, model_parts, model_size,
                                     reference_placement)
from fabrika.models.tokenizer import PROBE

# Mean KL (nats/token) above which an unquantized file is wrong, not merely rounded: llama.cpp's
# f16 matmuls stay far below this on real models; a missing Q/K permutation or a wrong tensor is far above.
LOSSLESS_KL = {"f32": 1e-4, "f16": 2e-3, "bf16": 1e-2}
# A bf16 reference (the HF model on a GPU) rounds every activation to 8 bits of mantissa, so it is
# itself off from the exact model by more than an F32 or F16 file is: the bound becomes bf16's own.
# Rounding weights alone to bf16 costs Llama-3-8B a mean KL of 2.5e-5 (llama.cpp PR #7150); bf16
# activations add more, still orders below the errors of a conversion bug (a wrong tensor or a
# missing Q/K permutation: whole nats).
LOSSLESS_KL_BF16_REFERENCE = 1e-2

# Tokens compared in one pass of both models (fewer when the model's context is shorter): only one
# window's full-vocabulary logits are in memory at a time.
WINDOW = 512

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
    "reference": "the original model runs in float32 on CPU, or in bfloat16 on a GPU when there is one; a bfloat16 "
                 f"reference is itself rounded, so files are then held to KL ≤ {LOSSLESS_KL_BF16_REFERENCE:.0e} "
                 "for lossless (not tighter), and small KL differences between files mean less",
    "llama.cpp range": "what llama.cpp measured for this type on Llama-2-7B and Llama-3-8B "
                       "(llama.cpp tools/perplexity/README.md); worse than that: small or undertrained models "
                       "lose more to quantization, a larger type or an importance matrix (--imatrix builtin) helps",
}


def lossless_kl(qtype: str, reference: dict[str, str]) -> float:
    """The mean KL an unquantized file may show against a reference of this dtype."""
    bound = LOSSLESS_KL[qtype]
    return max(bound, LOSSLESS_KL_BF16_REFERENCE) if reference["dtype"] == "bfloat16" else bound


def against_reference(qtype: str, row: dict[str, Any], reference: dict[str, str]) -> str:
    """Whether a file's numbers are within what llama.cpp reports for its type, in words."""
    if qtype in LOSSLESS_KL:
        bound = lossless_kl(qtype, reference)
        note = "" if reference["dtype"] == "float32" else f" of a {reference['dtype']} reference"
        return f"lossless: KL within {bound:.0e}{note}" if row["kl"] <= bound else "conversion error"
    ref = LLAMA_CPP_REFERENCE.get(qtype)
    if ref is None:
        return "llama.cpp publishes no reference for this type"
    measured = {"kl": row["kl"], "top1": row["top1"], "ppl_ratio": row["ppl"] / row["hf_ppl"]}
    worse = [{"kl": "KL", "top1": "top-1", "ppl_ratio": "PPL"}[k] for k, (lo, hi) in ref.items()
             if (measured[k] < lo if k == "top1" else measured[k] > hi)]
    return "within llama.cpp's range" if not worse else f"{', '.join(worse)} worse than llama.cpp's range"


def reference_text(qtype: str, reference: dict[str, str]) -> str:
    ref = LLAMA_CPP_REFERENCE.get(qtype)
    if ref is None:
        return f"KL ≤ {lossless_kl(qtype, reference):.0e}" if qtype in LOSSLESS_KL else "—"
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


def open_for_comparison(path: str | Path, n_ctx: int):
    """llama.cpp set up for a deterministic comparison with the HF model, not with serving's defaults:
    an f32 KV cache (with the f16 default an F32 file's logits differ from HF's by 4e-4, with f32 by
    7e-7, so only f32 lets the tight F32 bound mean anything), every position's logits (all are
    compared), and a thread count of its own (at most 4, one core left free) so that a file's numbers
    do not move when serving's defaults are tuned."""
    return load_llama(path, n_ctx=n_ctx, n_threads=max(1, min(4, physical_cores() - 1)),
                      kv_cache_type=F32_KV_CACHE, logits_all=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float().cpu().numpy()


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


# Rows of a window turned into float64 log-probabilities at a time (each row on its own: the numbers
# do not depend on it), so the comparison's temporaries stay small beside the window's logits.
ROWS = 64


def position_stats(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict[str, np.ndarray]:
    """Per position of one window: KL of the file from the original, whether their top tokens agree,
    the largest logit difference, and (for every position but the last) both models' NLL of the next token."""
    out: dict[str, list[np.ndarray]] = {"kl": [], "same_top": [], "max_abs_diff": [], "nll": [], "ref_nll": []}
    for start in range(0, len(ids), ROWS):
        r, g = ref[start:start + ROWS], got[start:start + ROWS]
        lp, lq = _log_softmax(r.astype(np.float64)), _log_softmax(g.astype(np.float64))
        nxt = np.array(ids[start + 1:start + 1 + len(r)], dtype=np.int64)
        rows = np.arange(len(nxt))
        out["kl"].append((np.exp(lp) * (lp - lq)).sum(-1))
        out["same_top"].append(r.argmax(-1) == g.argmax(-1))
        out["max_abs_diff"].append(np.abs(r - g).max(-1))
        out["nll"].append(-lq[rows, nxt])
        out["ref_nll"].append(-lp[rows, nxt])
    return {k: np.concatenate(v) for k, v in out.items()}


def summarize(windows_stats: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Means over every position of every window (the same numbers as one pass over all the logits)."""
    s = {k: np.concatenate([w[k] for w in windows_stats]) for k in windows_stats[0]}
    return {"top1": float(s["same_top"].mean()), "kl": max(float(s["kl"].mean()), 0.0),
            "max_abs_diff": float(s["max_abs_diff"].max()), "ppl": float(math.exp(s["nll"].mean())),
            "hf_ppl": float(math.exp(s["ref_nll"].mean()))}


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


def window_size(positions: int | None) -> int:
    """Tokens per comparison window for a model that reads at most `positions` tokens."""
    return min(WINDOW, positions or 2048)


def verification_parts(params: int, vocab: int, window: int, gguf_bytes: int, placement: Placement) -> list[Part]:
    """What comparing a GGUF file of `gguf_bytes` with an HF model of `params` parameters holds at once:
    the model, the file memory-mapped, and a window's logits (the model's, llama.cpp's own buffer,
    llama-cpp-python's copy of it, the array read from that)."""
    return [*model_parts(params, placement, window * vocab, copies=4),
            Part("the largest GGUF file, memory-mapped", gguf_bytes)]


def check_verification_fits(size: tuple[int, int, int | None], gguf_bytes: int, max_tokens: int,
                            placement: Placement) -> None:
    """Fail before loading when comparing a file of `gguf_bytes` with the model of `size` (parameters,
    vocabulary, context: `model_size`) would not fit in the memory free now."""
    params, vocab, positions = size
    parts = verification_parts(params, vocab, min(max_tokens, window_size(positions)), gguf_bytes, placement)
    check_fits("export verification", parts, VERIFY_ADVICE)


VERIFY_ADVICE = ("Skip the comparison with verify.enabled: false (--set verify.enabled=false), or run the export "
                 "on a machine with a GPU (the original model then runs there in bf16) or more free RAM.")


def verify(model_dir: str | Path, files: dict[str, Path], calibration: str = "builtin",
           max_tokens: int = 512) -> dict[str, Any]:
    """Compare every GGUF file with the HF model; returns {type: metrics} plus tokenizer checks."""
    placement = reference_placement()
    check_verification_fits(model_size(model_dir), max(Path(p).stat().st_size for p in files.values()), max_tokens,
                            placement)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_reference(model_dir, placement)
    text = calibration_text(calibration)
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    spans = windows(ids, window_size(limit))
    if not spans:
        raise FabrikaError(f"export.verify.calibration: {calibration} gives fewer than 2 tokens")

    samples = {lang: part.strip()[:400] for lang, part in zip(("en", "ru", "zh"), text.split("\n\n\n"))}
    samples["numbers"] = PROBE
    if tok.chat_template:
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Привет! 你好?"},
                {"role": "assistant", "content": "Hello."}]
        samples["chat"] = tok.apply_chat_template(chat, tokenize=False)
    gen = model.generation_config.eos_token_id
    eot = (gen[0] if isinstance(gen, list) else gen) if gen is not None else tok.eos_token_id

    reference = placement.as_dict()
    report: dict[str, Any] = {"tokens": sum(len(w) for w in spans), "windows": len(spans), "reference": reference,
                              "files": {}}
    for qtype, path in files.items():
        llm = open_for_comparison(path, n_ctx=max(max(len(w) for w in spans), 64) + 8)
        # the reference is recomputed for each file rather than kept for the whole text: memory holds
        # one window's logits of each model, however long the calibration text
        row: dict[str, Any] = summarize([position_stats(hf_logits(model, w), gguf_logits(llm, w), w) for w in spans])
        row["tokenizer_parity"] = tokenizer_parity(llm, tok, samples)
        row["end_of_turn_stops"] = eog_ok(llm, eot)
        row["bytes"] = Path(path).stat().st_size
        row["llama_cpp_range"] = reference_text(qtype, reference)
        row["verdict"] = against_reference(qtype, row, reference)
        report["files"][qtype] = row
        del llm
    return report


def check_lossless(report: dict[str, Any]) -> list[str]:
    """Problems that mean the conversion itself is wrong (not quantization noise)."""
    problems = []
    for qtype, row in report["files"].items():
        bound = lossless_kl(qtype, report["reference"]) if qtype in LOSSLESS_KL else None
        if bound is not None and row["kl"] > bound:
            reference = report["reference"]
            problems.append(f"{qtype}: mean KL {row['kl']:.2e} against the HF model ({reference['dtype']} on "
                            f"{reference['device']}) exceeds {bound:.0e}")
        bad = [k for k, ok in row["tokenizer_parity"].items() if not ok]
        if bad:
            problems.append(f"{qtype}: llama.cpp tokenizes {', '.join(bad)} differently from transformers")
        if row["end_of_turn_stops"] is False:
            problems.append(f"{qtype}: llama.cpp does not stop at the end-of-turn token")
    return problems
