"""Relative paths in a pipeline file are read from the file's own folder, as in Docker Compose or a
Makefile include: `fabrika run examples/x.yaml` finds the same data from any working directory. Only
the run directory (`run_dir`, default runs/<name>) is relative to where fabrika runs: outputs land
where the user is.

A setting that names an input (PATH_KEYS: paths, source, data, model, ...) is a local path when it
looks like one: every entry of `paths`, anything starting with ./ or ../, a name with a data file's
suffix (.jsonl, .parquet, ...), a glob, or a path with two or more slashes. Such a path that is missing
stops the run before anything starts, naming the pipeline file and the setting
(`stages.prepare.paths`). `org/name` is a path when it exists beside the file and a Hub id otherwise;
stage names, named models and `openai:` references are never paths. Any other string (a prompt, a
regex) is read as a path only when it exists beside the file.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from fabrika.errors import FabrikaError

# The settings that name files, folders, models or datasets; any other string (a prompt, a regex, a
# template) is a path only when it exists beside the file.
PATH_KEYS = {"paths", "path", "dataset", "source", "data", "tokenizer", "model", "init_from", "teacher", "judge",
             "student", "refusal_judge", "baseline", "answers", "bench", "include_path", "calibration", "imatrix"}
FILE_SUFFIX = re.compile(r"\.(jsonl|json|parquet|csv|tsv|txt|gguf|arrow|ya?ml|safetensors)$", re.IGNORECASE)
GLOB = re.compile(r"[*?\[]")


def _path_shaped(target: str, in_paths: bool) -> bool:
    return (in_paths or target.startswith(("./", "../")) or target.count("/") >= 2
            or bool(FILE_SUFFIX.search(target)) or bool(GLOB.search(target)))


def _exists(path: str) -> bool:
    return bool(glob.glob(path, recursive=True)) if GLOB.search(path) else Path(path).exists()


def rebase(value: Any, folder: Path, names: set[str], source: str, key: str) -> Any:
    """`value` (a stage's settings, or one of them) with relative local paths read from `folder`; `names`
    are the stages and named models, which are references, not paths."""
    if isinstance(value, dict):
        return {k: rebase(v, folder, names, source, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [rebase(v, folder, names, source, key) for v in value]
    if not isinstance(value, str) or value in names:
        return value
    scheme, sep, rest = value.partition(":")
    prefix, target = (scheme + sep, rest) if sep and scheme in ("hf", "gguf") else ("", value)
    if (sep and not prefix) or not target or target.startswith(("/", "~")):
        return value  # openai:..., a URL, an absolute path
    field = "model" if key.startswith("models.") else key.rsplit(".", 1)[-1]
    if field not in PATH_KEYS and any(ch.isspace() for ch in target):
        return value  # a prompt or a pattern, not a file name
    rebased = os.path.normpath(folder / target)
    if _exists(rebased):
        return prefix + rebased
    if field not in PATH_KEYS:
        return value
    in_paths = field == "paths"
    elsewhere = folder != Path(".") and _exists(target)  # the old habit: relative to the current directory
    if not _path_shaped(target, in_paths) and not elsewhere:
        return value  # a Hub id, a bench name, a plain word
    hint = ""
    if elsewhere:
        hint = (f"; it exists relative to the current directory, so from the pipeline's folder write "
                f"{os.path.relpath(target, folder)}")
    raise FabrikaError(f"{source}: {key}: {value} not found (relative paths in a pipeline file are read from the "
                       f"file's folder, {folder}/, so this is {rebased}){hint}")
