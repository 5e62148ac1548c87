"""Raw text → token shards for pretraining, streamed, deduplicated, resumable.

    fabrika prepare data/corpus --tokenizer runs/x/tokenizer/tokenizer --out runs/x/prepare

or as the `prepare` stage of a pipeline. Documents are tokenized in batches (the Rust tokenizer runs
a batch on all cores), separated by EOS, and written as flat token arrays of about `shard_mb` each,
readable with `numpy.memmap`. A document goes to the validation split by a hash of its text, so the
split is reproducible without seeing the corpus twice. Memory holds one batch, one shard buffer and
an 8-byte hash per distinct document (the exact-duplicate filter): about 0.2 GB per 10M documents.

Layout of the output directory (`index.json` is rewritten after every finished shard):
  index.json  {"format": 1, "dtype", "vocab_size", "eos_id", "tokenizer": "tokenizer",
               "train": [{"file", "tokens", "docs"}], "val": [...], "docs_consumed", "complete", "stats"}
  train_00000.bin, val_00000.bin, ...   little-endian uint16 (vocab < 65536) or uint32 tokens
  tokenizer/                             a copy of the tokenizer: the shards are self-contained
A killed run, rerun with the same settings, skips the `docs_consumed` documents of the finished
shards (hashing them again for the duplicate filter, without tokenizing) and continues.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from fabrika.artifacts import Artifact, RunContext, atomic_write_bytes, atomic_write_json, fingerprint, read_json
from fabrika.data.text_sources import ReadStats, TextSources, iter_documents, resolve_files
from fabrika.errors import FabrikaError
from fabrika.faults import fault
from fabrika.models.checks import check_tokenizer_dir

INDEX = "index.json"


class PrepareConfig(TextSources):
    tokenizer: str = Field("tokenizer", description="Tokenizer stage, directory or Hub id.")
    shard_mb: float = Field(50.0, gt=0, description="Approximate size of one shard file in MB.")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="Fraction of documents held out for validation.")
    dedup: bool = Field(True, description="Drop exact-duplicate documents.")
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this.")
    batch_docs: int = Field(1000, ge=1, description="Documents tokenized per batch.")


CONFIG = PrepareConfig


def inputs(cfg: PrepareConfig) -> list[str]:
    return [cfg.tokenizer, *cfg.paths, *([cfg.dataset] if cfg.dataset else [])]


def read_index(prepared_dir: str | Path) -> dict[str, Any]:
    path = Path(prepared_dir) / INDEX
    if not path.exists():
        raise FabrikaError(f"{prepared_dir}: not a prepared dataset (no {INDEX})")
    return read_json(path)


def open_split(prepared_dir: str | Path, split: str = "train") -> list[np.memmap]:
    index = read_index(prepared_dir)
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    return [np.memmap(Path(prepared_dir) / s["file"], dtype=dtype, mode="r") for s in index[split] if s["tokens"]]


def _doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def estimate(cfg: PrepareConfig, ctx: RunContext) -> dict[str, Any]:
    size = sum(f.stat().st_size for f in resolve_files(cfg.paths)) if cfg.paths else None
    if size is None:
        return {"input": "streamed dataset"}
    return {"input_bytes": size, "est_tokens": int(size / 4)}


class ShardWriter:
    """Buffers token ids for one split and writes a shard file whenever the buffer is full."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, shards: list[dict]) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards = shards
        self.buf: list[np.ndarray] = []
        self.n = 0
        self.docs = 0

    def add(self, ids: list[int]) -> bool:
        """Buffer one document; True when the buffer has reached a shard's size."""
        self.buf.append(np.asarray(ids, dtype=self.dtype))
        self.n += len(ids)
        self.docs += 1
        return self.n >= self.shard_tokens

    def flush(self) -> None:
        if not self.n:
            return
        name = f"{self.split}_{len(self.shards):05d}.bin"
        atomic_write_bytes(self.out / name, np.concatenate(self.buf).astype(self.dtype.newbyteorder("<")).tobytes())
        self.shards.append({"file": name, "tokens": self.n, "docs": self.docs})
        self.buf, self.n, self.docs = [], 0, 0


