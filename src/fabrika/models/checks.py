"""Is this a model directory, a tokenizer directory, or a Hub id? Answered from the files first.

transformers, asked to load a directory that is not a model, answers about the Hub ("check your
internet connection") or about converters ("sentencepiece or tiktoken"), and a config.json without
`model_type` fails deep inside it. These checks run before it is asked, so the message names the
directory, what is missing, and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path

from fabrika.errors import FabrikaError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ADAPTER_CONFIG = "adapter_config.json"
SAVED = "what save_pretrained writes"


def hub_id_shaped(ref: str) -> bool:
    """org/name: one slash, not a relative or absolute path."""
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not ref.endswith("/")


def is_adapter_dir(path: str | Path) -> bool:
    """A peft adapter directory: transformers and peft load one on top of the base model it names,
    whether or not a config.json lies beside it."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _local_dir(ref: str, setting: str, what: str) -> Path | None:
    """The directory `ref` names, None for a Hub id; a missing path or a file is an error."""
    path = Path(ref).expanduser()
    if not path.exists():
        if hub_id_shaped(ref):
            return None
        raise FabrikaError(f"{setting}: {ref} not found (expected a {what} directory, {SAVED}, or a Hub id "
                           "like org/name)")
    if not path.is_dir():
        raise FabrikaError(f"{setting}: {ref} is a file; expected a {what} directory ({SAVED})")
    return path


def _not_a_stage(path: Path) -> str:
    """Why `path` did not stand for a stage's output: a stage folder counts once its manifest.json exists."""
    from fabrika.artifacts import FINGERPRINT_FILE

    if (path / FINGERPRINT_FILE).is_file():
        return (f"; {path} is a stage folder whose stage has not finished (no manifest.json yet): run that "
                "command again to finish it")
    return "; nor is it a finished fabrika stage's folder (no manifest.json naming its output)"


def check_model_dir(ref: str, setting: str) -> None:
    """A local model (or adapter) directory must have a config.json that names its architecture."""
    path = _local_dir(ref, setting, "model")
    if path is None or is_adapter_dir(path):
        return
    config = path / "config.json"
    if not config.is_file():
        raise FabrikaError(f"{setting}: {ref} is not a model directory: it has no config.json ({SAVED}: "
                           "config.json, the weights and the tokenizer)" + _not_a_stage(path))
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FabrikaError(f"{setting}: {config} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise FabrikaError(f"{setting}: {config} has no `model_type`, so the architecture is unknown "
                           "(expected e.g. \"model_type\": \"llama\", as save_pretrained writes it)")


def check_tokenizer_dir(ref: str, setting: str) -> None:
    """A local tokenizer directory must hold one of the files a tokenizer is saved as."""
    path = _local_dir(ref, setting, "tokenizer")
    if path is not None and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FabrikaError(f"{setting}: {ref} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); expected "
                           "a folder written by `fabrika tokenizer --out`, save_pretrained, or a Hub id"
                           + _not_a_stage(path))
