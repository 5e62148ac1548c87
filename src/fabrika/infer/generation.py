"""What every way of generating answers shares: the messages, the sampling settings, the completion, the
two ways a conversation is refused, and the `Generator` protocol itself.

Kept apart from the backends (which load models) and the client (which talks HTTP), both of which use
these types: neither needs the other to name what it returns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Generator as Steps, Protocol

from pydantic import Field

from fabrika.config import Config
from fabrika.errors import FabrikaError

Messages = list[dict[str, str]]


class GenerationParams(Config):
    temperature: float = Field(0.0, ge=0, le=2, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(256, ge=1, description="Longest answer in tokens.")
    seed: int | None = Field(None, description="Sampling seed (reproducible answers).")
    stop: list[str] = Field(default_factory=list, description="Strings that end an answer.")
    n: int = Field(1, ge=1, le=16, description="Answers per conversation.")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    cached: bool = False


class ContextTooLong(FabrikaError):
    """The prompt plus the answer would not fit the model's context."""


class ConversationRejected(FabrikaError):
    """The model's chat template refuses the conversation (say, two user turns in a row)."""


class Generator(Protocol):
    name: str
    context: int

    def generate(self, conversations: list[Messages], params: GenerationParams) -> list[list[Completion]]:
        """n completions for every conversation, in order."""

    def stream(self, conversation: Messages, params: GenerationParams,
               cancel: threading.Event | None = None) -> Steps[str, None, Completion | None]:
        """Pieces of one answer as they are produced; returns the finished completion (its finish reason and
        token counts). Setting `cancel` stops the generation within a token."""
