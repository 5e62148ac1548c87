"""One tokenization from the tokenizer to the GGUF, for every preset architecture.

A corpus full of numbers and punctuation (where pre-tokenizer regexes disagree, so a tokenizer loaded
with the wrong regex gives other ids) goes through the installed `fabrika` executable: `tokenizer`,
`prepare`, `pretrain` (tiny preset, a few real optimizer steps), `export` (F32, verified by llama.cpp)
and `chat --query` on both the HF model and the GGUF file. A known document has the same ids in
tokenizer.json (read by the `tokenizers` library), in AutoTokenizer on the tokenizer and on the
model directory, in the prepared shards, in the chat prompt and in llama.cpp's tokenization.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import CORPUS, run_cli

pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the test install (make test)")

_BESIDE_PYTHON = Path(sys.executable).parent / "fabrika"
FABRIKA = [str(_BESIDE_PYTHON) if _BESIDE_PYTHON.exists() else shutil.which("fabrika")]  # the installed script
KNOWN = 'In 1984, 12,345 people paid $3.50 ("rent")... They\'d said: x=(a+b)/2; 2024-11-30.'
QUESTION = "What is 12,345 + 1984? (Answer in 3 words.)"
# the tokenizer stage's pre-tokenizer each architecture is trained with: transformers loads every
# qwen2 model with Qwen2Tokenizer, so only a qwen2-style tokenizer survives the trip there
STYLE = {"llama": "gpt2", "mistral": "gpt2", "mixtral": "gpt2", "gpt2": "gpt2", "qwen2": "qwen2"}


def fabrika(*args: str) -> str:
    quiet = [] if args[0] == "chat" else ["--quiet"]  # chat prints only the answer anyway
    proc = run_cli(*args, *quiet, launcher=FABRIKA)
    assert proc.returncode == 0, f"fabrika {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def ledger(n: int) -> str:
    """Paragraphs shaped like real records: years, thousands separators, prices, quotes, brackets."""
    rows = []
    for i in range(n):
        rows.append(f"In {1800 + i * 7 % 220}, {(i * 7919) % 100000:,} people paid ${i % 97}.{i * 13 % 100:02d} "
                    f"(receipt #{i * 31 % 10000}); they'd said \"fine\" -- {i % 28 + 1:02d}/{i % 12 + 1:02d}.")
        if i % 4 == 3:
            rows.append("")
    return "\n".join(rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("numbers-corpus")
    (d / "en.txt").write_text((CORPUS / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000],
                              encoding="utf-8")
    ru = sorted((CORPUS / "ru").glob("*.txt"))[0].read_text(encoding="utf-8")[:8_000]
    (d / "ru.txt").write_text(ru, encoding="utf-8")
    (d / "ledger.txt").write_text(ledger(600) + "\n\n" + KNOWN + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    """style → (tokenizer dir, prepared dir), each built once by the CLI when first asked for."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(style: str) -> tuple[Path, Path]:
        if style not in built:
            root = tmp_path_factory.mktemp(f"tok-{style}")
            fabrika("tokenizer", str(corpus), "--vocab-size", "1024", "--set", f"pre_tokenizer={style}",
                    "--out", str(root / "tokenizer"))
            tok = root / "tokenizer" / "tokenizer"
            fabrika("prepare", str(corpus), "--tokenizer", str(tok), "--shard-mb", "0.02",
                    "--set", "val_fraction=0.05", "--out", str(root / "prepare"))
            built[style] = tok, root / "prepare"
        return built[style]

    return get


def shard_tokens(prepared_dir: Path) -> np.ndarray:
    index = json.loads((prepared_dir / "index.json").read_text())
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    parts = [np.fromfile(prepared_dir / s["file"], dtype=dtype) for split in ("train", "val") for s in index[split]]
    return np.concatenate(parts).astype(np.int64)


def contains(haystack: np.ndarray, needle: list[int]) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return bool((windows == np.array(needle)).all(axis=1).any())


def pretrain_config(path: Path, data: Path, arch: str) -> Path:
    path.write_text(yaml.safe_dump({
        "data": str(data), "model": {"arch": arch, "size": "tiny"}, "seq_len": 32,
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "logging_steps": 1, "eval_steps": 3,
                  "eval_samples": 2, "save_steps": 1000}}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "mistral", "mixtral", "qwen2", "gpt2"])
