"""Train a byte-level BPE tokenizer (GPT-2 style, what llama.cpp calls pre-tokenizer `gpt-2`) with a
chat template, saved so that `AutoTokenizer.from_pretrained` and `apply_chat_template` just work.

    fabrika tokenizer data/corpus --vocab-size 8192 --out runs/x/tokenizer

or as the `tokenizer` stage of a pipeline. Every byte is in the initial alphabet, so any text in any
language encodes without unknown tokens; the special tokens include the chat template's, so models
pretrained with it can be fine-tuned for chat without resizing embeddings.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from pydantic import Field

from fabrika.artifacts import Artifact, RunContext
from fabrika.data.text_sources import ReadStats, TextSources, iter_documents
from fabrika.errors import FabrikaError
from fabrika.models.templates import get_template

TOKENIZER_DIR = "tokenizer"


class TokenizerConfig(TextSources):
    vocab_size: int = Field(8192, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Merges need at least this many occurrences.")
    bos_token: str = Field("<|endoftext|>", description="Beginning-of-sequence token.")
    eos_token: str = Field("<|endoftext|>", description="End-of-document token (separates documents in prepare).")
    pad_token: str = Field("<|pad|>", description="Padding token.")
    extra_special_tokens: list[str] = Field(default_factory=list, description="More special tokens.")
    chat_template: str = Field("chatml", description="chatml, llama3 or mistral: its tokens become special tokens.")
    max_train_bytes: int = Field(512 * 2**20, ge=1, description="Text used for training at most (bytes).")
    model_max_length: int = Field(4096, ge=8, description="Longest sequence the tokenizer reports.")


CONFIG = TokenizerConfig


def inputs(cfg: TokenizerConfig) -> list[str]:
    return [*cfg.paths, *([cfg.dataset] if cfg.dataset else [])]


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    template = get_template(cfg.chat_template)
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
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=not ctx.quiet)
    tok.train_from_iterator(capped(), trainer)
    if stats.documents == 0:
        raise FabrikaError(f"paths/dataset: no text found in {', '.join(cfg.paths) or cfg.dataset}")

    template = get_template(cfg.chat_template)
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
