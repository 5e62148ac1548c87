"""Architectures and sizes as real Hugging Face configs, so every model fabrika trains loads with
`AutoModelForCausalLM` anywhere, and `plan` counts parameters from the model itself.

Families: llama, mistral, mixtral (MoE, 8 experts, top 2), qwen2, gpt2. Sizes: tiny (tests; dims that
llama.cpp's K-quants accept), 125m, 350m, 1b, 3b, 8b. `llama-8b` is Llama-3-8B's configuration and
`mistral-8b` Mistral-7B's; the others follow each family's published shapes where one exists
(GPT-2 small/medium; Qwen2-0.5B/1.5B/7B; Llama-3.2-1B/3B) and scale them otherwise. Released models
whose shape no scaled size has are sizes of their own family: llama 70b, mistral 7b, mixtral 8x7b,
qwen2 7b and 72b (`fabrika plan --size list`).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Literal

from pydantic import Field, field_validator, model_validator

from fabrika.config import Config
from fabrika.errors import FabrikaError

SIZES = ("tiny", "125m", "350m", "1b", "3b", "8b")

# hidden, layers, heads, kv heads, intermediate
_DENSE = {
    "tiny": (256, 2, 4, 2, 512),
    "125m": (768, 12, 12, 4, 2048),
    "350m": (1024, 24, 16, 4, 2816),
    "1b": (2048, 16, 32, 8, 8192),      # Llama-3.2-1B
    "3b": (3072, 28, 24, 8, 8192),      # Llama-3.2-3B
    "8b": (4096, 32, 32, 8, 14336),     # Llama-3-8B
}
_MOE = {  # mixtral: size names the total parameter count, ~1/3 of it active per token
    "tiny": (256, 2, 4, 2, 256),
    "125m": (512, 8, 8, 4, 768),
    "350m": (768, 12, 12, 4, 1024),
    "1b": (1280, 16, 16, 8, 1920),
    "3b": (2048, 20, 16, 8, 3072),
    "8b": (3072, 24, 32, 8, 4096),
}
_GPT2 = {  # n_embd, n_layer, n_head
    "tiny": (256, 2, 4), "125m": (768, 12, 12), "350m": (1024, 24, 16), "1b": (1600, 36, 25),
    "3b": (2560, 32, 32), "8b": (4096, 40, 32),
}
_QWEN2 = {
    "tiny": (256, 2, 4, 2, 512),
    "125m": (640, 12, 10, 2, 2048),
    "350m": (896, 24, 14, 2, 4864),     # Qwen2-0.5B
    "1b": (1536, 28, 12, 2, 8960),      # Qwen2-1.5B
    "3b": (2048, 36, 16, 2, 11008),     # Qwen2.5-3B
    "8b": (3584, 28, 28, 4, 18944),     # Qwen2-7B
}
VOCAB = {"llama": 128256, "mistral": 32768, "mixtral": 32000, "qwen2": 151936, "gpt2": 50257}

# Released models at their exact shapes (each model's config.json on the Hub), for `plan` and for
# training at a known shape: size -> (released model, (hidden, layers, heads, kv heads, intermediate),
# config attributes that differ from the family's defaults here).
PUBLISHED: dict[str, dict[str, tuple[str, tuple[int, int, int, int, int], dict[str, Any]]]] = {
    "llama": {"70b": ("Meta-Llama-3-70B", (8192, 80, 64, 8, 28672), {})},
    "mistral": {"7b": ("Mistral-7B-v0.1", (4096, 32, 32, 8, 14336),
                       {"vocab_size": 32000, "sliding_window": 4096,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})},
    "mixtral": {"8x7b": ("Mixtral-8x7B-v0.1", (4096, 32, 32, 8, 14336), {})},  # 8 experts, top 2
    "qwen2": {"7b": ("Qwen2-7B", (3584, 28, 28, 4, 18944), {"vocab_size": 152064}),
              "72b": ("Qwen2-72B", (8192, 80, 64, 8, 29568), {"vocab_size": 152064})},
}
# The scaled sizes that are a released model's shape too.
SAME_AS = {("llama", "1b"): "Llama-3.2-1B", ("llama", "3b"): "Llama-3.2-3B", ("llama", "8b"): "Meta-Llama-3-8B",
           ("mistral", "8b"): "Mistral-7B-v0.3", ("qwen2", "350m"): "Qwen2-0.5B", ("qwen2", "1b"): "Qwen2-1.5B",
           ("qwen2", "3b"): "Qwen2.5-3B", ("qwen2", "8b"): "Qwen2-7B (vocabulary 151936)",
           ("gpt2", "125m"): "gpt2", ("gpt2", "350m"): "gpt2-medium"}


def sizes(arch: str) -> list[str]:
    """Every size of a family: the scaled ones, then its released shapes."""
    return [*SIZES, *PUBLISHED.get(arch, {})]


def _dims(table: dict[str, tuple], arch: str, size: str) -> tuple:
    return PUBLISHED[arch][size][1] if size in PUBLISHED.get(arch, {}) else table[size]


def _llama(size: str, vocab: int, positions: int | None):
    from transformers import LlamaConfig

    h, n, heads, kv, inter = _dims(_DENSE, "llama", size)
    return LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
                       intermediate_size=inter, vocab_size=vocab, max_position_embeddings=positions or 8192,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       tie_word_embeddings=size in ("tiny", "125m", "350m", "1b", "3b"))


def _mistral(size: str, vocab: int, positions: int | None):
    from transformers import MistralConfig

    h, n, heads, kv, inter = _dims(_DENSE, "mistral", size)
    return MistralConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=inter, vocab_size=vocab, max_position_embeddings=positions or 32768,
                         sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         tie_word_embeddings=size in ("tiny", "125m", "350m"))


def _mixtral(size: str, vocab: int, positions: int | None):
    from transformers import MixtralConfig

    h, n, heads, kv, inter = _dims(_MOE, "mixtral", size)
    return MixtralConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=inter, vocab_size=vocab, max_position_embeddings=positions or 32768,
                         num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def _qwen2(size: str, vocab: int, positions: int | None):
    from transformers import Qwen2Config

    h, n, heads, kv, inter = _dims(_QWEN2, "qwen2", size)
    return Qwen2Config(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
                       intermediate_size=inter, vocab_size=vocab, max_position_embeddings=positions or 32768,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       tie_word_embeddings=size in ("tiny", "125m", "350m", "1b", "3b"))


def _gpt2(size: str, vocab: int, positions: int | None):
    from transformers import GPT2Config

    h, n, heads = _GPT2[size]
    return GPT2Config(n_embd=h, n_layer=n, n_head=heads, vocab_size=vocab, n_positions=positions or 1024)


Arch = Literal["llama", "mistral", "mixtral", "qwen2", "gpt2"]  # what `model.arch` accepts; ARCHS builds each
ARCHS: dict[Arch, Callable[..., Any]] = {"llama": _llama, "mistral": _mistral, "mixtral": _mixtral, "qwen2": _qwen2,
                                         "gpt2": _gpt2}


def _choice(kind: str, value: str, options) -> None:
    if value not in options:
        guess = difflib.get_close_matches(value, list(options), n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise FabrikaError(f"unknown {kind} {value!r}{hint} (choose from {', '.join(options)})")


def make_config(arch: str, size: str, vocab_size: int | None = None, max_position_embeddings: int | None = None,
                **overrides: Any):
    """A Hugging Face config for a preset; `overrides` are attributes of that config."""
    _choice("architecture", arch, ARCHS)
    _choice(f"{arch} size", size, sizes(arch))
    published = PUBLISHED.get(arch, {}).get(size, ("", (), {}))[2]
    config = ARCHS[arch](size, vocab_size or published.get("vocab_size") or VOCAB[arch], max_position_embeddings)
    for key, value in published.items():
        if key != "vocab_size":
            setattr(config, key, value)
    known = set(config.to_dict())
    for key, value in overrides.items():
        if key not in known:
            guess = difflib.get_close_matches(key, sorted(known), n=3)
            raise FabrikaError(f"model.overrides.{key}: not a setting of {type(config).__name__}"
                               + (f"; close: {', '.join(guess)}" if guess else ""))
        setattr(config, key, value)
    return config


def count_parameters(config) -> dict[str, int]:
    """Exact counts from the real model built on the meta device (no memory, no formula)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    counts = {"total": total, "embedding": embedding, "non_embedding": total - embedding}
    experts = getattr(config, "num_local_experts", None)
    if experts:
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        counts["active"] = total - expert_params + expert_params * config.num_experts_per_tok // experts
    return counts


