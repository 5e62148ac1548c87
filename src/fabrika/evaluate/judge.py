"""MT-Bench judging exactly as FastChat's llm_judge does it: the same prompt templates, the same
choice of template per category and turn, the same `[[rating]]` / `[[A]]` parsing.

The prompt a judge receives must be byte-for-byte what FastChat would send for the same question,
answer and reference, or scores stop being comparable with published ones. So the templates are
FastChat's own files (shipped in `data/`) filled with `str.format`, as FastChat fills them.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fabrika.errors import FabrikaError

NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
# FastChat's per-category sampling temperatures for answer generation.
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
PROMPT_SETS = {"fastchat": "judge_prompts.jsonl", "multilingual": "judge_prompts_multilingual.jsonl"}


def data_file(*parts: str):
    return resources.files("fabrika.evaluate").joinpath("data", *parts)


def load_prompts(kind: str = "fastchat") -> dict[str, dict[str, Any]]:
    if kind not in PROMPT_SETS:
        raise FabrikaError(f"unknown judge prompt set {kind!r}; known: {', '.join(PROMPT_SETS)}")
    lines = data_file(PROMPT_SETS[kind]).read_text(encoding="utf-8").splitlines()
    return {p["name"]: p for p in map(json.loads, filter(None, lines))}


@dataclass(frozen=True)
class Judge:
    model: str
    prompt: dict[str, Any]
    ref_based: bool = False
    multi_turn: bool = False

    @property
    def label(self) -> list[str]:
        """How FastChat names a judge in judgment files: [model, prompt name]."""
        return [self.model, self.prompt["name"]]


def single_judges(model: str, prompts: dict[str, dict]) -> dict[str, Judge]:
    return {"default": Judge(model, prompts["single-v1"]),
            "math": Judge(model, prompts["single-math-v1"], ref_based=True),
            "default-mt": Judge(model, prompts["single-v1-multi-turn"], multi_turn=True),
            "math-mt": Judge(model, prompts["single-math-v1-multi-turn"], ref_based=True, multi_turn=True)}


def pair_judges(model: str, prompts: dict[str, dict]) -> dict[str, Judge]:
    return {"default": Judge(model, prompts["pair-v2"]),
            "math": Judge(model, prompts["pair-math-v1"], ref_based=True),
            "default-mt": Judge(model, prompts["pair-v2-multi-turn"], multi_turn=True),
            "math-mt": Judge(model, prompts["pair-math-v1-multi-turn"], ref_based=True, multi_turn=True)}


def pick(judges: dict[str, Judge], category: str, turn: int) -> Judge:
    key = "math" if category in NEED_REF_CATS else "default"
    return judges[key + ("-mt" if turn == 2 else "")]


def _ref_kwargs(ref: dict | None, multi_turn: bool) -> dict[str, str]:
    if ref is None:
        return {}
    kw = {"ref_answer_1": ref["choices"][0]["turns"][0]}
    if multi_turn:
        kw["ref_answer_2"] = ref["choices"][0]["turns"][1]
    return kw


def single_prompt(judge: Judge, question: dict, answer: dict, ref: dict | None) -> list[dict[str, str]]:
    """The messages FastChat's run_judge_single sends (system prompt, then the filled template)."""
    if judge.ref_based and ref is None:
        raise FabrikaError(f"question {question['question_id']} ({question.get('category')}) needs a reference answer")
    kw = _ref_kwargs(ref if judge.ref_based else None, judge.multi_turn)
    turns, answers = question["turns"], answer["choices"][0]["turns"]
    if judge.multi_turn:
        user = judge.prompt["prompt_template"].format(question_1=turns[0], question_2=turns[1], answer_1=answers[0],
                                                      answer_2=answers[1], **kw)
    else:
        user = judge.prompt["prompt_template"].format(question=turns[0], answer=answers[0], **kw)
    return [{"role": "system", "content": judge.prompt["system_prompt"]}, {"role": "user", "content": user}]


def pair_prompt(judge: Judge, question: dict, answer_a: dict, answer_b: dict, ref: dict | None) -> list[dict[str, str]]:
    kw = _ref_kwargs(ref if judge.ref_based else None, judge.multi_turn)
    turns = question["turns"]
    a, b = answer_a["choices"][0]["turns"], answer_b["choices"][0]["turns"]
    if judge.multi_turn:
        user = judge.prompt["prompt_template"].format(question_1=turns[0], question_2=turns[1], answer_a_1=a[0],
                                                      answer_b_1=b[0], answer_a_2=a[1], answer_b_2=b[1], **kw)
    else:
        user = judge.prompt["prompt_template"].format(question=turns[0], answer_a=a[0], answer_b=b[0], **kw)
    return [{"role": "system", "content": judge.prompt["system_prompt"]}, {"role": "user", "content": user}]


def parse_rating(judgment: str) -> float:
    """FastChat's parsing: `[[x]]`, else `[x]`, else -1. A rating off the 1-10 scale (a weak judge
    writes `[[99999999999]]`) counts as no rating: averaged, it would swamp every real score."""
    m = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if not m:
        return -1
    try:
        score = ast.literal_eval(m.groups()[0])
    except (ValueError, SyntaxError):
        return -1
    return score if isinstance(score, (int, float)) and 0 <= score <= 10 else -1


def parse_winner(judgment: str) -> str:
    if "[[A]]" in judgment:
        return "A"
    if "[[B]]" in judgment:
        return "B"
    if "[[C]]" in judgment:
        return "tie"
    return "error"


def combine_pair(g1: str, g2: str) -> str:
    """Both orders judged: model_1 wins only if it wins both (as A, then as B); disagreement is a tie."""
    m1 = {"A": "model_1", "B": "model_2"}.get(g1, g1)
    m2 = {"A": "model_2", "B": "model_1"}.get(g2, g2)
    if "error" in (m1, m2):
        return "error"
    return m1 if m1 == m2 else "tie"