def run(cfg: PrepareConfig, ctx: RunContext) -> Artifact:
    out = ctx.stage_dir
    tok_ref = ctx.resolve(cfg.tokenizer)
    check_tokenizer_dir(tok_ref, "tokenizer")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_ref)
    except (OSError, ValueError) as e:
        raise FabrikaError(f"tokenizer: cannot load {tok_ref!r} ({e})") from None
    if tokenizer.eos_token_id is None:
        raise FabrikaError(f"tokenizer: {tok_ref} has no eos token to separate documents with")
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab < 2**16 else np.uint32)
    eos = tokenizer.eos_token_id
    shard_tokens = max(1, int(cfg.shard_mb * 1e6 / dtype.itemsize))
    settings = fingerprint({"config": cfg.model_dump(mode="json"), "vocab": tokenizer.get_vocab().__len__(),
                            "tokenizer": tokenizer.backend_tokenizer.to_str()[:200000]})

    index_path = out / INDEX
    index = read_json(index_path) if index_path.exists() else None
    if index is not None and (index.get("settings") != settings or index.get("complete")):
        if index.get("complete") and index.get("settings") == settings:
            return ctx.finish(out, cfg, metrics=index["stats"])
        for f in out.glob("*.bin"):
            f.unlink()
        index = None
    if index is None:
        index = {"format": 1, "dtype": dtype.name, "vocab_size": vocab, "eos_id": eos, "tokenizer": "tokenizer",
                 "train": [], "val": [], "docs_consumed": 0, "complete": False, "settings": settings,
                 "stats": {"documents": 0, "duplicates_dropped": 0, "too_short_dropped": 0, "undecodable_bytes": 0,
                           "train_tokens": 0, "val_tokens": 0, "bytes_read": 0, "seconds": 0.0}}
        tokenizer.save_pretrained(out / "tokenizer")
    for split in ("train", "val"):  # files past the last index entry are from a killed run: rewritten
        keep = {s["file"] for s in index[split]}
        for f in out.glob(f"{split}_*.bin"):
            if f.name not in keep:
                f.unlink()

    stats, read = index["stats"], ReadStats()
    skip = index["docs_consumed"]
    writers = {s: ShardWriter(out, s, dtype, shard_tokens, index[s]) for s in ("train", "val")}
    seen: set[bytes] = set()
    t0 = time.time() - stats["seconds"]
    kill_after = fault("exit_after_shards")  # test hook: die like kill -9

    def checkpoint(consumed: int) -> None:
        index["docs_consumed"] = consumed
        stats["seconds"] = round(time.time() - t0, 3)
        atomic_write_json(index_path, index)
        finished = len(index["train"]) + len(index["val"])
        if kill_after and finished >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    progress = None
    if not ctx.quiet:
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

        from fabrika.logs import progress as progress_bar

        progress = progress_bar(TextColumn("read"), BarColumn(), TextColumn("{task.fields[mb]:.1f} MB read"),
                            TextColumn("{task.fields[tok]:,} tokens"), TextColumn("{task.fields[rate]:.2f} MB/s"),
                            TimeElapsedColumn())
        task = progress.add_task("prepare", total=None, mb=0.0, tok=0, rate=0.0)
        progress.start()

    batch: list[tuple[str, str]] = []
    consumed = 0

    def tokenize_batch() -> None:
        if not batch:
            return
        # verbose=False: documents longer than the model's context are expected (they are cut into
        # packed sequences later); the tokenizer's warning about them would be noise
        encoded = tokenizer([text for _, text in batch], add_special_tokens=False, verbose=False)["input_ids"]
        full = False
        for (split, _), ids in zip(batch, encoded):
            ids.append(eos)
            stats[f"{split}_tokens"] += len(ids)
            full |= writers[split].add(ids)
        batch.clear()
        if full:  # flush both splits, so every document up to `consumed` is in a finished shard
            for w in writers.values():
                w.flush()
            checkpoint(consumed)

    try:
        for doc in iter_documents(cfg, read):
            consumed += 1
            h = _doc_hash(doc)
            if cfg.dedup:
                if h in seen:
                    if consumed > skip:
                        stats["duplicates_dropped"] += 1
                    continue
                seen.add(h)
            if consumed <= skip:
                continue
            if len(doc) < cfg.min_chars:
                stats["too_short_dropped"] += 1
                continue
            split = "val" if int.from_bytes(h[:4], "little") / 2**32 < cfg.val_fraction else "train"
            stats["documents"] += 1
            batch.append((split, doc))
            if len(batch) >= cfg.batch_docs:
                tokenize_batch()
                if progress:
                    mb = read.bytes_read / 1e6
                    progress.update(task, mb=mb, tok=stats["train_tokens"] + stats["val_tokens"],
                                    rate=mb / max(time.time() - t0, 1e-6))
        tokenize_batch()
        for w in writers.values():
            w.flush()
    finally:
        if progress:
            progress.stop()
    if not index["train"]:
        raise FabrikaError(f"prepare: no training text in {', '.join(cfg.paths) or cfg.dataset} "
                           f"({stats['documents']} documents, {stats['duplicates_dropped']} duplicates)")
    stats["undecodable_bytes"] += read.undecodable_bytes
    stats["bytes_read"] += read.bytes_read
    index["complete"] = True
    checkpoint(consumed)
    return ctx.finish(out, cfg, metrics=dict(stats))
