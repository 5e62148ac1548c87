"""Perplexity on held-out text, for Hugging Face models and GGUF files alike, so a base model, its
fine-tune and its quantized export are measured on the same tokens the same way.

Text comes from a file, a dataset (its `text` column), or the validation shards of `prepare`. It is
cut into non-overlapping windows of `context` tokens; every token after the first of a window is
scored. Windows are identical across backends because the token ids are computed once, with the HF
tokenizer, and fed to llama.cpp as ids.

An HF model runs in bf16 on the GPU when there is one, in fp32 on CPU otherwise, after a check that it
fits (fabrika.models.reference); a GGUF file runs with llama.cpp's defaults, as it would be served.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fabrika.errors import FabrikaError
from fabrika.models.refs import parse_ref
from fabrika.models.reference import check_fits, load_reference, model_parts, model_size, reference_placement


def token_ids(source: str, tokenizer, max_tokens: int) -> list[int]:
    p = Path(source)
    if (p / "index.json").exists():  # prepared shards: use the validation split as it was held out
        from fabrika.data.corpus import open_split

        shards = open_split(p, "val") or open_split(p, "train")
        ids = np.concatenate([np.asarray(s[:max_tokens]) for s in shards])[:max_tokens]
        return [int(i) for i in ids]
    if p.is_file() and p.suffix in (".txt", ".md"):
        text = p.read_text(encoding="utf-8", errors="replace")
    else:
        from fabrika.data.sources import load_dataset_any

        ds = load_dataset_any(source)
        if "text" not in ds.column_names:
            raise FabrikaError(f"perplexity.data: {source} has no `text` column ({', '.join(ds.column_names)})")
        text, total = [], 0
        for row in ds:
            text.append(row["text"])
            total += len(row["text"])
            if total > max_tokens * 8:
                break
        text = "\n\n".join(text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise FabrikaError(f"perplexity.data: {source} yields fewer than 2 tokens")
    return ids


def windows(ids: list[int], context: int) -> list[list[int]]:
    return [ids[i:i + context] for i in range(0, len(ids) - 1, context) if len(ids[i:i + context]) > 1]


def hf_perplexity(model_dir: str, ids: list[int], context: int) -> dict[str, Any]:
    import torch

    placement = reference_placement()
    params, vocab, _ = model_size(model_dir)
    check_fits("perplexity", model_parts(params, placement, context * vocab, copies=1),
               "Use a GGUF export of the model (gguf:FILE), a shorter context, or a machine with a GPU "
               "(the model then runs there in bf16) or more free RAM.")
    model = load_reference(model_dir, placement)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows(ids, context):
            x = torch.tensor([w], device=model.device)
            logits = model(x).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += len(w) - 1
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, **placement.as_dict()}


def gguf_perplexity(path: str, ids: list[int], context: int) -> dict[str, Any]:
    from fabrika.infer.llamacpp import load_llama

    llm = load_llama(path, n_ctx=context + 8, logits_all=True)  # every position is scored
    nll, n = 0.0, 0
    for w in windows(ids, context):
        llm.reset()
        llm.eval(w)
        logits = np.array(llm.scores[: len(w) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}


def perplexity(model_ref: str, source: str, context: int = 512, max_tokens: int = 16384,
               tokenizer_dir: str | None = None) -> dict[str, Any]:
    """`model_ref` is hf:DIR, gguf:FILE, or a bare directory / .gguf path: the models whose every logit
    fabrika can read (an API or vLLM model returns at most a few log-probabilities per token)."""
    from transformers import AutoTokenizer

    ref = parse_ref(model_ref)
    if ref.kind not in ("hf", "gguf"):
        raise FabrikaError(f"perplexity of {model_ref}: needs the model's full logits, so an hf: model or a gguf: "
                           "file (a vllm: model is measured as hf:, an API model cannot be)")
    kind, path = ref.kind, ref.path
    if kind == "gguf" and not tokenizer_dir:
        raise FabrikaError("perplexity on a GGUF file needs the HF tokenizer it came from (tokenizer: DIR), so that "
                           "both backends score the same token ids")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or path)
    ids = token_ids(source, tok, max_tokens)
    result = gguf_perplexity(path, ids, context) if kind == "gguf" else hf_perplexity(path, ids, context)
    return {**result, "context": context, "source": source}
