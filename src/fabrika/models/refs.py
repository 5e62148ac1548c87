"""Model references: the one reading of the strings that name a model anywhere in fabrika.

  hf:PATH_OR_HUB_ID      a Hugging Face model (a directory, a LoRA adapter directory or a Hub id) on transformers
  gguf:FILE              a GGUF file on llama.cpp
  vllm:PATH_OR_HUB_ID    a Hugging Face model on vLLM's server
  openai:MODEL[@URL]     a model behind an OpenAI-compatible endpoint (OpenAI's own without @URL)

A bare directory or `owner/name` Hub id means hf:, a bare *.gguf path gguf:; a finished stage's folder
(`s/` from `fabrika sft --out s/`) stands for the model in it. Every stage and command reads references
here, so a new kind, or a change in what a part of one means, is made in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from fabrika.artifacts import artifact_in_folder
from fabrika.errors import FabrikaError

Kind = Literal["hf", "gguf", "vllm", "openai"]
KINDS: tuple[str, ...] = get_args(Kind)
GENERIC_DIRS = ("model", "adapter", "merged")  # what stages call their output: the stage's name says more


@dataclass(frozen=True)
class ModelRef:
    kind: Kind
    target: str  # what follows the prefix: a path, a Hub id, or MODEL[@URL]

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"

    @property
    def local(self) -> bool:
        """A model fabrika loads or serves itself (everything but an API model)."""
        return self.kind != "openai"

    @property
    def model(self) -> str:
        """The model name requests carry: MODEL of openai:MODEL@URL; a local model, served on loopback under
        its own path or Hub id, is named by its target."""
        return self.target.partition("@")[0] if self.kind == "openai" else self.target

    @property
    def url(self) -> str | None:
        """The endpoint of openai:MODEL@URL; None for OpenAI's own and for local models."""
        return (self.target.partition("@")[2] or None) if self.kind == "openai" else None

    @property
    def path(self) -> str:
        """The directory, Hub id or file of a local model."""
        if not self.local:
            raise FabrikaError(f"{self}: an API model, not a model directory or file")
        return self.target

    @property
    def display_name(self) -> str:
        """A short name for answer files and tables, as FastChat names answer files: an API model's name
        without its owner, a GGUF file's stem, a model directory's name (its parent's, when a stage named
        the directory for what it holds: model, adapter, merged)."""
        if not self.local:
            return Path(self.model).name
        path = Path(self.target).resolve() if Path(self.target).exists() else Path(self.target)
        if self.kind == "gguf":
            return path.stem
        return path.parent.name if path.name in GENERIC_DIRS and path.parent.name else path.name


def written_kind(ref: str) -> ModelRef | None:
    """The reference when its prefix names its kind (`hf:x`, `openai:m@u`, ...), read from the string
    alone; None for a bare path, Hub id, stage or model name."""
    kind, sep, target = ref.partition(":")
    return ModelRef(kind, target) if sep and kind in KINDS else None  # type: ignore[arg-type]


def parse_ref(ref: str) -> ModelRef:
    """The model `ref` names; a finished stage's folder stands for the model in it."""
    ref = artifact_in_folder(ref)
    if (written := written_kind(ref)) is not None:
        return written
    if ref.endswith(".gguf"):
        return ModelRef("gguf", ref)
    if Path(ref).is_dir() or ref.count("/") == 1:
        return ModelRef("hf", ref)
    raise FabrikaError(f"model reference {ref!r}: expected hf:PATH_OR_ID, vllm:PATH_OR_ID, gguf:FILE or "
                       "openai:MODEL[@BASE_URL]")


def api_model(ref: str) -> str | None:
    """The MODEL of an `openai:MODEL[@URL]` reference, None for any other. Reads only the string: the plan
    prices API calls before the stages that make local models have run."""
    written = written_kind(ref)
    return written.model if written is not None and not written.local else None


def hf_target(ref: str) -> str:
    """The directory or Hub id of `hf:X`; any other reference comes back as written, for the caller's own
    check of a Hugging Face model to name (training and export take nothing else)."""
    written = written_kind(ref)
    return written.target if written is not None and written.kind == "hf" else ref
