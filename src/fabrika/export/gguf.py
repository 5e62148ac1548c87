"""Hugging Face model directory → GGUF for llama.cpp, written in-process with the `gguf` package.

Tensors are streamed: the header is written from shapes read without loading any weight, then each
tensor is loaded, transformed, converted and written on its own, so converting a model needs about
its largest tensor in memory, not the whole model. The tokenizer (byte-level BPE or SentencePiece),
its special tokens and the chat template go into the metadata, so llama.cpp tokenizes and formats
exactly as transformers does.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fabrika import __version__
from fabrika.artifacts import replacing
from fabrika.errors import FabrikaError

# HF model_type → GGUF architecture. Mistral and Mixtral are the llama graph in llama.cpp.
ARCHS = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")

# llama.cpp's names for the pre-tokenizer regexes it knows; matched on the HF tokenizer's regex.
GPT2_PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
PRE_TOKENIZERS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}
_GENERATION_TAGS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


@dataclass
class Source:
    """One HF tensor (or several, stacked) as it will be written."""

    gguf_name: str
    hf_names: list[str]
    shape: tuple[int, ...]
    transform: Callable[[list[np.ndarray]], np.ndarray]


# --- reading the HF directory ------------------------------------------------------------------

def load_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.exists():
        raise FabrikaError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise FabrikaError(f"{model_dir}: architecture {model_type!r} cannot be exported to GGUF by fabrika; "
                           f"supported: {', '.join(ARCHS)}")
    return config


def safetensor_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FabrikaError(f"{model_dir}: no *.safetensors weights (re-save the model with safe_serialization=True)")
    return files


_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}  # BF16: raw bits


@functools.lru_cache(maxsize=64)
def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """(data start, tensor table) of a safetensors file: 8-byte little-endian length, then JSON."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            table = json.loads(f.read(n))
        size = file.stat().st_size
        for name, t in table.items():
            if name != "__metadata__" and 8 + n + t["data_offsets"][1] > size:
                raise ValueError(f"tensor {name!r} ends past the end of the file (truncated?)")
    except (OSError, struct.error, ValueError, KeyError, TypeError) as e:
        raise FabrikaError(f"{file}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    table.pop("__metadata__", None)
    return 8 + n, table


def tensor_shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Names and shapes from the safetensors headers, without loading any weight."""
    return {name: (tuple(t["shape"]), f) for f in safetensor_files(model_dir) for name, t in _header(f)[1].items()}


def load_tensor(name: str, file: Path, dtype: type = np.float32) -> np.ndarray:
    """One tensor read block by block with plain file reads (not a memory map, whose touched pages
    would stay in the process's RSS) straight into its `dtype` array: memory holds the result and one
    small block, never a second full-size copy."""
    start, table = _header(file)
    t = table[name]
    if t["dtype"] not in _DTYPES:
        raise FabrikaError(f"{file}: tensor {name!r} has dtype {t['dtype']}; expected F32, F16 or BF16 weights")
    source = np.dtype(_DTYPES[t["dtype"]])
    begin, end = t["data_offsets"]
    n = (end - begin) // source.itemsize
    out = np.empty(n, dtype=dtype)
    block = np.empty(min(n, 1 << 22), dtype=source)
    with open(file, "rb") as f:
        f.seek(start + begin)
        for i in range(0, n, block.size):
            chunk = block[: min(block.size, n - i)]
            if f.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                raise FabrikaError(f"{file}: tensor {name!r} is cut short (truncated file?)")
            out[i:i + chunk.size] = (chunk.astype(np.uint32) << 16).view(np.float32) if t["dtype"] == "BF16" else chunk
    return out.reshape(t["shape"])


# --- architecture-specific tensor plans --------------------------------------------------------

def _permute(n_head: int) -> Callable[[list[np.ndarray]], np.ndarray]:
    """HF stores rotary halves apart; llama.cpp's llama graph wants them interleaved."""
    def f(ws: list[np.ndarray]) -> np.ndarray:
        w = ws[0]
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return f


def _same(ws: list[np.ndarray]) -> np.ndarray:
    return ws[0]


def _transpose(ws: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(ws[0].T)


def plan_tensors(config: dict[str, Any], shapes: dict[str, tuple]) -> list[Source]:
    import gguf

    arch = ARCHS[config["model_type"]]
    n_layer = config.get("num_hidden_layers") or config["n_layer"]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layer)
    n_head = config.get("num_attention_heads") or config.get("n_head")
    n_kv = config.get("num_key_value_heads") or n_head
    plan: list[Source] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}
    for name, (shape, _) in shapes.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers, not weights
        m = re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$", name)
        if m:  # Mixtral checkpoints as published: one tensor per expert, stacked below
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = name
            continue
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if m:  # transformers 5 stores the experts fused
            i = int(m.group(1))
            if m.group(2) == "down_proj":
                plan.append(Source(f"blk.{i}.ffn_down_exps.weight", [name], shape, _same))
            else:
                half = shape[1] // 2
                plan.append(Source(f"blk.{i}.ffn_gate_exps.weight", [name], (shape[0], half, shape[2]),
                                   lambda ws, h=half: np.ascontiguousarray(ws[0][:, :h])))
                plan.append(Source(f"blk.{i}.ffn_up_exps.weight", [name], (shape[0], half, shape[2]),
                                   lambda ws, h=half: np.ascontiguousarray(ws[0][:, h:])))
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise FabrikaError(f"tensor {name!r} has no GGUF counterpart for architecture {arch}; the checkpoint "
                               "has weights fabrika does not know how to export")
        transform = _same
        if arch == "llama" and name.endswith("q_proj.weight"):
            transform = _permute(n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            transform = _permute(n_kv)
        elif arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            transform, shape = _transpose, shape[::-1]
        plan.append(Source(new, [name], shape, transform))
    for (i, w), by_expert in sorted(experts.items()):
        names = [by_expert[e] for e in sorted(by_expert)]
        kind = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}[w]
        plan.append(Source(f"blk.{i}.{kind}.weight", names, (len(names), *shapes[names[0]][0]),
                           lambda ws: np.stack(ws)))
    return plan


def tensor_type(source: Source, outtype: str):
    """Norms, biases and the MoE router stay F32 (as llama.cpp's converter does); Q8_0 needs rows
    that are multiples of its 32-element block, else the tensor falls back to F16."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(source.shape) == 1 or source.gguf_name.endswith("ffn_gate_inp.weight") or outtype == "f32":
        return T.F32, None
    if outtype == "q8_0":
        if source.shape[-1] % 32 == 0:
            return T.Q8_0, None
        return T.F16, "q8_0 needs rows that are multiples of 32"
    return {"f16": T.F16, "bf16": T.BF16}[outtype], None


# --- metadata ----------------------------------------------------------------------------------

def add_model_metadata(w, config: dict[str, Any], arch: str, name: str) -> None:
    w.add_name(name)
    hidden = config.get("hidden_size") or config["n_embd"]
    n_head = config.get("num_attention_heads") or config["n_head"]
    w.add_block_count(config.get("num_hidden_layers") or config["n_layer"])
    w.add_context_length(config.get("max_position_embeddings") or config.get("n_positions"))
    w.add_embedding_length(hidden)
    w.add_head_count(n_head)
    if arch == "gpt2":
        w.add_feed_forward_length(config.get("n_inner") or 4 * hidden)
        w.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
        return
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    rope = config.get("rope_parameters") or {}
    w.add_rope_freq_base(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    head_dim = config.get("head_dim") or hidden // n_head
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if config.get("num_local_experts"):
        w.add_expert_count(config["num_local_experts"])
        w.add_expert_used_count(config["num_experts_per_tok"])


def gguf_chat_template(template: str) -> str:
    """The training template without `{% generation %}` markers, which only transformers understands."""
    return _GENERATION_TAGS.sub("", template)


def add_tokenizer_metadata(w, model_dir: Path) -> dict[str, Any]:
    """Vocabulary, merges or scores, token types, special ids and chat template; returns a summary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    special_ids = set(tok.all_special_ids)
    added = {i for i in tok.added_tokens_decoder}
    sp_file = model_dir / "tokenizer.model"
    if sp_file.exists():
        kind = _add_sentencepiece(w, sp_file, tok, special_ids)
    else:
        kind = _add_bpe(w, model_dir, tok, special_ids, added)
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{role}_token_id")
        if tid is not None:
            getattr(w, f"add_{role}_token_id")(tid)
    eot = _end_of_turn_id(model_dir, tok)
    if eot is not None and eot != tok.eos_token_id:
        w.add_eot_token_id(eot)
    add_bos, add_eos = _adds_special_tokens(tok)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    if tok.chat_template:
        w.add_chat_template(gguf_chat_template(tok.chat_template))
    return {"tokenizer": kind, "vocab": len(tok), "eot_id": eot}


def _adds_special_tokens(tok) -> tuple[bool, bool]:
    """Whether transformers puts BOS in front of (and EOS after) encoded text, read from what it does:
    the `add_bos_token` attribute does not survive save_pretrained for every class, the behaviour does."""
    plain = tok("Hello", add_special_tokens=False)["input_ids"]
    full = tok("Hello")["input_ids"]
    bos = tok.bos_token_id is not None and full[:1] == [tok.bos_token_id] and plain[:1] != [tok.bos_token_id]
    eos = tok.eos_token_id is not None and full[-1:] == [tok.eos_token_id] and plain[-1:] != [tok.eos_token_id]
    return bos, eos


def _token_type(i: int, special_ids: set[int], added: set[int]):
    import gguf

    if i in special_ids:
        return gguf.TokenType.CONTROL
    if i in added:
        return gguf.TokenType.USER_DEFINED
    return gguf.TokenType.NORMAL


def _add_bpe(w, model_dir: Path, tok, special_ids: set[int], added: set[int]) -> str:
    """Vocabulary, merges and pre-tokenizer from the backend transformers built for this directory,
    not from tokenizer.json: for some model types (qwen2) transformers replaces the file's
    pre-tokenizer with its own, and the GGUF must tokenize as the model is used, not as the file says."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise FabrikaError(f"{model_dir}: tokenizer model {model.get('type')!r} is not supported (BPE or SentencePiece)")
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [_token_type(i, special_ids, added) if i in by_id else 5 for i in range(n)]  # 5 = UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(spec, model_dir))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    return "bpe"


def pre_tokenizer_name(spec: dict, model_dir: Path) -> str:
    """llama.cpp's name for this byte-level pre-tokenizer, from its regex. Guessing wrong would tokenize
    differently from transformers without any error, so anything llama.cpp would not reproduce (an
    unknown regex, a prefix space, a normalizer other than NFC) stops the export. NFC passes: text
    already in NFC form, as almost all text is, tokenizes the same without it."""
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise FabrikaError(f"{model_dir}: the tokenizer's normalizer {normalizer.get('type')!r} has no llama.cpp "
                           "counterpart (a byte-level BPE tokenizer without one, or with NFC, is supported)")
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    name = None
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):  # GPT-2's regex built in
        name = "gpt-2"
    elif kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):  # a regex, then bytes
        split = parts[0]
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            regex = split.get("pattern", {}).get("Regex")
            name = "gpt-2" if regex == GPT2_PATTERN else PRE_TOKENIZERS.get(regex)
    if name is None or any(p.get("add_prefix_space") for p in parts):
        raise FabrikaError(f"{model_dir}: the tokenizer's pre-tokenizer is not one llama.cpp knows by name "
                           f"(supported: GPT-2 byte-level, Llama-3, Qwen2; no prefix space)")
    return name


def _add_sentencepiece(w, sp_file: Path, tok, special_ids: set[int]) -> str:
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sp_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i) or i in special_ids:
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    for i in range(sp.vocab_size(), len(tok)):  # tokens added on top of the SentencePiece model
        tokens.append(tok.convert_ids_to_tokens(i))
        scores.append(-1000.0)
        types.append(gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    return "sentencepiece"


def _end_of_turn_id(model_dir: Path, tok) -> int | None:
    """The first eos id of generation_config that is not the plain eos: the template's end of turn."""
    gen = model_dir / "generation_config.json"
    if not gen.exists():
        return None
    ids = json.loads(gen.read_text()).get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids]
    return next((i for i in ids if i is not None), None)


