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
