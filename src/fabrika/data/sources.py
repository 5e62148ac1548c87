"""Rows from wherever a dataset lives: a fabrika dataset artifact, a `datasets` directory, local
JSONL/JSON/Parquet/CSV files, or a Hub id, all through `datasets`, so the code that runs on a Hub id
in production is the code the tests run on local copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from fabrika.errors import FabrikaError

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_dataset_any(ref: str, split: str = "train"):
    """A `datasets.Dataset` for a directory saved with save_to_disk, a data file or folder, or a Hub id."""
    import datasets

    p = Path(ref)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise FabrikaError(f"{ref}: no split {split!r}; it has {', '.join(ds)}")
            ds = ds[split]
        return ds
    if p.is_dir():
        for sub in ("dataset", "hf"):  # a fabrika dataset artifact keeps its HF copy in a subdirectory
            if (p / sub / "dataset_info.json").exists():
                return load_dataset_any(str(p / sub), split)
        files = [f for f in sorted(p.rglob("*")) if f.suffix in FILE_LOADERS]
        if not files:
            raise FabrikaError(f"{ref}: a folder with no dataset in it (expected save_to_disk output or "
                               f"{', '.join(FILE_LOADERS)} files)")
        return _load_files(files, ref)
    if p.is_file():
        if p.suffix not in FILE_LOADERS:
            raise FabrikaError(f"{ref}: unsupported file type {p.suffix!r}; expected {', '.join(FILE_LOADERS)}")
        return _load_files([p], ref)
    if "/" in ref and not ref.startswith((".", "/")) and ref.count("/") == 1:
        try:
            return datasets.load_dataset(ref, split=split)
        except Exception as e:  # the Hub's errors are many; the user needs the id and the reason
            raise FabrikaError(f"{ref}: could not load this Hub dataset ({type(e).__name__}: {e})") from None
    raise FabrikaError(f"{ref}: no such file or directory (and not a Hub dataset id like org/name)")


def _load_files(files: list[Path], ref: str):
    import datasets

    kinds = {FILE_LOADERS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise FabrikaError(f"{ref}: mixes file types {sorted(kinds)}; use one kind per source")
    kind = kinds.pop()
    if all(f.stat().st_size == 0 for f in files):
        raise FabrikaError(f"{files[0] if len(files) == 1 else ref}: empty; expected rows "
                           f"({'one JSON object a line' if kind == 'json' else kind})")
    try:
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as e:
        where = _first_bad_json(files) if kind == "json" else None
        raise FabrikaError(where or f"{ref}: could not read ({type(e).__name__}: {str(e)[:300]})") from None


def _first_bad_json(files: list[Path]) -> str | None:
    """Where a JSON Lines file went wrong (file and line), which `datasets`' own error does not say."""
    import json

    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if f.suffix == ".json" and text.lstrip().startswith("["):
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                return f"{f}: not valid JSON ({e.msg}, line {e.lineno}, column {e.colno})"
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{f}:{n}: not valid JSON ({e.msg}, column {e.colno}); expected one JSON object a line"
            if not isinstance(row, dict):
                return f"{f}:{n}: a JSON {type(row).__name__}, expected an object (one row a line)"
    return None


def iter_rows(ref: str, split: str = "train", id_field: str | None = None) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(row id, row) pairs; the id is the `id_field` column when given, else the row number."""
    ds = load_dataset_any(ref, split)
    if id_field and id_field not in ds.column_names:
        raise FabrikaError(f"{ref}: no column {id_field!r}; columns: {', '.join(ds.column_names)}")
    for i, row in enumerate(ds):
        yield (row[id_field] if id_field else i), row