def test_same_ids_from_tokenizer_to_gguf(tmp_path, prepared, arch):
    import llama_cpp
    from gguf import GGUFReader
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from fabrika.infer.backends import load_generator

    tok_dir, data = prepared(STYLE[arch])
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = raw.encode(KNOWN, add_special_tokens=False).ids
    pieces = [raw.id_to_token(i) for i in ids]
    if STYLE[arch] == "gpt2":  # the vocabulary holds merges that Qwen2's one-digit regex would cut
        assert any(len(p.lstrip("Ġ")) > 1 and p.lstrip("Ġ").isdigit() for p in pieces), pieces
    assert AutoTokenizer.from_pretrained(tok_dir)(KNOWN, add_special_tokens=False)["input_ids"] == ids
    assert contains(shard_tokens(data), ids)

    fabrika("pretrain", "--config", str(pretrain_config(tmp_path / "pretrain.yaml", data, arch)),
            "--out", str(tmp_path / "pretrain"))
    model_dir = tmp_path / "pretrain" / "model"
    assert AutoTokenizer.from_pretrained(model_dir)(KNOWN, add_special_tokens=False)["input_ids"] == ids

    fabrika("export", str(model_dir), "--quant", "f32", "--set", "verify.max_tokens=64",
            "--out", str(tmp_path / "export"))
    gguf_file = tmp_path / "export" / "model-f32.gguf"
    report = json.loads((tmp_path / "export" / "verification.json").read_text())["verification"]["files"]["f32"]
    assert report["kl"] < 1e-4 and report["top1"] == 1.0, report
    assert report["tokenizer_parity"] == {"en": True, "ru": True, "zh": True, "numbers": True, "chat": True}
    field = GGUFReader(gguf_file).fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == ("qwen2" if STYLE[arch] == "qwen2" else "gpt-2")

    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    assert llm.tokenize(KNOWN.encode(), add_bos=False, special=False) == ids
    assert llm.tokenize(KNOWN.encode()) == ids  # add_bos_token is false in transformers and in the GGUF

    conversation = [{"role": "user", "content": QUESTION}]
    prompt = load_generator(f"hf:{model_dir}").prompt_ids(conversation)
    rendered = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(conversation, tokenize=False,
                                                                            add_generation_prompt=True)
    assert prompt == raw.encode(rendered, add_special_tokens=False).ids
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == prompt

    answers = [fabrika("chat", ref, "--query", QUESTION, "--max-tokens", "8")
               for ref in (f"hf:{model_dir}", f"gguf:{gguf_file}")]
    assert answers[0] == answers[1]


def test_qwen2_refuses_a_tokenizer_it_would_not_load_back(tmp_path, prepared):
    """Before the first step: the model directory would load Qwen2's regex, not the data's."""
    _, data = prepared("gpt2")
    proc = run_cli("pretrain", "--config", str(pretrain_config(tmp_path / "p.yaml", data, "qwen2")),
                   "--out", str(tmp_path / "pretrain"), "--quiet", launcher=FABRIKA)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Qwen2Tokenizer" in proc.stderr and "pre_tokenizer: qwen2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pretrain" / "model").exists()


def test_export_writes_the_pre_tokenizer_transformers_loads(tmp_path, prepared):
    """A qwen2 directory holding a GPT-2-style tokenizer.json (as saved before the check above existed):
    transformers uses Qwen2's regex there, so the GGUF must too, or llama.cpp disagrees with every
    transformers-based step on numbers."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from fabrika.export import gguf as writer
    from fabrika.export import verify

    tok_dir, _ = prepared("gpt2")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model_dir = tmp_path / "qwen2"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    loaded = AutoTokenizer.from_pretrained(model_dir)
    from_file = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(KNOWN, add_special_tokens=False).ids
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    assert loaded(KNOWN, add_special_tokens=False)["input_ids"] != from_file

    writer.convert(model_dir, tmp_path / "m.gguf", "f32")
    report = verify.verify(model_dir, {"f32": tmp_path / "m.gguf"}, max_tokens=64)
    row = report["files"]["f32"]
    assert all(row["tokenizer_parity"].values()), row["tokenizer_parity"]
    assert not verify.check_lossless(report)


@pytest.mark.parametrize("spec, expected", [
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}, "gpt-2"),
    ({"normalizer": {"type": "NFC"}, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
                                               "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}, "qwen2"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}, "prefix space"),
    ({"normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, "'Lowercase'"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [  # a regex split, then GPT-2's regex again
        {"type": "Split", "pattern": {"Regex": "\\d"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}}, "not one llama.cpp knows"),
])
def test_pre_tokenizer_names_and_refusals(spec, expected):
    from fabrika.errors import FabrikaError
    from fabrika.export.gguf import pre_tokenizer_name

    if expected in ("gpt-2", "qwen2"):
        assert pre_tokenizer_name(spec, Path("m")) == expected
    else:
        with pytest.raises(FabrikaError, match=expected):
            pre_tokenizer_name(spec, Path("m"))
