"""One conversation schema inside fabrika, converted from the formats people publish datasets in.

Inside, a conversation is a list of OpenAI-style messages `{"role": "system"|"user"|"assistant",
"content": str}`. Every reader (collect, sft, evaluate) goes through `to_messages`, so a ShareGPT
file, an Alpaca file and a Tagengo dump all become the same thing at the edge, and a malformed row is
reported with its id and reason instead of failing somewhere inside a trainer.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from fabrika.errors import FabrikaError

FORMATS = ("messages", "sharegpt", "alpaca", "chatml", "prompt", "text")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}


class RowError(ValueError):
    """A row that cannot become a conversation; callers count these and show the first few."""


def detect_format(row: dict[str, Any], text_field: str = "text") -> str:
    """Guess a row's format from its columns (the order matters: Tagengo rows have `conversations`
    and also a `response`)."""
    if isinstance(row.get("messages"), list):
        return "messages"
    if isinstance(row.get("conversations"), list):
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    text = row.get(text_field)
    if isinstance(text, str):
        return "chatml" if "<|im_start|>" in text else "text"
    if isinstance(row.get("prompt"), str):
        return "prompt"
    raise RowError(f"cannot tell the format from the columns {sorted(row)}; expected one of: messages, "
                   "conversations (ShareGPT), instruction/output (Alpaca), text, prompt")


def _message(role: Any, content: Any) -> dict[str, str]:
    if role not in ("system", "user", "assistant"):
        raise RowError(f"unknown role {role!r}")
    if not isinstance(content, str):
        raise RowError(f"{role} message content is {type(content).__name__}, expected text")
    return {"role": role, "content": content}


_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.S)


def to_messages(row: dict[str, Any], fmt: str = "auto", text_field: str = "text",
                prompt_field: str = "prompt") -> list[dict[str, str]]:
    """Convert one row to messages; raises RowError with the reason when it cannot."""
    if fmt == "auto":
        fmt = detect_format(row, text_field)
    if fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list):
            raise RowError("`messages` is not a list")
        out = []
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RowError("a message lacks `role` or `content`")
            out.append(_message(m["role"], m["content"]))
        return out
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise RowError("`conversations` is not a list")
        out = []
        for t in turns:
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise RowError("a ShareGPT turn lacks `from` or `value`")
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise RowError(f"unknown ShareGPT speaker {t['from']!r}")
            out.append(_message(role, t["value"]))
        return out
    if fmt == "alpaca":
        instruction, extra = row.get("instruction") or "", row.get("input") or ""
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        out = [_message("user", prompt)]
        if row.get("output") is not None:
            out.append(_message("assistant", row["output"]))
        return out
    if fmt == "chatml":
        text = row.get(text_field)
        if not isinstance(text, str):
            raise RowError(f"`{text_field}` is not text")
        found = [_message(role, content) for role, content in _CHATML.findall(text)]
        if not found:
            raise RowError("no <|im_start|>role ... <|im_end|> blocks in the text")
        return found
    if fmt == "text":
        raise RowError(f"`{text_field}` holds plain text, not a conversation (no <|im_start|> blocks)")
    if fmt == "prompt":
        value = row.get(prompt_field)
        if not isinstance(value, str):
            raise RowError(f"`{prompt_field}` is not text")
        return [_message("user", value)]
    raise FabrikaError(f"unknown format {fmt!r}; known: auto, {', '.join(FORMATS)}")


def check_conversation(messages: list[dict[str, str]], need_answer: bool = True) -> None:
    """Roles must be: an optional system message, then user/assistant alternating from the user;
    for training the last message must be the assistant's, and no message may be empty."""
    if not messages:
        raise RowError("empty conversation")
    rest = messages[1:] if messages[0]["role"] == "system" else messages
    if not rest:
        raise RowError("only a system message")
    for i, m in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowError(f"roles out of order: message {i + 1} is {m['role']!r}, expected {expected!r}")
        if not m["content"].strip():
            raise RowError(f"message {i + 1} ({m['role']}) is empty")
    if need_answer and rest[-1]["role"] != "assistant":
        raise RowError("no assistant answer at the end")


def convert_rows(rows: Iterable[tuple[Any, dict[str, Any]]], fmt: str = "auto", need_answer: bool = True,
                 **fields: str) -> tuple[list[list[dict[str, str]]], list[tuple[Any, str]]]:
    """Convert (row_id, row) pairs; return the conversations and the (row_id, reason) of bad rows."""
    good, bad = [], []
    for row_id, row in rows:
        try:
            msgs = to_messages(row, fmt, **fields)
            check_conversation(msgs, need_answer)
            good.append(msgs)
        except RowError as e:
            bad.append((row_id, str(e)))
    return good, bad


def prompt_messages(row: dict[str, Any], fmt: str = "auto", prompt_field: str = "prompt") -> list[dict[str, str]]:
    """A row as a prompt to be answered: earlier turns stay as context, a trailing answer is cut off
    (the model asked answers the last user message afresh); raises RowError when it cannot."""
    msgs = to_messages(row, fmt, prompt_field=prompt_field)
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    check_conversation(msgs, need_answer=False)
    return msgs