_ABSOLUTE = re.compile(r"^((?:hf|gguf):)?(?:/|~|[A-Za-z]:[\\/])")


def portable(value: Any) -> Any:
    """Lineage without the paths of the machine that exported it: a GGUF file is shared, and the
    absolute path of a model directory names users and hosts. A local path keeps its last part (the
    fingerprints identify the stages); Hub ids and stage names stay as they are."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str):
        m = _ABSOLUTE.match(value)
        if m:
            return (m.group(1) or "") + Path(value[len(m.group(1) or ""):]).name
    return value


# --- the writer --------------------------------------------------------------------------------

def convert(model_dir: str | Path, out: str | Path, outtype: str = "f16", lineage: dict | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write `out` (atomically: a temp name, renamed when complete); returns a conversion report."""
    import gguf

    if outtype not in DIRECT_TYPES:
        raise FabrikaError(f"output type {outtype!r} is not written directly; choose {', '.join(DIRECT_TYPES)} "
                           "(other types come from llama.cpp quantization)")
    model_dir, out = Path(model_dir), Path(out)
    config = load_config(model_dir)
    arch = ARCHS[config["model_type"]]
    shapes = tensor_shapes(model_dir)
    plan = plan_tensors(config, shapes)

    types, fallbacks = [], []
    largest = 0
    with replacing(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            add_model_metadata(w, config, arch, model_dir.name)
            tok_info = add_tokenizer_metadata(w, model_dir)
            w.add_string("fabrika.version", __version__)
            w.add_string("fabrika.source", model_dir.name)
            if lineage:
                w.add_string("fabrika.lineage", json.dumps(portable(lineage), sort_keys=True))
            w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[outtype])

            for s in plan:
                qtype, why = tensor_type(s, outtype)
                if why:
                    fallbacks.append({"tensor": s.gguf_name, "to": "f16", "why": why})
                types.append(qtype)
                nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(s.shape, qtype)))
                w.add_tensor_info(s.gguf_name, s.shape, np.float32, nbytes, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for s, qtype in zip(plan, types):
                dtype = np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32
                data = s.transform([load_tensor(n, shapes[n][1], dtype) for n in s.hf_names])
                largest = max(largest, data.nbytes)
                w.write_tensor_data(gguf.quants.quantize(data, qtype))
                if progress:
                    progress(s.gguf_name)
        finally:
            w.close()
    return {"file": str(out), "type": outtype, "bytes": out.stat().st_size, "tensors": len(plan),
            "fallbacks": fallbacks, "largest_tensor_bytes": largest, "architecture": arch, **tok_info}
