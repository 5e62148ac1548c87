"""Shared fixtures: a small slice of the shipped corpus, a tokenizer trained on it and token shards,
each built once per test session through the real stages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import CORPUS, make_chat_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def own_response_cache(tmp_path, monkeypatch):
    """Each test (and the fabrika processes it starts) gets its own response cache, never the user's."""
    monkeypatch.setenv("FABRIKA_CACHE_DIR", str(tmp_path / "response-cache"))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~150 KB in three languages: enough for a tokenizer and a few hundred training sequences."""
    d = tmp_path_factory.mktemp("corpus")
    text = (CORPUS / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    (d / "en.txt").write_text(text[:80_000], encoding="utf-8")
    ru = sorted((CORPUS / "ru").glob("*.txt"))[:3]
    (d / "ru.txt").write_text("\n\n".join(p.read_text(encoding="utf-8")[:15_000] for p in ru), encoding="utf-8")
    (d / "zh.jsonl").write_text((CORPUS / "zh" / "lunyu.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, small_corpus) -> Path:
    from fabrika.artifacts import RunContext
    from fabrika.models import tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    cfg = tokenizer.CONFIG(paths=[str(small_corpus)], vocab_size=1024)
    return tokenizer.run(cfg, RunContext(stage="tokenizer", kind="tokenizer", stage_dir=out, quiet=True)).path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_tokenizer, small_corpus) -> Path:
    from fabrika.artifacts import RunContext
    from fabrika.data import corpus

    out = tmp_path_factory.mktemp("prepared")
    cfg = corpus.CONFIG(tokenizer=str(tiny_tokenizer), paths=[str(small_corpus)], shard_mb=0.05, val_fraction=0.05)
    return corpus.run(cfg, RunContext(stage="prepare", kind="prepare", stage_dir=out, quiet=True)).path


@pytest.fixture(scope="session")
def plain_base(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has no chat tokens: fine-tuning must add them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("plain_base")
    text = (CORPUS / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:40_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_chat_model(tmp_path_factory.mktemp("chat_model"), tiny_tokenizer)


@pytest.fixture(scope="session")
def server(chat_model):
    from fabrika.infer.local import serve_in_background

    with serve_in_background(f"hf:{chat_model}", name="tiny") as handle:
        yield handle
