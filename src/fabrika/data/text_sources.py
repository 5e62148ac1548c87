"""Raw-text documents streamed from files, folders, globs or a Hub dataset, for the tokenizer and
`prepare`. Nothing is loaded whole: a 20 GB corpus streams through in constant memory.

A .txt file is split into documents by blank lines (`sample_by: paragraph`, the default), by lines,
or kept whole (`document`); .jsonl and .parquet rows give one document each from `text_field`.
Undecodable bytes are dropped and counted, never a crash.
"""

from __future__ import annotations

import codecs
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from fabrika.config import Config
from fabrika.errors import FabrikaError

TEXT_SUFFIXES = (".txt", ".md", ".text")
ROW_SUFFIXES = (".jsonl", ".parquet")


class TextSources(Config):
    paths: list[str] = Field(default_factory=list, description="Text files, folders (recursive) or globs.")
    dataset: str | None = Field(None, description="A Hub dataset id (streamed) or a saved dataset directory.")
    split: str = Field("train", description="Split of the Hub dataset.")
    text_field: str = Field("text", description="Column holding the text in jsonl/parquet/datasets.")
    sample_by: Literal["paragraph", "line", "document"] = Field(
        "paragraph", description="How .txt files split into documents.")
    max_documents: int | None = Field(None, ge=1, description="Stop after this many documents.")


@dataclass
class ReadStats:
    documents: int = 0
    bytes_read: int = 0
    undecodable_bytes: int = 0
    files: list[str] = field(default_factory=list)


def resolve_files(paths: list[str]) -> list[Path]:
    """Expand folders and globs into a sorted, de-duplicated list of readable files."""
    files: list[Path] = []
    for spec in paths:
        p = Path(spec)
        if any(ch in spec for ch in "*?["):
            matched = [Path(m) for m in sorted(glob.glob(spec, recursive=True)) if Path(m).is_file()]
            if not matched:
                raise FabrikaError(f"paths: the glob {spec!r} matches no file")
            files += matched
        elif p.is_dir():
            found = [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in TEXT_SUFFIXES + ROW_SUFFIXES]
            if not found:
                raise FabrikaError(f"paths: the folder {spec} holds no {', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)} file")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FabrikaError(f"paths: {spec} does not exist")
    for f in files:
        if f.suffix not in TEXT_SUFFIXES + ROW_SUFFIXES:
            raise FabrikaError(f"{f}: unsupported file type {f.suffix!r}; expected {', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)}")
    return list(dict.fromkeys(files))


class _Counter:
    """An incremental UTF-8 decoder that drops bad bytes and counts them."""

    def __init__(self, stats: ReadStats) -> None:
        self.stats = stats
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, data: bytes, final: bool = False) -> str:
        self.stats.bytes_read += len(data)
        text = self.decoder.decode(data, final)
        bad = text.count("\ufffd") - data.count("\xef\xbf\xbd".encode("latin-1"))
        if bad:
            self.stats.undecodable_bytes += bad
            text = text.replace("\ufffd", "")
        return text


def _iter_txt(path: Path, sample_by: str, stats: ReadStats) -> Iterator[str]:
    dec = _Counter(stats)
    with open(path, "rb") as f:
        if sample_by == "document":
            yield dec.decode(f.read(), final=True)
            return
        buf: list[str] = []
        for raw in f:  # line by line: a huge file never sits in memory
            line = dec.decode(raw)
            if sample_by == "line":
                if line.strip():
                    yield line.rstrip("\r\n")
                continue
            if line.strip():
                buf.append(line)
            elif buf:
                yield "".join(buf).strip("\n")
                buf = []
        if buf:
            yield "".join(buf).strip("\n")


def _iter_jsonl(path: Path, field_name: str, stats: ReadStats) -> Iterator[str]:
    dec = _Counter(stats)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = dec.decode(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FabrikaError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or field_name not in row:
                have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise FabrikaError(f"{path}:{n}: no {field_name!r} field (it has: {have}); set text_field")
            if isinstance(row[field_name], str):
                yield row[field_name]


def _iter_parquet(path: Path, field_name: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field_name not in pf.schema_arrow.names:
        raise FabrikaError(f"{path}: no {field_name!r} column (it has: {', '.join(pf.schema_arrow.names)}); set text_field")
    for i in range(pf.num_row_groups):  # one row group at a time
        for value in pf.read_row_group(i, columns=[field_name]).column(0).to_pylist():
            if isinstance(value, str):
                stats.bytes_read += len(value.encode("utf-8"))
                yield value


def _iter_dataset(src: TextSources, stats: ReadStats) -> Iterator[str]:
    import datasets

    p = Path(src.dataset)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[src.split]
    else:
        try:
            ds = datasets.load_dataset(src.dataset, split=src.split, streaming=True)
        except Exception as e:
            raise FabrikaError(f"dataset: cannot load {src.dataset!r} ({type(e).__name__}: {e})") from None
    columns = ds.column_names or []
    if columns and src.text_field not in columns:
        raise FabrikaError(f"dataset {src.dataset}: no {src.text_field!r} column (it has: {', '.join(columns)})")
    for row in ds:
        value = row.get(src.text_field)
        if isinstance(value, str):
            stats.bytes_read += len(value.encode("utf-8"))
            yield value


def iter_documents(src: TextSources, stats: ReadStats | None = None) -> Iterator[str]:
    """Every non-empty document of the sources, in a fixed order."""
    stats = stats if stats is not None else ReadStats()
    if not src.paths and not src.dataset:
        raise FabrikaError("paths/dataset: give files, folders or globs in `paths`, or a Hub `dataset`")

    def all_docs() -> Iterator[str]:
        for f in resolve_files(src.paths):
            stats.files.append(str(f))
            if f.suffix in TEXT_SUFFIXES:
                yield from _iter_txt(f, src.sample_by, stats)
            elif f.suffix == ".jsonl":
                yield from _iter_jsonl(f, src.text_field, stats)
            else:
                yield from _iter_parquet(f, src.text_field, stats)
        if src.dataset:
            yield from _iter_dataset(src, stats)

    for doc in all_docs():
        if not doc.strip():
            continue
        stats.documents += 1
        yield doc
        if src.max_documents and stats.documents >= src.max_documents:
            return

