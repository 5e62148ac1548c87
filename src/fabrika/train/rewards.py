"""Rule-based rewards for the `rl` stage, each a small function of (prompt, completion, row).

Rewards are named and weighted in the stage's config (`rewards: {language: {weight: 0.5}, ...}`); the
name is also the key under which TRL logs the component (`rewards/<name>/mean`), so every reward is
visible on its own in metrics.jsonl and the report, not only in the weighted sum. The LLM judge,
which needs a client, a cache and a journal, is in `train/judge_reward.py`.

A reward returns a float, or None when it cannot score a completion (TRL then leaves it out of the
group's statistics instead of treating it as a zero).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from fabrika.config import Config
from fabrika.data import filters as F
from fabrika.errors import FabrikaError


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern, re.S)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None
    return pattern


Regex = Annotated[str, AfterValidator(_check_regex)]  # a pattern checked when the config loads


class RewardParams(Config):
    weight: float = Field(1.0, description="Weight of this reward in the sum the policy maximises.")

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("the weight must be a finite number")
        return v

    def columns(self) -> list[str]:
        """Data columns this reward reads from each row."""
        return []


class LanguageReward(RewardParams):
    """1 when the answer is in the prompt's language (lingua), else 0: the failure a model trained on
    mostly English data shows by answering a Russian question in English."""

    min_chars: int = Field(1, ge=0, description="Answers shorter than this score 0 (too short to be in any language).")


class LengthReward(RewardParams):
    """0 inside [min_chars, max_chars], a penalty proportional to the distance outside."""

    min_chars: int = Field(0, ge=0, description="Answers shorter than this are penalised.")
    max_chars: int | None = Field(None, ge=1, description="Answers longer than this are penalised.")

    @model_validator(mode="after")
    def _bounds(self) -> "LengthReward":
        if self.max_chars is None and self.min_chars == 0:
            raise ValueError("set max_chars and/or min_chars")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError("max_chars is below min_chars")
        return self


class FormatReward(RewardParams):
    """The share of the template checks an answer passes."""

    pattern: Regex | None = Field(None, description="A regular expression the whole answer must match.")
    ends_with: str | None = Field(None, description="Text the answer must end with (trailing spaces ignored).")
    stopped: bool = Field(False, description="The answer must end by itself (end-of-turn), not be cut at "
                          "max_completion_length.")

    @model_validator(mode="after")
    def _some_check(self) -> "FormatReward":
        if self.pattern is None and self.ends_with is None and not self.stopped:
            raise ValueError("set at least one check: pattern, ends_with or stopped")
        return self


class VerifiableReward(RewardParams):
    """1 when the answer is verifiably right, else 0."""

    mode: Literal["exact", "numeric", "regex", "json"] = Field(
        "numeric", description="exact: the final answer equals the reference; numeric: the final number equals it "
        "(maths); regex: the answer matches `pattern` (or the row's reference as a pattern); json: the answer is JSON "
        "(valid against `schema` when given).")
    reference: str | None = Field("answer", description="Column with each row's reference answer.")
    pattern: Regex | None = Field(None, description="regex mode: the pattern (default: the reference column's value).")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="json mode: a JSON Schema the answer "
                                           "must satisfy.")
    tolerance: float = Field(1e-6, ge=0, description="numeric mode: relative tolerance.")

    @model_validator(mode="after")
    def _needs(self) -> "VerifiableReward":
        if self.mode in ("exact", "numeric") and not self.reference:
            raise ValueError(f"mode {self.mode} compares with a reference answer: set `reference` to its column")
        if self.mode == "regex" and not (self.pattern or self.reference):
            raise ValueError("mode regex needs `pattern` or a `reference` column holding patterns")
        if self.schema_ is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(self.schema_).check_schema(self.schema_)
            except jsonschema.SchemaError as e:
                raise ValueError(f"the schema is not a valid JSON Schema: {e.message}") from None
        return self

    def columns(self) -> list[str]:
        return [self.reference] if self.reference and (self.mode != "regex" or not self.pattern) else []


# --- scoring ----------------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def final_answer(text: str) -> str:
    """What a maths answer commits to: the last \\boxed{...}, else the last non-empty line."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parse_number(text: str) -> float | None:
    """The last number in `text` (thousands separators allowed: 1,234.5)."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _normal(text: str) -> str:
    return " ".join(text.strip().rstrip(".").casefold().split())


def verifiable_score(cfg: VerifiableReward, completion: str, row: dict[str, Any]) -> float:
    ref = row.get(cfg.reference) if cfg.reference else None
    if cfg.mode == "exact":
        return float(_normal(final_answer(completion)) == _normal(str(ref)))
    if cfg.mode == "numeric":
        want, got = parse_number(str(ref)), parse_number(final_answer(completion))
        if want is None or got is None:
            return 0.0
        return float(abs(got - want) <= cfg.tolerance * max(1.0, abs(want)))
    if cfg.mode == "regex":
        try:
            return float(re.search(cfg.pattern or str(ref), completion, re.S) is not None)
        except re.error:
            return 0.0
    return float(_json_ok(completion, cfg.schema_))


_FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def _json_ok(completion: str, schema: dict[str, Any] | None) -> bool:
    fenced = _FENCED.search(completion)
    try:
        value = json.loads(fenced.group(1) if fenced else completion)
    except ValueError:
        return False
    if schema is None:
        return True
    import jsonschema

    return jsonschema.validators.validator_for(schema)(schema).is_valid(value)


def length_score(cfg: LengthReward, completion: str) -> float:
    n = len(completion)
    if cfg.max_chars is not None and n > cfg.max_chars:
        return -(n - cfg.max_chars) / cfg.max_chars
    if n < cfg.min_chars:
        return -(cfg.min_chars - n) / cfg.min_chars
    return 0.0


def format_score(cfg: FormatReward, completion: str, stopped: bool) -> float:
    checks = []
    if cfg.pattern is not None:
        checks.append(re.fullmatch(cfg.pattern, completion.strip(), re.S) is not None)
    if cfg.ends_with is not None:
        checks.append(completion.rstrip().endswith(cfg.ends_with))
    if cfg.stopped:
        checks.append(stopped)
    return sum(checks) / len(checks)


def language_score(cfg: LanguageReward, completion: str, expected: str | None, codes: tuple[str, ...]) -> float | None:
    """None when the prompt's language is unknown: there is nothing to compare with."""
    if expected is None:
        return None
    if len(completion.strip()) < max(cfg.min_chars, 1):
        return 0.0
    return float(F.detect(completion, codes) == expected)


