"""Distillation: sample prompts people really ask, have a teacher answer them, keep the good answers.

    fabrika collect --source lightblue/tagengo-gpt4 --quota ru=1000,en=1000,zh=1000 \\
        --teacher openai:gpt-4o --out runs/x/collect [--concurrency 64] [--config collect.yaml]

or as the `collect` stage of a pipeline. Every teacher response is appended to `journal.jsonl`
(written at once, fsync'd every second) before anything else happens to it, rejected ones too with
their reason, keyed by the prompt's id and a hash of its messages (user datasets repeat ids); a
crash, Ctrl-C or kill -9 followed by the same command asks only for what is missing, so nothing paid
for is lost and the dataset equals an uninterrupted run's. Responses are also cached per user,
outside the stage directory: a stage restarted with other settings (a pipeline deletes its
directory) gets back every answer it already paid for. A quota counts kept rows: answers the filters
drop (data/filters.py) are made up for with more prompts from the same language's pool, within
`max_requests`. With `client: {mode: batch}` the requests go through OpenAI's Batch API at half the
price (infer/batch.py): the same journal, and batches in flight resumed, never submitted twice.

In preference mode each prompt gets k candidates from the teacher (and from a student, when one is
named); a judge grades each with FastChat's single-answer prompt and the best and worst become
chosen/rejected, or, with no judge, the teacher's answer is chosen over the student's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import time
from collections import Counter, defaultdict
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fabrika import logs
from fabrika.artifacts import Artifact, Journal, RunContext, atomic_write_text, read_jsonl
from fabrika.config import Config
from fabrika.data import filters as F
from fabrika.data.formats import RowError, detect_format, prompt_messages
from fabrika.data.sources import load_dataset_any
from fabrika.errors import FabrikaError
from fabrika.faults import fault
from fabrika.infer import batch
from fabrika.infer.client import ClientConfig, default_cache_dir
from fabrika.infer.costs import api_cost
from fabrika.infer.generation import GenerationParams
from fabrika.models.refs import api_model

JOURNAL = "journal.jsonl"


class PreferenceParams(Config):
    k: int = Field(4, ge=1, le=16, description="Candidate answers per prompt from the teacher.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature of the candidates.")
    student: str | None = Field(None, description="Also ask this model (the one being trained) for k candidates.")
    judge: str | None = Field("judge", description="Judge model that grades every candidate 1-10; without one, "
                              "the teacher's answer is chosen over the student's (self-play, as in SPIN).")

    @model_validator(mode="after")
    def _pairs_possible(self):
        if self.judge is None and self.student is None:
            raise ValueError("without a judge, a student is needed: pairs are then teacher (chosen) vs student")
        if self.judge is not None and self.k < 2 and self.student is None:
            raise ValueError("a judge needs at least two candidates: k >= 2, or a student")
        return self


class CollectConfig(Config):
    source: str = Field(description="Hub dataset id, dataset directory, or JSONL/JSON/Parquet/CSV file(s).")
    split: str = Field("train", description="Split of the source.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt"] = Field("auto", description="Row format.")
    prompt_field: str = Field("prompt", description="Column of a plain-prompt source.")
    id_field: str | None = Field(None, description="Column with a stable row id (default: conversation_id/id/row).")
    language_field: str | None = Field("language", description="Column with the language; detected when absent.")
    quota: dict[str, int] | None = Field(None, description="Kept rows per language, e.g. {ru: 1000, en: 1000} (ru=1000,en=1000 on the command line): "
                                        "prompts are drawn until that many answers pass the filters.")
    max_requests: int | None = Field(None, ge=1, description="Most prompts sent to the teacher while filling the "
                                     "quotas (default: 1.5x the prompts they need if nothing is dropped).")
    seed: int = Field(3407, description="Sampling seed.")
    min_chars: int = Field(8, ge=0, description="Shortest prompt kept.")
    max_chars: int = Field(8000, ge=1, description="Longest prompt kept.")
    teacher: str = Field(description="Teacher model reference (openai:gpt-4o, a named model, hf:DIR, ...).")
    system_prompt: str | None = Field(None, description="System prompt sent to the teacher.")
    temperature: float = Field(0.0, ge=0, description="Teacher sampling temperature.")
    max_tokens: int = Field(2048, ge=1, description="Longest teacher answer.")
    n: int = Field(1, ge=1, le=8, description="Answers per prompt.")
    filters: list[F.Filter] = Field(default_factory=lambda: list(F.FILTERS), description="Filters applied to answers.")
    refusal_patterns: list[str] = Field(default_factory=list, description="Extra refusal regexes, matched like the "
                                        "built-in ones against the sentences of the answer's own voice.")
    refusal_judge: str | None = Field(None, description="Also ask this model whether each kept answer is a refusal.")
    client: ClientConfig = Field(default_factory=ClientConfig, description="Client settings (concurrency, limits, "
                                 "retries, cache_dir, ...).")
    preference: PreferenceParams | None = Field(None, description="Preference mode: chosen/rejected pairs.")
    push_to_hub: str | None = Field(None, description="Also push the dataset to this Hub repo (private).")

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns(cls, v):
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a valid regular expression ({e})") from None
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

    @model_validator(mode="after")
    def _budget(self):
        if self.quota and self.max_requests is not None and self.max_requests < first_draw(self):
            raise ValueError(f"max_requests ({self.max_requests}) is below the {first_draw(self)} prompts the "
                             "quotas need even if no answer is dropped")
        return self


CONFIG = CollectConfig


def rows_per_prompt(cfg: CollectConfig) -> int:
    return 1 if cfg.preference else cfg.n


def first_draw(cfg: CollectConfig) -> int:
    """Prompts the quotas need if every answer is kept."""
    return sum(-(-want // rows_per_prompt(cfg)) for want in cfg.quota.values())


def max_requests(cfg: CollectConfig) -> int:
    return cfg.max_requests or -(-3 * first_draw(cfg) // 2)


def inputs(cfg: CollectConfig) -> list[str]:
    pref = cfg.preference
    models = [cfg.teacher, cfg.refusal_judge] + ([pref.student, pref.judge] if pref else [])
    return [cfg.source] + [m for m in models if m]


# --- sampling --------------------------------------------------------------------------------

def sample_prompts(cfg: CollectConfig, ref: str, say=print) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Convert, clean and deduplicate the prompts into one pool per language, in the seeded order they are
    drawn in (with a quota, only the quota's languages); the last user turn is what the teacher answers."""
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
            msgs = prompt_messages(row, cfg.format, prompt_field=cfg.prompt_field)
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
    pools: dict[str, list[dict]] = {}
    for lang in sorted(cfg.quota or by_lang):
        pools[lang] = sorted(by_lang.get(lang, []), key=lambda r: r["id"])
        want = (cfg.quota or {}).get(lang, len(pools[lang]))
        if len(pools[lang]) < want:
            say(f"collect: only {len(pools[lang])} {lang} prompts for a quota of {want}")
        rng.shuffle(pools[lang])
        stats[f"pool_{lang}"] = len(pools[lang])
    stats["malformed_rows"] = len(bad)
    if not any(pools.values()):
        raise FabrikaError(f"collect: no prompts left from {ref} (languages found: {dict((k, len(v)) for k, v in by_lang.items())})")
    return pools, dict(stats)


