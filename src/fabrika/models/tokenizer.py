"""Train a byte-level BPE tokenizer with a chat template, saved so that `AutoTokenizer.from_pretrained`
and `apply_chat_template` just work.

    fabrika tokenizer data/corpus --vocab-size 8192 --out runs/x/tokenizer

or as the `tokenizer` stage of a pipeline. Every byte is in the initial alphabet, so any text in any
language encodes without unknown tokens; the special tokens include the chat template's, so models
pretrained with it can be fine-tuned for chat without resizing embeddings.

Two pre-tokenizers (how text is cut before BPE merges apply), both known to llama.cpp by name:
`gpt2` (GPT-2's regex; runs of digits stay together) and `qwen2` (Qwen2's regex: digits one by one,
NFC normalization). The choice matters beyond taste: transformers loads every `qwen2` model with its
own Qwen2Tokenizer, which rebuilds the pre-tokenizer from Qwen2's regex whatever tokenizer.json says,
so a Qwen2-architecture model only keeps the tokenization it was trained with if that was `qwen2`.
`check_loads_back` proves, for a tokenizer and a model config, that the model directory will load
the same tokenization; pretraining calls it before the first step and after saving.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from typing import Any, Iterator, Literal

from pydantic import Field

from fabrika.artifacts import Artifact, RunContext
from fabrika.data.text_sources import ReadStats, TextSources, iter_documents
from fabrika.errors import FabrikaError
from fabrika.models.templates import TEMPLATES, TemplateName

TOKENIZER_DIR = "tokenizer"


class TokenizerConfig(TextSources):
    vocab_size: int = Field(8192, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Merges need at least this many occurrences.")
    bos_token: str = Field("<|endoftext|>", description="Beginning-of-sequence token.")
    eos_token: str = Field("<|endoftext|>", description="End-of-document token (separates documents in prepare).")
    pad_token: str = Field("<|pad|>", description="Padding token.")
    extra_special_tokens: list[str] = Field(default_factory=list, description="More special tokens.")
    chat_template: TemplateName = Field("chatml", description="chatml, llama3 or mistral: its tokens become special tokens.")
    pre_tokenizer: Literal["gpt2", "qwen2"] = Field(
        "gpt2", description="gpt2 (digit runs kept whole) or qwen2 (digits one by one, NFC): qwen2 models need qwen2.")
    max_train_bytes: int = Field(512 * 2**20, ge=1, description="Text used for training at most (bytes).")
    model_max_length: int = Field(4096, ge=8, description="Longest sequence the tokenizer reports.")


CONFIG = TokenizerConfig


def inputs(cfg: TokenizerConfig) -> list[str]:
    return [*cfg.paths, *([cfg.dataset] if cfg.dataset else [])]


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    template = TEMPLATES[cfg.chat_template]
    tokens = [cfg.bos_token, cfg.eos_token, cfg.pad_token, *template.special_tokens, *cfg.extra_special_tokens]
    return list(dict.fromkeys(tokens))


def estimate(cfg: TokenizerConfig, ctx: RunContext) -> dict[str, Any]:
    from fabrika.data.text_sources import resolve_files

    size = sum(f.stat().st_size for f in resolve_files(cfg.paths)) if cfg.paths else None
    return {"vocab": cfg.vocab_size, "train_bytes": min(size, cfg.max_train_bytes) if size else "stream"}


def run(cfg: TokenizerConfig, ctx: RunContext) -> Artifact:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(cfg)
    minimum = 256 + len(specials)
    if cfg.vocab_size < minimum:
        raise FabrikaError(f"vocab_size: {cfg.vocab_size} cannot hold the 256 byte tokens and {len(specials)} "
                           f"special tokens; use at least {minimum}")
    stats = ReadStats()
    t0 = time.time()

    def capped() -> Iterator[str]:
        used = 0
        for doc in iter_documents(cfg, stats):
            yield doc
            used += len(doc.encode("utf-8"))
            if used >= cfg.max_train_bytes:
                return

    tok = Tokenizer(models.BPE())
    set_pre_tokenizer(tok, cfg.pre_tokenizer)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  # the Rust bar writes to the terminal's descriptor, past run.log and
                                  # the live line: only where stage output is shown on the terminal
                                  show_progress=not ctx.quiet and sys.stderr.isatty())
    tok.train_from_iterator(capped(), trainer)
    if stats.documents == 0:
        raise FabrikaError(f"paths/dataset: no text found in {', '.join(cfg.paths) or cfg.dataset}")

    template = TEMPLATES[cfg.chat_template]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=cfg.bos_token, eos_token=cfg.eos_token,
                                   pad_token=cfg.pad_token, model_max_length=cfg.model_max_length,
                                   additional_special_tokens=[t for t in specials
                                                              if t not in (cfg.bos_token, cfg.eos_token, cfg.pad_token)])
    fast.chat_template = template.jinja
    out = ctx.stage_dir / TOKENIZER_DIR
    fast.save_pretrained(out)

    sample = "The quick brown fox. Быстрая лиса. 敏捷的狐狸。"
    metrics = {"vocab_size": len(fast), "documents": stats.documents, "train_bytes": stats.bytes_read,
               "undecodable_bytes": stats.undecodable_bytes, "seconds": round(time.time() - t0, 2),
               "chars_per_token": round(len(sample) / len(fast(sample)["input_ids"]), 3)}
    return ctx.finish(out, cfg, metrics=metrics)


def set_pre_tokenizer(tok, name: str) -> None:
    """`gpt2`: byte-level with GPT-2's regex. `qwen2`: exactly the normalizer and pre-tokenizer that
    transformers' Qwen2Tokenizer builds (with its own regex constant), so loading through that class
    changes nothing."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if name == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# Text whose ids differ between pre-tokenizers as soon as the vocabulary holds merges across their