class ModelSpec(Config):
    arch: Arch = Field("llama", description="llama, mistral, mixtral, qwen2 or gpt2.")
    size: str = Field("tiny", description="tiny, 125m, 350m, 1b, 3b or 8b.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="HF config attributes to change.")

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        known = [*SIZES, *dict.fromkeys(s for table in PUBLISHED.values() for s in table)]
        if v not in known:
            raise ValueError(f"unknown size; choose from {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _size_of_family(self):
        if self.size not in sizes(self.arch):
            raise ValueError(f"{self.arch} has no size {self.size}; choose from {', '.join(sizes(self.arch))}")
        return self

    def to_hf_config(self, vocab_size: int, max_position_embeddings: int | None = None):
        return make_config(self.arch, self.size, vocab_size, max_position_embeddings, **self.overrides)


def layer_linears(config: Any, experts: int | None = None) -> list[tuple[int, int]]:
    """(in, out) of every linear projection in one decoder layer: what LoRA adapts and what a token's
    matmul FLOPs come from. `experts` counts MoE experts (all by default; the active ones for FLOPs)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    if experts is None:
        experts = getattr(config, "num_local_experts", None) or 1
    attn = [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h)]
    mlp = [(h, inter), (h, inter), (inter, h)] if config.model_type != "gpt2" else [(h, inter), (inter, h)]
    return attn + mlp * experts
