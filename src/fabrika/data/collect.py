"""Distillation: sample prompts people really ask, have a teacher answer them, keep the good answers.

    fabrika collect --source lightblue/tagengo-gpt4 --quota ru=1000,en=1000,zh=1000 \\
        --teacher openai:gpt-4o --out runs/x/collect [--concurrency 64] [--config collect.yaml]

or as the `collect` stage of a pipeline. Every teacher response is appended to `journal.jsonl`
(written at once, fsync'd every second) before anything else happens to it, rejected ones too with
their reason; a crash, Ctrl-C or kill -9 followed by the same command asks only for what is missing,
so nothing paid for is lost and the dataset equals an uninterrupted run's. In preference mode each prompt gets k candidate answers
that a judge grades (FastChat's single-answer prompt); the best and worst become chosen/rejected.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from fabrika.artifacts import Artifact, Journal, RunContext, atomic_write_text, read_jsonl
from fabrika.config import Config
from fabrika.data import filters as F
from fabrika.data.formats import RowError, check_conversation, detect_format, to_messages
from fabrika.data.sources import load_dataset_any
from fabrika.errors import FabrikaError
from fabrika.infer.backends import GenerationParams, load_generator, parse_ref

JOURNAL = "journal.jsonl"


class PreferenceParams(Config):
    k: int = Field(4, ge=2, le=16, description="Candidate answers per prompt.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature of the candidates.")
    judge: str = Field("judge", description="Judge model reference that grades the candidates.")


class CollectConfig(Config):
    source: str = Field(description="Hub dataset id, dataset directory, or JSONL/JSON/Parquet/CSV file(s).")
    split: str = Field("train", description="Split of the source.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt"] = Field("auto", description="Row format.")
    prompt_field: str = Field("prompt", description="Column of a plain-prompt source.")
    id_field: str | None = Field(None, description="Column with a stable row id (default: conversation_id/id/row).")
    language_field: str | None = Field("language", description="Column with the language; detected when absent.")
    quota: dict[str, int] | None = Field(None, description="Prompts per language, e.g. {ru: 1000, en: 1000}.")
    seed: int = Field(3407, description="Sampling seed.")
    min_chars: int = Field(8, ge=0, description="Shortest prompt kept.")
    max_chars: int = Field(8000, ge=1, description="Longest prompt kept.")
    teacher: str = Field(description="Teacher model reference (openai:gpt-4o, a named model, hf:DIR, ...).")
    system_prompt: str | None = Field(None, description="System prompt sent to the teacher.")
    temperature: float = Field(0.0, ge=0, description="Teacher sampling temperature.")
    max_tokens: int = Field(2048, ge=1, description="Longest teacher answer.")
    n: int = Field(1, ge=1, le=8, description="Answers per prompt.")
    filters: list[str] = Field(default_factory=lambda: list(F.FILTERS), description="Filters applied to answers.")
    refusal_patterns: list[str] = Field(default_factory=list, description="Extra refusal regexes.")
    client: dict[str, Any] = Field(default_factory=dict, description="Client settings (concurrency, limits, ...).")
    preference: PreferenceParams | None = Field(None, description="Preference mode: chosen/rejected pairs.")
    push_to_hub: str | None = Field(None, description="Also push the dataset to this Hub repo (private).")

    @field_validator("filters")
    @classmethod
    def _filters(cls, v):
        unknown = [f for f in v if f not in F.FILTERS]
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown}; known: {', '.join(F.FILTERS)}")
        return v

    @field_validator("quota", mode="before")
    @classmethod
    def _quota(cls, v):
        if isinstance(v, str):  # ru=1000,en=1000 from the command line
            try:
                return {k.strip(): int(n) for k, n in (p.split("=") for p in v.split(",") if p.strip())}
            except ValueError:
                raise ValueError("expected LANG=N,LANG=N (e.g. ru=1000,en=1000)") from None
        return v


CONFIG = CollectConfig


def inputs(cfg: CollectConfig) -> list[str]:
    return [cfg.source, cfg.teacher] + ([cfg.preference.judge] if cfg.preference else [])


# --- sampling --------------------------------------------------------------------------------

def sample_prompts(cfg: CollectConfig, ref: str, say=print) -> tuple[list[dict], dict[str, Any]]:
    """Convert, clean, deduplicate and sample the prompts; the last user turn is what the teacher answers."""
    ds = load_dataset_any(ref, cfg.split)
    cols = ds.column_names
    needed = {"messages": ["messages"], "sharegpt": ["conversations"], "alpaca": ["instruction", "output"],
              "prompt": [cfg.prompt_field]}.get(cfg.format, [])
    missing = [c for c in needed if c not in cols]
    if cfg.format == "auto" and len(ds):
        try:
            detect_format(ds[0])
        except RowError as e:
            raise FabrikaError(f"collect.source: {ref}: {e}") from None
    if missing:
        raise FabrikaError(f"collect.source: {ref} has no column {', '.join(map(repr, missing))} (format "
                           f"{cfg.format}); it has: {', '.join(cols)}")
    id_field = cfg.id_field or next((c for c in ("conversation_id", "id", "question_id") if c in cols), None)
    if cfg.id_field and cfg.id_field not in cols:
        raise FabrikaError(f"collect.id_field: {ref} has no column {cfg.id_field!r}; it has: {', '.join(cols)}")
    lang_col = cfg.language_field if cfg.language_field in cols else None
    codes = tuple(sorted(cfg.quota)) if cfg.quota else ("en",)
    if cfg.quota:
        F.check_languages(list(cfg.quota))
    stats: Counter = Counter()
    bad: list[tuple[Any, str]] = []
    seen: set[str] = set()
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for i, row in enumerate(ds):
        rid = str(row[id_field]) if id_field else str(i)
        try:
            msgs = to_messages(row, cfg.format, prompt_field=cfg.prompt_field)
            # keep earlier turns as context; the teacher answers the last user message
            while msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            check_conversation(msgs, need_answer=False)
        except RowError as e:
            bad.append((rid, str(e)))
            continue
        prompt = msgs[-1]["content"]
        if not cfg.min_chars <= len(prompt) <= cfg.max_chars:
            stats["length_out_of_bounds"] += 1
            continue
        key = hashlib.sha1(F.normalized(" ".join(m["content"] for m in msgs)).encode()).hexdigest()
        if key in seen:
            stats["duplicate_prompts"] += 1
            continue
        seen.add(key)
        lang = F.language_code(row[lang_col]) if lang_col and row.get(lang_col) else F.detect(prompt, codes)
        by_lang[lang or "?"].append({"id": rid, "messages": msgs, "language": lang})
    if bad:
        say(f"{ref}: skipped {len(bad)} malformed rows (first: {', '.join(f'{i}: {w}' for i, w in bad[:3])})")
    rng = random.Random(cfg.seed)
    picked: list[dict] = []
    for lang in sorted(cfg.quota or by_lang):
        pool = sorted(by_lang.get(lang, []), key=lambda r: r["id"])
        want = (cfg.quota or {}).get(lang, len(pool))
        if len(pool) < want:
            say(f"collect: only {len(pool)} {lang} prompts for a quota of {want}")
        rng.shuffle(pool)
        picked += pool[:want]
        stats[f"sampled_{lang}"] = min(want, len(pool))
    stats["malformed_rows"] = len(bad)
    if not picked:
        raise FabrikaError(f"collect: no prompts left from {ref} (languages found: {dict((k, len(v)) for k, v in by_lang.items())})")
    return picked, dict(stats)


# --- asking the teacher, journaled -----------------------------------------------------------

def _conv(cfg: CollectConfig, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + messages


def ask(ref: str, convs: list[list[dict]], params: GenerationParams, client: dict[str, Any], quiet: bool, on_result):
    """Answers through the client for API teachers (cached, retried), or a local generator."""
    kind, target = parse_ref(ref)
    if kind == "openai":
        from fabrika.infer.client import ClientConfig, run_requests

        model, _, url = target.partition("@")
        run_requests(ClientConfig(**({"base_url": url} if url else {}), **client), model, convs, params,
                     quiet=quiet, on_result=on_result)
    else:
        gen = load_generator(ref)
        for start in range(0, len(convs), 16):
            for j, res in enumerate(gen.generate(convs[start:start + 16], params)):
                on_result(start + j, res)


def run(cfg: CollectConfig, ctx: RunContext) -> Artifact:
    out = ctx.stage_dir
    source = ctx.resolve(cfg.source)
    teacher = ctx.resolve_model(cfg.teacher)
    say = (lambda m: None) if ctx.quiet else print
    prompts, stats = sample_prompts(cfg, source, say)
    journal = out / JOURNAL
    done = {(r["id"], r.get("kind", "answer")) for r in read_jsonl(journal)}
    codes = tuple(sorted(cfg.quota)) if cfg.quota else tuple(sorted({p["language"] for p in prompts if p["language"]}))
    client = {"cache_dir": str(out / "cache"), **cfg.client}
    extra = tuple(cfg.refusal_patterns)
    pref = cfg.preference

    todo = [p for p in prompts if (p["id"], "answer") not in done]
    if todo:
        say(f"collect: {len(todo)} prompts to send to {teacher} ({len(prompts) - len(todo)} already answered)")
        n = pref.k if pref else cfg.n
        params = GenerationParams(temperature=pref.temperature if pref else cfg.temperature,
                                  max_new_tokens=cfg.max_tokens, n=n, seed=cfg.seed)

        journaled = [0]
        failed: list[str] = []
        kill_after = int(os.environ.get("FABRIKA_FAULT_KILL_AFTER_ROWS", "0"))

        def keep(i: int, result) -> None:
            p = todo[i]
            if isinstance(result, Exception):
                failed.append(f"{p['id']}: {result}")  # not journaled: a rerun asks again
                return
            rows = []
            for j, c in enumerate(result):
                reason = F.drop_reason(c.text, c.finish_reason, p["language"], cfg.filters, codes, extra)
                rows.append({"text": c.text, "finish_reason": c.finish_reason, "drop": reason,
                             "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                             "cost": c.cost, "index": j})
            log.append({"id": p["id"], "kind": "answer", "language": p["language"], "teacher": cfg.teacher,
                        "answers": rows, "time": time.time()})
            journaled[0] += 1
            if kill_after and journaled[0] >= kill_after:  # test hook: die like kill -9 in the middle
                os.kill(os.getpid(), signal.SIGKILL)

        try:
            with Journal(journal) as log:
                ask(teacher, [_conv(cfg, p["messages"]) for p in todo], params, client, ctx.quiet, keep)
        except FabrikaError as e:
            raise FabrikaError(f"collect: {e}\n{journaled[0]} answers of this run are safe in {journal}; "
                               "run the same command again to continue") from None
        if failed:
            raise FabrikaError(f"collect: {len(failed)} of {len(todo)} requests to {teacher} failed (first: "
                               f"{failed[0]}); {journaled[0]} answers are safe in {journal}; run the same "
                               "command again to ask only for the missing ones")

    answers = {r["id"]: r for r in read_jsonl(journal) if r.get("kind", "answer") == "answer"}
    if pref:
        _grade_candidates(cfg, ctx, prompts, answers, journal, client)
    return _write_dataset(cfg, ctx, prompts, answers, stats)


def _grade_candidates(cfg: CollectConfig, ctx: RunContext, prompts: list[dict], answers: dict, journal: Path,
                      client: dict[str, Any]) -> None:
    from fabrika.evaluate import judge as J

    graded = {r["id"] for r in read_jsonl(journal) if r.get("kind") == "grades"}
    single = J.load_prompts("fastchat")["single-v1"]
    jobs = []
    for p in prompts:
        a = answers.get(p["id"])
        if a is None or p["id"] in graded:
            continue
        cands = [c for c in a["answers"] if c["drop"] is None]
        if len(cands) < 2:
            continue
        for c in cands:
            user = single["prompt_template"].format(question=p["messages"][-1]["content"], answer=c["text"])
            jobs.append((p["id"], c["index"], [{"role": "system", "content": single["system_prompt"]},
                                               {"role": "user", "content": user}]))
    grades: dict[str, list] = defaultdict(list)
    expected = Counter(pid for pid, _, _ in jobs)

    def keep(i: int, result) -> None:
        pid, idx, _ = jobs[i]
        text = "" if isinstance(result, Exception) else result[0].text
        grades[pid].append({"index": idx, "score": J.parse_rating(text), "judgment": text})
        if len(grades[pid]) == expected[pid]:
            log.append({"id": pid, "kind": "grades", "grades": sorted(grades[pid], key=lambda g: g["index"])})

    if jobs:
        with Journal(journal) as log:
            ask(ctx.resolve_model(cfg.preference.judge), [j[2] for j in jobs],
                GenerationParams(temperature=0.0, max_new_tokens=1024), client, ctx.quiet, keep)


def _write_dataset(cfg: CollectConfig, ctx: RunContext, prompts: list[dict], answers: dict,
                   stats: dict[str, Any]) -> Artifact:
    import datasets

    out = ctx.stage_dir
    table: dict[str, Counter] = defaultdict(Counter)
    rows = []
    grades = {r["id"]: r["grades"] for r in read_jsonl(out / JOURNAL) if r.get("kind") == "grades"}
    seen_answers: set[str] = set()
    for p in prompts:
        lang = p["language"] or "?"
        t = table[lang]
        t["sampled"] += 1
        a = answers.get(p["id"])
        if a is None:
            t["unanswered"] += 1
            continue
        t["answered"] += 1
        for c in a["answers"]:
            t["tokens"] += c["prompt_tokens"] + c["completion_tokens"]
            t["cost_usd"] += c["cost"]
        if cfg.preference:
            g = sorted((x for x in grades.get(p["id"], []) if x["score"] != -1), key=lambda x: -x["score"])
            if len(g) < 2 or g[0]["score"] == g[-1]["score"]:
                t["dropped:no_preference"] += 1
                continue
            by_idx = {c["index"]: c for c in a["answers"]}
            rows.append({"prompt": p["messages"], "chosen": [{"role": "assistant", "content": by_idx[g[0]["index"]]["text"]}],
                         "rejected": [{"role": "assistant", "content": by_idx[g[-1]["index"]]["text"]}],
                         "chosen_score": g[0]["score"], "rejected_score": g[-1]["score"],
                         "reasons": [g[0]["judgment"], g[-1]["judgment"]], "language": lang, "id": p["id"],
                         "source": cfg.source, "teacher": a["teacher"]})
            t["kept"] += 1
            continue
        for c in a["answers"]:
            reason = c["drop"]
            if reason is None and "duplicate" in cfg.filters:
                key = F.normalized(c["text"])
                reason = "duplicate" if key in seen_answers else None
                seen_answers.add(key)
            if reason:
                t[f"dropped:{reason}"] += 1
                continue
            t["kept"] += 1
            rows.append({"messages": p["messages"] + [{"role": "assistant", "content": c["text"]}], "language": lang,
                         "source": cfg.source, "id": p["id"], "teacher": a["teacher"],
                         "finish_reason": c["finish_reason"], "prompt_tokens": c["prompt_tokens"],
                         "completion_tokens": c["completion_tokens"]})
    if not rows:
        raise FabrikaError(f"collect: no answer survived the filters ({dict((k, dict(v)) for k, v in table.items())})")
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(out / "dataset"))
    ds.to_parquet(str(out / "data.parquet"))
    if not cfg.preference:
        ds.map(lambda r: {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                             "value": m["content"]} for m in r["messages"]]}
               ).select_columns(["id", "language", "conversations"]).to_json(str(out / "sharegpt.jsonl"), force_ascii=False)
    summary = {lang: dict(c) for lang, c in sorted(table.items())}
    atomic_write_text(out / "README.md", _card(cfg, summary, len(rows), stats))
    _print_summary(summary, ctx.quiet)
    if cfg.push_to_hub:
        ds.push_to_hub(cfg.push_to_hub, private=True)
    totals = Counter()
    for c in table.values():
        totals.update(c)
    metrics = {"kept": totals["kept"], "answered": totals["answered"], "cost_usd": round(totals["cost_usd"], 4),
               "tokens": totals["tokens"], "by_language": summary, **stats}
    return ctx.finish(out / "dataset", cfg, metrics=metrics)


def _print_summary(summary: dict[str, dict], quiet: bool) -> None:
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    reasons = sorted({k for c in summary.values() for k in c if k.startswith("dropped:")})
    table = Table(title="collect")
    for col in ["language", "sampled", "answered", "kept", *[r.split(":")[1] for r in reasons], "tokens", "cost $"]:
        table.add_column(col, justify="right")
    for lang, c in summary.items():
        table.add_row(lang, *(str(c.get(k, 0)) for k in ["sampled", "answered", "kept", *reasons, "tokens"]),
                      f"{c.get('cost_usd', 0):.4f}")
    Console().print(table)


def _card(cfg: CollectConfig, summary: dict[str, dict], rows: int, stats: dict[str, Any]) -> str:
    lines = ["---", "license: other", "tags: [fabrika, distillation]", "---", "",
             f"# Distilled dataset from {cfg.source}", "",
             f"Answers by `{cfg.teacher}` (temperature {cfg.temperature}, max {cfg.max_tokens} tokens), "
             f"filters: {', '.join(cfg.filters)}. {rows} rows. Made with fabrika.", "",
             "| language | sampled | answered | kept | dropped | tokens | cost $ |", "|---|---|---|---|---|---|---|"]
    for lang, c in summary.items():
        dropped = ", ".join(f"{k.split(':')[1]} {v}" for k, v in c.items() if k.startswith("dropped:")) or "0"
        lines.append(f"| {lang} | {c.get('sampled', 0)} | {c.get('answered', 0)} | {c.get('kept', 0)} | {dropped} | "
                     f"{c.get('tokens', 0)} | {c.get('cost_usd', 0):.4f} |")
    lines += ["", "Sampling: " + ", ".join(f"{k} {v}" for k, v in stats.items())]
    return "\n".join(lines) + "\n"


def estimate(cfg: CollectConfig, ctx: RunContext) -> dict[str, Any]:
    from fabrika.infer.client import DEFAULT_PRICES

    n = sum(cfg.quota.values()) if cfg.quota else None
    model = ctx.resolve_model(cfg.teacher).removeprefix("openai:").split("@")[0]
    p_in, p_out = DEFAULT_PRICES.get(model, (0.0, 0.0))
    k = cfg.preference.k if cfg.preference else cfg.n
    out: dict[str, Any] = {"api_calls": n if n else "all rows"}
    if n:  # ~200 prompt tokens, ~600 answer tokens per call on chat data like Tagengo
        out["est_cost_usd"] = round(n * (200 * p_in + 600 * k * p_out) / 1e6, 2)
    return out