# boundaries (digit runs, punctuation before letters, contractions): shown when a check fails.
PROBE = "In 1984, 12,345 people paid $3.50 (\"rent\")... Don't! x=(a+b)/2; 'tis 2024-11-30."


def tokenization(tok) -> dict[str, Any]:
    """What decides a tokenizer's ids for plain text: normalizer, pre-tokenizer, BPE vocabulary and
    merges, and the added tokens, read from the backend that transformers actually built."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer"),
            "model": model.get("type"), "vocab": model.get("vocab"), "merges": merges,
            "added": sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])}


def check_loads_back(tok, hf_config, setting: str, model_dir: str | None = None) -> None:
    """Refuse a model whose directory loads another tokenization than `tok`: transformers picks the
    tokenizer class from the model's type as well as from tokenizer_config.json (a `qwen2` model always
    gets Qwen2Tokenizer). Without `model_dir` the tokenizer and the config are saved together in a
    scratch directory first, so the check runs before any training; either way they are loaded back
    exactly as every later step (fine-tuning, chat, evaluation, export) will load them."""
    from transformers import AutoTokenizer

    if model_dir is not None:
        loaded = AutoTokenizer.from_pretrained(model_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="fabrika-tok-") as d:
            tok.save_pretrained(d)
            hf_config.save_pretrained(d)
            loaded = AutoTokenizer.from_pretrained(d)
    mine, theirs = tokenization(tok), tokenization(loaded)
    differ = [k for k in mine if mine[k] != theirs[k]]
    if not differ:
        return
    ids = tok(PROBE, add_special_tokens=False)["input_ids"]
    loaded_ids = loaded(PROBE, add_special_tokens=False)["input_ids"]
    hint = (" Train the tokenizer with `pre_tokenizer: qwen2` (fabrika tokenizer --set pre_tokenizer=qwen2) and "
            "prepare the data again, or choose another architecture."
            if hf_config.model_type == "qwen2" else "")
    raise FabrikaError(
        f"{setting}: a {hf_config.model_type} model directory loads its tokenizer as {type(loaded).__name__}, whose "
        f"{' and '.join(differ)} differ from the tokenizer the data was prepared with ({type(tok).__name__}); "
        f"the model would be trained on one tokenization and used with another (e.g. {PROBE!r}: {ids[:16]} "
        f"vs {loaded_ids[:16]}).{hint}")
