"""MT-Bench in any language: answers from any generator, grades from any OpenAI-compatible judge,
in FastChat's file formats so that files and scores move freely between FastChat and fabrika.

Answers: both turns, the second conditioned on the model's own first answer, FastChat's temperature
per category, batched, appended to `<bench>/model_answer/<model_id>.jsonl` as they are produced.
Judgments: FastChat's prompts (byte for byte), temperature 0, appended to
`<bench>/model_judgment/<judge>_single.jsonl`; calls go through fabrika's client, so they are
cached and retried, and a killed run picks up what is missing; with `client: {mode: batch}` they go
through OpenAI's Batch API at half the price (infer/batch.py).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal

from fabrika.artifacts import append_jsonl, read_jsonl
from fabrika.errors import FabrikaError
from fabrika.evaluate import judge as J
from fabrika.infer import batch
from fabrika.infer.backends import OpenAIGenerator
from fabrika.infer.client import RequestFailed
from fabrika.infer.costs import api_cost
from fabrika.infer.generation import ContextTooLong, GenerationParams, Generator

BENCHES = {"mt_bench": "en", "ru_mt_bench": "ru", "ru_mt_bench_50": "ru", "zh_mt_bench": "zh"}


def load_questions(bench: str) -> tuple[list[dict], dict[int, dict], str]:
    """Questions, reference answers by id, and the language, for a packaged bench or a question file."""
    if bench in BENCHES:
        base = resources.files("fabrika.evaluate").joinpath("data", bench)
        qfile, lang = base.joinpath("question.jsonl"), BENCHES[bench]
        rfile = base.joinpath("reference_answer", "gpt-4.jsonl")
    else:
        qfile = Path(bench)
        if not qfile.is_file():
            raise FabrikaError(f"mtbench.bench: {bench!r} is neither a packaged bench ({', '.join(BENCHES)}) "
                               "nor a question file")
        rfile, lang = qfile.parent / "reference_answer" / "gpt-4.jsonl", "?"
    questions = []
    for n, line in enumerate(qfile.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise FabrikaError(f"{qfile}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
            turns = q.get("turns") if isinstance(q, dict) else None
            if (not isinstance(q, dict) or "question_id" not in q or not isinstance(turns, list) or not turns
                    or not all(isinstance(t, str) for t in turns)):
                raise FabrikaError(f"{qfile}:{n}: expected FastChat's question format (question_id, category, "
                                   "turns: a list of strings)")
            questions.append(q)
    if not questions:
        raise FabrikaError(f"mtbench.bench: {qfile} holds no questions")
    refs: dict[int, dict] = {}
    if rfile.is_file():
        for line in rfile.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                refs[r["question_id"]] = r
    for q in questions:  # ruMT-Bench keeps references inside the question file
        if q["question_id"] not in refs and q.get("reference"):
            refs[q["question_id"]] = {"choices": [{"turns": q["reference"]}]}
    return questions, refs, lang


CONTEXT_ERROR = re.compile(r"context", re.I)  # how OpenAI, vLLM, llama.cpp and fabrika serve word it


def _fits(gen: Generator, conv: list[dict], params: GenerationParams) -> str | None:
    """None, or why this prompt plus the answer length cannot fit the model's context, as the local
    backends (hf:, gguf:) measure it before generating."""
    check = getattr(gen, "check_length", None)
    try:
        if check is not None:
            check(conv, params)
    except ContextTooLong as e:
        return str(e)
    return None


def _answers(gen: Generator, convs: list[list[dict]], params: GenerationParams) -> list[str | RequestFailed]:
    """One answer per conversation. An endpoint (openai:) refusing a prompt as too long for its context
    gives that refusal in its place, and every other conversation its answer, each asked once; any
    other failure stops the bench as before."""
    if not isinstance(gen, OpenAIGenerator):
        return [c[0].text.strip() for c in gen.generate(convs, params)]
    from fabrika.infer.client import run_requests

    out: list[str | RequestFailed] = []
    for r in run_requests(gen.config, gen.model, convs, params, quiet=True, on_result=lambda i, r: None):
        if isinstance(r, Exception):
            if not (isinstance(r, RequestFailed) and CONTEXT_ERROR.search(str(r))):
                raise r
            out.append(r)
        else:
            out.append(r[0].text.strip())
    return out


def generate_answers(gen: Generator, questions: list[dict], path: Path, model_id: str, max_new_tokens: int = 1024,
                     batch: int = 16, progress: Callable[[int], None] | None = None,
                     say: Callable[[str], None] = print) -> list[dict]:
    """Answer every question not yet in `path` (FastChat's model_answer format), appending per batch.
    A turn whose prompt does not fit the model's context is named through `say` and left unanswered
    (a first turn: the whole question; a second turn: the answer keeps turn 1), never the whole bench."""
    done = {a["question_id"] for a in read_jsonl(path)}

    def skip(q: dict, turn: int, why: object) -> None:
        say(f"question {q['question_id']}{' turn 2' if turn == 2 else ''} skipped: {why}; lower "
            "mtbench.max_new_tokens or use a model with a longer context")

    longest = GenerationParams(max_new_tokens=max_new_tokens)
    todo = []
    for q in questions:
        if q["question_id"] in done:
            continue
        why = _fits(gen, [{"role": "user", "content": q["turns"][0]}], longest)
        if why:
            skip(q, 1, why)
            if progress:
                progress(1)
            continue
        todo.append(q)
    path.parent.mkdir(parents=True, exist_ok=True)
    by_temp: dict[float, list[dict]] = {}
    for q in todo:
        by_temp.setdefault(J.TEMPERATURE.get(q.get("category", ""), 0.7), []).append(q)
    for temp, group in by_temp.items():
        params = GenerationParams(temperature=temp, max_new_tokens=max_new_tokens, seed=0)
        for start in range(0, len(group), batch):
            chunk, answered = group[start:start + batch], []
            firsts = _answers(gen, [[{"role": "user", "content": q["turns"][0]}] for q in chunk], params)
            for q, a in zip(chunk, firsts):
                if isinstance(a, RequestFailed):
                    skip(q, 1, a)
                else:
                    answered.append((q, [a]))
            follow = []
            for q, turns in answered:
                if len(q["turns"]) < 2:
                    continue
                conv = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": turns[0]},
                        {"role": "user", "content": q["turns"][1]}]
                why = _fits(gen, conv, params)
                if why:
                    skip(q, 2, why)
                else:
                    follow.append((turns, q, conv))
            seconds = _answers(gen, [conv for _, _, conv in follow], params) if follow else []
            for (turns, q, _), a in zip(follow, seconds):
                if isinstance(a, RequestFailed):
                    skip(q, 2, a)
                else:
                    turns.append(a)
            if answered:
                append_jsonl(path, [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22],
                                     "model_id": model_id, "choices": [{"index": 0, "turns": t}],
                                     "tstamp": time.time()} for q, t in answered])
            if progress:
                progress(len(chunk))
    return load_answers(path)


def load_answers(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise FabrikaError(f"answers: {path} not found")
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            a = json.loads(line)
            a["choices"][0]["turns"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise FabrikaError(f"{path}:{n}: not a FastChat model answer (question_id, model_id, choices[0].turns)") from None
        rows.append(a)
    return rows


def judge_matches(questions: list[dict], answers: list[dict], refs: dict[int, dict], judge_model: str,
                  prompts: dict[str, dict], done: set[tuple[int, int]]) -> list[dict]:
    """Every (question, turn) still to grade, with the exact messages FastChat would send."""
    judges = J.single_judges(judge_model, prompts)
    by_q = {q["question_id"]: q for q in questions}
    matches = []
    for a in answers:
        q = by_q.get(a["question_id"])
        if q is None:
            continue
        for turn in (1, 2):
            if turn > len(q["turns"]) or turn > len(a["choices"][0]["turns"]) or (a["question_id"], turn) in done:
                continue
            j = J.pick(judges, q.get("category", ""), turn)
            ref = refs.get(q["question_id"]) if j.ref_based else None
            if j.ref_based and ref is None:
                j = J.pick(judges, "", turn)  # no reference available: grade like FastChat's general questions
            matches.append({"question": q, "answer": a, "judge": j, "turn": turn,
                            "messages": J.single_prompt(j, q, a, ref)})
    return matches


def batch_state(judgments: Path) -> Path:
    """Where judging in batch mode logs its batches: the bench's folder, beside (not in) model_judgment/,
    whose *.jsonl files are FastChat's judgment files."""
    return judgments.parent.parent / batch.STATE


def run_judging(matches: list[dict], judge_ref: str, out: Path, model_id: str, client_options: dict[str, Any],
                retries: int = 1, quiet: bool = True, max_tokens: int = 2048) -> None:
    """Grade `matches`, appending FastChat judgment rows to `out` as each grade arrives. A judgment
    without a rating is asked again (another seed) up to `retries` times, then kept with FastChat's
    score -1: the judge did answer. A request that failed (judge down, retries spent) is never
    written as a grade, so the same command asks for it again; it fails the call instead."""
    if not matches:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    pending = matches
    failed: list[str] = []
    for attempt in range(retries + 1):
        params = GenerationParams(temperature=0.0, max_new_tokens=max_tokens, seed=attempt or None)
        unrated: list[dict] = []

        def keep(i: int, result) -> None:
            m = pending[i]
            if isinstance(result, Exception):
                failed.append(f"question {m['question']['question_id']} turn {m['turn']}: {result}")
                return
            text = result[0].text
            score = J.parse_rating(text)
            if score == -1 and attempt < retries:
                unrated.append(m)
                return
            append_jsonl(out, [{"question_id": m["question"]["question_id"], "model": model_id,
                                "judge": m["judge"].label, "user_prompt": m["messages"][1]["content"],
                                "judgment": text, "score": score, "turn": m["turn"], "tstamp": time.time()}])

        labels = [f"{m['question']['question_id']}:{m['turn']}:{model_id}" for m in pending]
        batch.ask(judge_ref, [m["messages"] for m in pending], params, client_options, quiet, keep,
                  state=batch_state(out), labels=labels)
        pending = unrated
        if not pending:
            break
    if failed:
        raise FabrikaError(f"judging: {len(failed)} of {len(matches)} requests to {judge_ref} failed (first: "
                           f"{failed[0]}); the grades received are in {out}; run the same command again to ask "
                           "only for the rest")


def pair_matches(questions: list[dict], answers_1: list[dict], answers_2: list[dict], refs: dict[int, dict],
                 judge_model: str, prompts: dict[str, dict], done: set[tuple[int, int]]) -> list[dict]:
    """Every (question, turn) both models answered and not yet compared, with the two prompts FastChat
    sends: model 1 as assistant A (game 1), then as assistant B (game 2)."""
    judges = J.pair_judges(judge_model, prompts)
    second = {a["question_id"]: a for a in answers_2}
    by_q = {q["question_id"]: q for q in questions}
    matches = []
    for a1 in answers_1:
        q, a2 = by_q.get(a1["question_id"]), second.get(a1["question_id"])
        if q is None or a2 is None:
            continue
        for turn in (1, 2):
            n = min(len(q["turns"]), len(a1["choices"][0]["turns"]), len(a2["choices"][0]["turns"]))
            if turn > n or (q["question_id"], turn) in done:
                continue
            j = J.pick(judges, q.get("category", ""), turn)
            ref = refs.get(q["question_id"]) if j.ref_based else None
            if j.ref_based and ref is None:
                j = J.pick(judges, "", turn)
            matches.append({"question": q, "judge": j, "turn": turn, "model_1": a1["model_id"],
                            "model_2": a2["model_id"], "games": [J.pair_prompt(j, q, a1, a2, ref),
                                                                 J.pair_prompt(j, q, a2, a1, ref)]})
    return matches


def run_pair_judging(matches: list[dict], judge_ref: str, out: Path, client_options: dict[str, Any],
                     quiet: bool = True, max_tokens: int = 2048) -> None:
    """Judge both games of every match; a FastChat pairwise row is appended once both verdicts are in."""
    if not matches:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    verdicts: dict[int, dict[int, str]] = {}
    failed: list[str] = []

    def keep(i: int, result) -> None:
        k, game = divmod(i, 2)
        if isinstance(result, Exception):  # not journaled: a rerun judges this match again
            failed.append(f"question {matches[k]['question']['question_id']}: {result}")
            return
        verdicts.setdefault(k, {})[game] = result[0].text
        if len(verdicts[k]) < 2:
            return
        m, (g1, g2) = matches[k], (verdicts[k][0], verdicts[k][1])
        w1 = {"A": "model_1", "B": "model_2"}.get(J.parse_winner(g1), J.parse_winner(g1))
        w2 = {"A": "model_2", "B": "model_1"}.get(J.parse_winner(g2), J.parse_winner(g2))
        append_jsonl(out, [{"question_id": m["question"]["question_id"], "model_1": m["model_1"], "model_2": m["model_2"],
                            "g1_winner": w1, "g2_winner": w2, "judge": m["judge"].label,
                            "g1_user_prompt": m["games"][0][1]["content"], "g1_judgment": g1,
                            "g2_user_prompt": m["games"][1][1]["content"], "g2_judgment": g2, "turn": m["turn"],
                            "tstamp": time.time()}])

    params = GenerationParams(temperature=0.0, max_new_tokens=max_tokens)
    labels = [f"{m['question']['question_id']}:{m['turn']}:{m['model_1']}:{m['model_2']}:g{g}"
              for m in matches for g in (1, 2)]
    batch.ask(judge_ref, [game for m in matches for game in m["games"]], params, client_options, quiet, keep,
              state=batch_state(out), labels=labels)
    if failed:
        raise FabrikaError(f"pairwise judging: {len(failed)} requests failed (first: {failed[0]}); the finished "
                           f"comparisons are in {out}; run the same command again for the rest")


def estimate_judging(conversations: list[list[dict]], judge_model: str | None,
                     prices: dict[str, tuple[float, float]] | None = None,
                     mode: Literal["online", "batch"] = "online") -> dict[str, Any]:
    """Judge calls and their cost (`judge_model` None: a local judge), at the Batch API's price in batch mode."""
    chars = sum(len(m["content"]) for conv in conversations for m in conv)
    prompt_tokens, answer_tokens = chars / 4, 300 * len(conversations)  # ~4 chars/token, ~300-token judgments
    cost = api_cost(judge_model, prompt_tokens, answer_tokens, prices=prices, mode=mode)  # all calls together
    return {"judge_calls": len(conversations), "est_cost_usd": round(cost.usd, 2)}