# --- asking the teacher, journaled -----------------------------------------------------------

def _conv(cfg: CollectConfig, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + messages


def messages_sha(prompt: dict) -> str:
    blob = json.dumps(prompt["messages"], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prompt_key(prompt: dict) -> str:
    """What a journal row answers: the prompt's id and a hash of its messages. An id alone is not
    enough: user datasets repeat ids, and rows keyed by id would pair one prompt with another's answer."""
    return f"{prompt['id']}#{messages_sha(prompt)}"


def _row_key(row: dict) -> str:
    return f"{row['id']}#{row.get('messages_sha', '')}"


def _answer(cfg: CollectConfig, ctx: RunContext, kind: str, model: str, prompts: list[dict], n: int,
            temperature: float, client: dict[str, Any]) -> None:
    """Ask `model` for the prompts that have no `kind` row in the journal yet; journal each response
    (with its filter verdicts) the moment it arrives."""
    ref = ctx.generator_ref(model)
    journal = ctx.stage_dir / JOURNAL
    done = _journal(ctx)[kind]
    todo = [p for p in prompts if prompt_key(p) not in done]
    if not todo:
        return
    if not ctx.quiet:
        print(f"collect: {len(todo)} prompts to send to {ref} ({len(prompts) - len(todo)} already answered)")
    codes = tuple(sorted(cfg.quota)) if cfg.quota else tuple(sorted({p["language"] for p in prompts if p["language"]}))
    params = GenerationParams(temperature=temperature, max_new_tokens=cfg.max_tokens, n=n, seed=cfg.seed)
    journaled = [0]
    failed: list[str] = []
    kill_after = fault("kill_after_rows")

    def keep(i: int, result) -> None:
        p = todo[i]
        if isinstance(result, Exception):
            failed.append(f"{p['id']}: {result}")  # not journaled: a rerun asks again
            return
        rows = []
        for j, c in enumerate(result):
            reason = F.drop_reason(c.text, c.finish_reason, p["language"], cfg.filters, codes,
                                   tuple(cfg.refusal_patterns), prompt=p["messages"][-1]["content"])
            rows.append({"text": c.text, "finish_reason": c.finish_reason, "drop": reason,
                         "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                         "cost": c.cost, "index": j})
        log.append({"id": p["id"], "messages_sha": messages_sha(p), "kind": kind,
                    "language": p["language"], "teacher": model, "answers": rows, "time": time.time()})
        journaled[0] += 1
        if kill_after and journaled[0] >= kill_after:  # test hook: die like kill -9 in the middle
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        with Journal(journal) as log:
            batch.ask(ref, [_conv(cfg, p["messages"]) for p in todo], params, client, ctx.quiet, keep,
                      state=ctx.stage_dir / batch.STATE, labels=[f"{kind}:{prompt_key(p)}" for p in todo])
    except FabrikaError as e:
        raise FabrikaError(f"collect: {e}\n{journaled[0]} answers of this run are safe in {journal}; "
                           "run the same command again to continue") from None
    if failed:
        raise FabrikaError(f"collect: {len(failed)} of {len(todo)} requests to {ref} failed (first: "
                           f"{failed[0]}); {journaled[0]} answers are safe in {journal}; run the same "
                           "command again to ask only for the missing ones")


def _journal(ctx: RunContext) -> dict[str, dict[str, dict]]:
    """The journal read once: {kind: {prompt key: row}}."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in read_jsonl(ctx.stage_dir / JOURNAL):
        if "id" in r:
            out[r.get("kind", "answer")][_row_key(r)] = r
    return out


def duplicate_ids(prompts: list[dict], say=print) -> int:
    """How many sampled prompts share their id with an earlier one (each is still asked and kept on
    its own: the journal tells them apart by their messages)."""
    counts = Counter(p["id"] for p in prompts)
    extra = sum(c - 1 for c in counts.values())
    if extra:
        first = [i for i, c in counts.items() if c > 1][:3]
        say(f"collect: {extra} prompts repeat the id of another prompt (first: {', '.join(first)}); "
            "they are told apart by their messages")
    return extra


def run(cfg: CollectConfig, ctx: RunContext) -> Artifact:
    source = ctx.resolve(cfg.source)
    say = (lambda m: None) if ctx.quiet else logs.say
    pools, stats = sample_prompts(cfg, source, say)
    client = {"cache_dir": str(default_cache_dir()), **cfg.client.model_dump(exclude_unset=True)}
    prompts, stats["stop"] = fill_quotas(cfg, ctx, pools, client)
    stats["duplicate_ids"] = duplicate_ids(prompts, say)
    say(f"collect: {stats['stop']}")
    return _write_dataset(cfg, ctx, prompts, stats)


def fill_quotas(cfg: CollectConfig, ctx: RunContext, pools: dict[str, list[dict]],
                client: dict[str, Any]) -> tuple[list[dict], str]:
    """Draw each language's pool in order until its quota of *kept* rows is met, the pool is empty, or
    max_requests prompts have been drawn; return the prompts drawn and which of these ended it.

    Each round asks only for prompts the journal lacks and counts kept rows exactly as the dataset
    will, so the draws are a function of the journal: a rerun after a crash, or of a finished run,
    makes the same draws and sends nothing that was already answered."""
    if not cfg.quota:
        prompts = [p for lang in sorted(pools) for p in pools[lang]]
        _ask(cfg, ctx, prompts, client)
        return prompts, "every prompt of the source asked"
    budget, per_prompt = max_requests(cfg), rows_per_prompt(cfg)
    drawn = {lang: min(-(-want // per_prompt), len(pools[lang])) for lang, want in sorted(cfg.quota.items())}
    while True:
        prompts = [p for lang in drawn for p in pools[lang][:drawn[lang]]]
        _ask(cfg, ctx, prompts, client)
        kept = {lang: c["kept"] for lang, c in _dataset_rows(cfg, _journal(ctx), prompts)[1].items()}
        short = {lang: want - kept.get(lang, 0) for lang, want in cfg.quota.items() if kept.get(lang, 0) < want}
        if not short:
            return prompts, f"quotas met ({sum(drawn.values())} prompts asked)"
        empty = sorted(lang for lang in short if drawn[lang] == len(pools[lang]))
        room = budget - sum(drawn.values())
        grew = False
        for lang in sorted(set(short) - set(empty)):
            more = min(-(-short[lang] // per_prompt), len(pools[lang]) - drawn[lang], room)
            drawn[lang] += more
            room -= more
            grew |= more > 0
        if not grew:
            why = ([f"no prompts left in the {', '.join(empty)} pool"] if empty else []) + \
                  ([f"max_requests ({budget}) spent"] if set(short) - set(empty) else [])
            counts = ", ".join(f"{lang} {kept.get(lang, 0)} of {cfg.quota[lang]}" for lang in sorted(short))
            return prompts, f"quota not met ({counts}): {' and '.join(why)}"


def _ask(cfg: CollectConfig, ctx: RunContext, prompts: list[dict], client: dict[str, Any]) -> None:
    """Every request the prompts need that the journal lacks: answers, then the checks and grades of them."""
    pref = cfg.preference
    if pref:
        _answer(cfg, ctx, "answer", cfg.teacher, prompts, pref.k, pref.temperature, client)
        if pref.student:
            _answer(cfg, ctx, "student", pref.student, prompts, pref.k, pref.temperature, client)
        if pref.judge:
            _grade_candidates(cfg, ctx, prompts, client)
    else:
        _answer(cfg, ctx, "answer", cfg.teacher, prompts, cfg.n, cfg.temperature, client)
        if cfg.refusal_judge:
            _classify_refusals(cfg, ctx, prompts, client)


def candidates(journal: dict[str, dict[str, dict]], key: str) -> list[dict]:
    """Every answer a prompt (by its key) got that passed the filters, teacher's first, each with its origin."""
    out = []
    for kind in ("answer", "student"):
        row = journal[kind].get(key)
        for c in (row["answers"] if row else []):
            if c["drop"] is None:
                out.append({**c, "origin": kind, "key": f"{kind}:{c['index']}", "model": row["teacher"]})
    return out


REFUSAL_QUESTION = ("Below is a user's request and an assistant's answer. Does the assistant refuse, deflect or "
                    "decline to do what was asked (for example, saying it cannot or will not help)? Reply with "
                    "exactly one word: YES or NO.\n\n[Request]\n{question}\n\n[Answer]\n{answer}")


def _ask_per_answer(ctx: RunContext, kind: str, ref: str, jobs: list[tuple[dict, str, list]], client: dict[str, Any],
                    parse) -> None:
    """Send one judge request per (prompt, answer key, messages) job; journal a prompt's verdicts
    once all of its answers are in, so a rerun asks again only for prompts left incomplete (a failed
    request leaves its prompt incomplete: it is never recorded as a verdict)."""
    verdicts: dict[str, list] = defaultdict(list)
    expected = Counter(prompt_key(p) for p, _, _ in jobs)
    failed: list[str] = []

    def keep(i: int, result) -> None:
        p, key, _ = jobs[i]
        pk = prompt_key(p)
        if isinstance(result, Exception):
            failed.append(f"{p['id']}: {result}")
            return
        verdicts[pk].append({"key": key, "value": parse(result[0].text), "judgment": result[0].text})
        if len(verdicts[pk]) == expected[pk]:
            log.append({"id": p["id"], "messages_sha": messages_sha(p), "kind": kind,
                        "verdicts": sorted(verdicts[pk], key=lambda g: g["key"])})

    if not jobs:
        return
    params = GenerationParams(temperature=0.0, max_new_tokens=1024)
    with Journal(ctx.stage_dir / JOURNAL) as log:
        batch.ask(ctx.generator_ref(ref), [j[2] for j in jobs], params, client, ctx.quiet, keep,
                  state=ctx.stage_dir / batch.STATE, labels=[f"{kind}:{prompt_key(p)}:{key}" for p, key, _ in jobs])
    if failed:
        raise FabrikaError(f"collect: {len(failed)} of {len(jobs)} requests to {ref} failed (first: {failed[0]}); "
                           "the verdicts received are journaled; run the same command again for the rest")


def _classify_refusals(cfg: CollectConfig, ctx: RunContext, prompts: list[dict], client: dict[str, Any]) -> None:
    journal = _journal(ctx)
    jobs = []
    for p in prompts:
        if prompt_key(p) in journal["refusal_check"]:
            continue
        for c in candidates(journal, prompt_key(p)):
            user = REFUSAL_QUESTION.format(question=p["messages"][-1]["content"], answer=c["text"])
            jobs.append((p, c["key"], [{"role": "user", "content": user}]))
    _ask_per_answer(ctx, "refusal_check", cfg.refusal_judge, jobs, client,
                    lambda text: text.strip().upper().startswith("YES"))


def _grade_candidates(cfg: CollectConfig, ctx: RunContext, prompts: list[dict], client: dict[str, Any]) -> None:
    """FastChat's single-answer grading (1-10) of every candidate by the judge."""
    from fabrika.evaluate import judge as J

    journal = _journal(ctx)
    single = J.load_prompts("fastchat")["single-v1"]
    jobs = []
    for p in prompts:
        cands = candidates(journal, prompt_key(p))
        if prompt_key(p) in journal["grades"] or len(cands) < 2:
            continue
        for c in cands:
            user = single["prompt_template"].format(question=p["messages"][-1]["content"], answer=c["text"])
            jobs.append((p, c["key"], [{"role": "system", "content": single["system_prompt"]},
                                             {"role": "user", "content": user}]))
    _ask_per_answer(ctx, "grades", cfg.preference.judge, jobs, client, J.parse_rating)


def _preference_row(cfg: CollectConfig, p: dict, journal: dict, t: Counter) -> dict | None:
    cands = candidates(journal, prompt_key(p))
    if cfg.preference.judge:
        score = {v["key"]: v for v in journal["grades"].get(prompt_key(p), {}).get("verdicts", []) if v["value"] != -1}
        ranked = sorted((c for c in cands if c["key"] in score), key=lambda c: -score[c["key"]]["value"])
        if len(ranked) < 2 or score[ranked[0]["key"]]["value"] == score[ranked[-1]["key"]]["value"]:
            t["dropped:no_preference"] += 1
            return None
        best, worst = ranked[0], ranked[-1]
        scores = [score[best["key"]]["value"], score[worst["key"]]["value"]]
        reasons = [score[best["key"]]["judgment"], score[worst["key"]]["judgment"]]
    else:  # self-play: the teacher's answer is preferred to the student's
        best = next((c for c in cands if c["origin"] == "answer"), None)
        worst = next((c for c in cands if c["origin"] == "student"), None)
        if best is None or worst is None or F.normalized(best["text"]) == F.normalized(worst["text"]):
            t["dropped:no_preference"] += 1
            return None
        scores, reasons = [None, None], ["teacher's answer", "student's answer"]
    return {"prompt": p["messages"], "chosen": [{"role": "assistant", "content": best["text"]}],
            "rejected": [{"role": "assistant", "content": worst["text"]}], "chosen_score": scores[0],
            "rejected_score": scores[1], "reasons": reasons, "chosen_model": best["model"],
            "rejected_model": worst["model"], "language": p["language"] or "?", "id": p["id"], "source": cfg.source,
            "teacher": cfg.teacher}


def _dataset_rows(cfg: CollectConfig, journal: dict, prompts: list[dict]
                  ) -> tuple[list[dict], dict[str, Counter], dict]:
    """The rows the journal gives for these prompts, the counts per language (sampled, answered, kept,
    dropped by each filter, tokens, cost), and the first three answers each filter dropped per language
    (for the dataset card)."""
    table: dict[str, Counter] = defaultdict(Counter)
    examples: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    rows = []
    seen_answers: set[str] = set()

    def dropped(lang: str, reason: str, p: dict, text: str) -> None:
        table[lang][f"dropped:{reason}"] += 1
        if len(examples[lang][reason]) < 3:
            examples[lang][reason].append({"id": p["id"], "prompt": p["messages"][-1]["content"], "answer": text})

    for p in prompts:
        lang = p["language"] or "?"
        t = table[lang]
        t["sampled"] += 1
        a = journal["answer"].get(prompt_key(p))
        if a is None:
            t["unanswered"] += 1
            continue
        t["answered"] += 1
        for kind in ("answer", "student"):
            for c in journal[kind].get(prompt_key(p), {}).get("answers", []):
                t["tokens"] += c["prompt_tokens"] + c["completion_tokens"]
                t["cost_usd"] += c["cost"]
                if c["drop"]:
                    dropped(lang, c["drop"], p, c["text"])
        if cfg.preference:
            row = _preference_row(cfg, p, journal, t)
            if row:
                rows.append(row)
                t["kept"] += 1
            continue
        flagged = {v["key"] for v in journal["refusal_check"].get(prompt_key(p), {}).get("verdicts", []) if v["value"]}
        for c in candidates(journal, prompt_key(p)):
            reason = "refusal_llm" if c["key"] in flagged else None
            if reason is None and "duplicate" in cfg.filters:
                key = F.normalized(c["text"])
                reason = "duplicate" if key in seen_answers else None
                seen_answers.add(key)
            if reason:
                dropped(lang, reason, p, c["text"])
                continue
            t["kept"] += 1
            rows.append({"messages": p["messages"] + [{"role": "assistant", "content": c["text"]}], "language": lang,
                         "source": cfg.source, "id": p["id"], "teacher": a["teacher"],
                         "finish_reason": c["finish_reason"], "prompt_tokens": c["prompt_tokens"],
                         "completion_tokens": c["completion_tokens"]})
    return rows, table, examples


def _write_dataset(cfg: CollectConfig, ctx: RunContext, prompts: list[dict], stats: dict[str, Any]) -> Artifact:
    import datasets

    out = ctx.stage_dir
    rows, table, examples = _dataset_rows(cfg, _journal(ctx), prompts)
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
    atomic_write_text(out / "README.md", _card(cfg, summary, len(rows), stats, examples))
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


def _card_configs() -> list[str]:
    """The card's `configs:` front matter, naming the data file, so `datasets.load_dataset(FOLDER)` (and the
    Hub viewer) reads the rows from data.parquet and never tries the journal, the manifest, the ShareGPT
    copy or the Arrow copy beside it (one folder's configs share one file format, hence Parquet alone)."""
    return ["configs:", "- config_name: default", "  data_files:", "  - split: train", "    path: data.parquet"]


def _card(cfg: CollectConfig, summary: dict[str, dict], rows: int, stats: dict[str, Any], examples: dict) -> str:
    """The dataset card: what was asked and kept per language, and what each filter threw away, with
    three examples per language and filter so a user can judge the filters on their own data."""
    lines = ["---", "license: other", "tags: [fabrika, distillation]", *_card_configs(), "---", "",
             f"# Distilled dataset from {cfg.source}", "",
             f"Answers by `{cfg.teacher}` (temperature {cfg.temperature}, max {cfg.max_tokens} tokens), "
             f"filters: {', '.join(cfg.filters)}. {rows} rows. Made with fabrika.", "",
             "| language | quota | sampled | answered | kept | dropped | tokens | cost $ |",
             "|---|---|---|---|---|---|---|---|"]
    for lang, c in summary.items():
        dropped = ", ".join(f"{k.split(':')[1]} {v}" for k, v in c.items() if k.startswith("dropped:")) or "0"
        lines.append(f"| {lang} | {(cfg.quota or {}).get(lang, '—')} | {c.get('sampled', 0)} | "
                     f"{c.get('answered', 0)} | {c.get('kept', 0)} | {dropped} | {c.get('tokens', 0)} | "
                     f"{c.get('cost_usd', 0):.4f} |")
    lines += ["", "Sampling: " + ", ".join(f"{k} {v}" for k, v in stats.items() if k != "stop"), "",
              f"Quotas count kept rows; drawing stopped: {stats['stop']}."]
    if any(examples.values()):
        lines += ["", "## What the filters dropped", "",
                  "The first three answers each filter dropped, per language (shortened)."]
    for lang in sorted(examples):
        for reason, shown in sorted(examples[lang].items()):
            lines += ["", f"### {lang}: {reason} ({summary[lang].get(f'dropped:{reason}', 0)} dropped)", ""]
            lines += [f"- `{e['id']}` prompt: {_excerpt(e['prompt'], 120)} → answer: {_excerpt(e['answer'], 240)}"
                      for e in shown]
    return "\n".join(lines) + "\n"


def _excerpt(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return "«" + (flat if len(flat) <= limit else flat[:limit - 1] + "…") + "»"


def estimate(cfg: CollectConfig, ctx: RunContext) -> dict[str, Any]:
    n = sum(cfg.quota.values()) if cfg.quota else None
    model = api_model(ctx.resolve_model(cfg.teacher))
    k = cfg.preference.k if cfg.preference else cfg.n
    out: dict[str, Any] = {"api_calls": first_draw(cfg) if n else "all rows", "_rows": n or 0}
    if n:  # ~200 prompt tokens, ~600 answer tokens per call on chat data like Tagengo
        worst = max_requests(cfg)  # every answer dropped until max_requests is spent

        def per_call(mode: Literal["online", "batch"]) -> float:
            return api_cost(model, 200, 600 * k, prices=cfg.client.prices, mode=mode).usd

        out["est_cost_usd"] = round(first_draw(cfg) * per_call(cfg.client.mode), 2)
        if cfg.client.mode == "batch":  # what the same requests would cost online
            out["est_cost_online_usd"] = round(first_draw(cfg) * per_call("online"), 2)
        out["api_calls_max"] = worst
        out["est_cost_max_usd"] = round(worst * per_call(cfg.client.mode), 2)
    return out
