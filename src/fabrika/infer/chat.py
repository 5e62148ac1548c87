"""Talk to a model in the terminal, or answer one query for a script; compare two models side by side.

    fabrika chat hf:runs/x/sft/model            # /reset  /system TEXT  /save FILE  /exit
    fabrika chat gguf:model.gguf --query "Hi"   # prints only the answer
    fabrika compare hf:A hf:B --prompts prompts.txt --out cmp.html
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import TextIO

from fabrika.artifacts import atomic_write_json, atomic_write_text
from fabrika.data.formats import RowError, check_conversation, to_messages
from fabrika.errors import FabrikaError
from fabrika.infer.backends import load_generator
from fabrika.infer.generation import GenerationParams

HELP = "commands: /reset, /system TEXT, /save FILE, /exit"


def query(model: str, text: str, params: GenerationParams, system: str | None = None,
          engine: str | None = None) -> str:
    gen = load_generator(model, engine=engine)
    conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return gen.generate([conv], params)[0][0].text


def interactive(model: str, params: GenerationParams, system: str | None = None, stdin: TextIO = sys.stdin,
                out: TextIO = sys.stdout, engine: str | None = None) -> None:
    gen = load_generator(model, engine=engine)
    history: list[dict[str, str]] = []
    system_msg = system

    def say(s: str = "", end: str = "\n") -> None:
        out.write(s + end)
        out.flush()

    say(f"chatting with {model} — {HELP}")
    while True:
        out.write("you> ")
        out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/exit":
                break
            if cmd == "/reset":
                history.clear()
                say("(history cleared)")
            elif cmd == "/system":
                system_msg = arg or None
                say(f"(system prompt {'set' if arg else 'cleared'})")
            elif cmd == "/save":
                if not arg:
                    say("usage: /save FILE")
                    continue
                conv = ([{"role": "system", "content": system_msg}] if system_msg else []) + history
                atomic_write_json(arg, {"model": model, "messages": conv})
                say(f"(saved {len(conv)} messages to {arg})")
            else:
                say(HELP)
            continue
        history.append({"role": "user", "content": line})
        conv = ([{"role": "system", "content": system_msg}] if system_msg else []) + history
        out.write("bot> ")
        answer = ""
        try:
            for piece in gen.stream(conv, params):
                answer += piece
                out.write(piece)
                out.flush()
        except FabrikaError as e:
            history.pop()
            say(f"\n(error: {e})")
            continue
        say()
        history.append({"role": "assistant", "content": answer})


def read_prompts(path: str) -> list[list[dict[str, str]]]:
    """Prompts from a .txt file (one a line) or a .jsonl file of `prompt` or `messages` rows; a bad line
    is named with its number before any model is loaded."""
    p = Path(path)
    if not p.is_file():
        raise FabrikaError(f"--prompts: {path} not found")
    convs = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise FabrikaError(f"--prompts: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FabrikaError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict) or not ("messages" in row or "prompt" in row):
                raise FabrikaError(f"{path}:{n}: expected an object with a `prompt` or `messages` field")
            try:
                conv = to_messages(row, "messages" if "messages" in row else "prompt")
                check_conversation(conv, need_answer=False)
            except RowError as e:
                raise FabrikaError(f"{path}:{n}: {e}") from None
            convs.append(conv)
        else:
            convs.append([{"role": "user", "content": line}])
    if not convs:
        raise FabrikaError(f"--prompts: {path} has no prompts")
    return convs


def compare(model_a: str, model_b: str, prompts: str, out: str, params: GenerationParams,
            engine: str | None = None) -> Path:
    convs = read_prompts(prompts)
    answers = [[c[0].text for c in load_generator(m, engine=engine).generate(convs, params)] for m in (model_a, model_b)]
    out_path = Path(out)
    if out_path.suffix in (".html", ".htm"):
        rows = "".join(f"<tr><td>{html.escape(c[-1]['content'])}</td><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>"
                       for c, a, b in zip(convs, *answers))
        doc = (f"<!doctype html><meta charset='utf-8'><title>compare</title><style>table{{border-collapse:collapse}}"
               f"td,th{{border:1px solid #ccc;padding:6px;vertical-align:top;white-space:pre-wrap}}</style>"
               f"<table><tr><th>prompt</th><th>{html.escape(model_a)}</th><th>{html.escape(model_b)}</th></tr>{rows}</table>")
        atomic_write_text(out_path, doc)
    else:
        def cell(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", "<br>")

        lines = [f"| prompt | {cell(model_a)} | {cell(model_b)} |", "|---|---|---|"]
        lines += [f"| {cell(c[-1]['content'])} | {cell(a)} | {cell(b)} |" for c, a, b in zip(convs, *answers)]
        atomic_write_text(out_path, "\n".join(lines) + "\n")
    return out_path