def check_columns(name: str, cfg: RewardParams, columns: list[str], source: str) -> None:
    missing = [c for c in cfg.columns() if c not in columns]
    if missing:
        raise FabrikaError(f"rl.rewards.{name}.reference: the prompts in {source} have no column "
                           f"{', '.join(map(repr, missing))} (columns: {', '.join(columns)}); name the column that "
                           "holds each row's reference answer")


# --- as TRL reward functions --------------------------------------------------------------------

def text_of(messages: Any) -> str:
    """The text of a completion or of a prompt's last turn (TRL passes conversational data as messages)."""
    return messages[-1]["content"] if isinstance(messages, list) else str(messages)


def trl_function(name: str, score: Callable[[str, str, dict[str, Any], bool], "float | None"],
                 eos_ids: set[int]) -> Callable[..., list]:
    """A TRL reward function (batched, named `name` in TRL's logs) from a per-completion `score(prompt,
    completion, row, stopped)`; `row` holds the dataset's columns for that completion."""

    def reward(prompts, completions, completion_ids=None, **kwargs) -> list:
        columns = {k: v for k, v in kwargs.items() if isinstance(v, list) and len(v) == len(prompts)}
        out = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            stopped = bool(completion_ids and completion_ids[i] and completion_ids[i][-1] in eos_ids)
            out.append(score(text_of(p), text_of(c), {k: v[i] for k, v in columns.items()}, stopped))
        return out

    reward.__name__ = name
    return reward


def rule_scorer(name: str, cfg: RewardParams, codes: tuple[str, ...]):
    """The per-completion scorer of a rule-based reward."""
    if isinstance(cfg, LanguageReward):
        return lambda p, c, row, stopped: language_score(cfg, c, row.get("language"), codes)
    if isinstance(cfg, LengthReward):
        return lambda p, c, row, stopped: length_score(cfg, c)
    if isinstance(cfg, FormatReward):
        return lambda p, c, row, stopped: format_score(cfg, c, stopped)
    if isinstance(cfg, VerifiableReward):
        return lambda p, c, row, stopped: verifiable_score(cfg, c, row)
    raise FabrikaError(f"rl.rewards.{name}: not a rule-based reward")
