"""The `judge` reward: an LLM grades every completion 1-10 with FastChat's single-answer prompt.

The judge is any model fabrika's client talks to (an OpenAI-compatible endpoint, or a local hf:/gguf:
model served on loopback once for the whole stage). Each grading goes through the client's response
cache (sqlite, committed per response) and is appended to `judge.jsonl`, so a run killed and resumed
regrades nothing it has already paid for: only requests in flight at the kill are sent again.

A judgment without a `[[rating]]`, or a request that failed for good, is counted (logged per step as
judge/unrated and judge/failed) and scored as configured: left out of the group (`skip`) or zero. A
judge that rates none of a step's answers stops the run: training on no signal is never what was meant.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from fabrika.artifacts import Journal
from fabrika.errors import FabrikaError
from fabrika.evaluate import judge as J
from fabrika.infer.client import ClientConfig, default_cache_dir
from fabrika.train.rewards import RewardParams, text_of

JOURNAL = "judge.jsonl"


class JudgeReward(RewardParams):
    model: str = Field(description="Judge: openai:gpt-4o, openai:MODEL@URL, a named model, hf:DIR or gguf:FILE.")
    prompts: Literal["auto", "fastchat", "multilingual"] = Field(
        "auto", description="FastChat's grading prompt, or its multilingual variant that also asks whether the answer "
        "is in the question's language; auto: multilingual for prompts not in English.")
    reference: str | None = Field(None, description="Column with reference answers (FastChat's maths grading prompt).")
    on_failure: Literal["skip", "zero"] = Field(
        "skip", description="A judgment without a rating, or a failed request: leave the answer out of its group "
        "(skip) or score it 0.")
    max_tokens: int = Field(1024, ge=16, description="Longest judgment.")
    client: ClientConfig = Field(default_factory=ClientConfig, description="Client settings (concurrency, rate "
                                 "limits, retries, timeout_s, cache_dir, ...).")

    def columns(self) -> list[str]:
        return [self.reference] if self.reference else []


class Judge:
    """A TRL reward function (named `judge`) grading a batch of completions through the client."""

    __name__ = "judge"

    def __init__(self, cfg: JudgeReward, ref: str, stage_dir: Path) -> None:
        self.cfg, self.ref = cfg, ref
        self.journal_path = stage_dir / JOURNAL
        # the per-user response cache, as collect and MT-Bench use: a rerun with other settings pays nothing twice
        self.client = {"cache_dir": str(default_cache_dir()), **cfg.client.model_dump(exclude_unset=True)}
        self.local_model: str | None = None
        self.stats: Counter = Counter()
        self.stack = ExitStack()
        self.model = ""
        self.prompt_sets = {kind: J.load_prompts(kind) for kind in ("fastchat", "multilingual")}

    def __enter__(self) -> "Judge":
        from fabrika.infer.local import endpoint

        where = self.stack.enter_context(endpoint(self.ref, self.client))  # a local judge: served once for the stage
        self.model, self.client, self.local_model = where.model, where.client, where.local_model
        self.journal = self.stack.enter_context(Journal(self.journal_path))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()

    def messages(self, prompt: str, completion: str, row: dict[str, Any]) -> list[dict[str, str]]:
        kind = self.cfg.prompts
        if kind == "auto":
            kind = "fastchat" if row.get("language") in (None, "en") else "multilingual"
        ref = row.get(self.cfg.reference) if self.cfg.reference else None
        name = "single-math-v1" if ref is not None else "single-v1"
        judge = J.Judge(self.model, self.prompt_sets[kind][name], ref_based=ref is not None)
        return J.single_prompt(judge, {"question_id": "rl", "turns": [prompt]}, {"choices": [{"turns": [completion]}]},
                               {"choices": [{"turns": [str(ref)]}]} if ref is not None else None)

    def __call__(self, prompts, completions, completion_ids=None, log_metric=None, trainer_state=None,
                 **columns) -> list[float | None]:
        from fabrika.infer.generation import GenerationParams
        from fabrika.infer.client import run_requests

        columns = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == len(prompts)}
        convs = [self.messages(text_of(p), text_of(c), {k: v[i] for k, v in columns.items()})
                 for i, (p, c) in enumerate(zip(prompts, completions))]
        keys = [hashlib.sha256(json.dumps(m, ensure_ascii=False).encode()).hexdigest()[:16] for m in convs]
        unique = list(dict.fromkeys(keys))  # one request per distinct (prompt, answer) in the batch
        first = {k: convs[keys.index(k)] for k in unique}
        step = trainer_state.global_step if trainer_state is not None else None
        scores: dict[str, float | None] = {}
        counts: Counter = Counter()
        example: list[str] = []

        def keep(i: int, result) -> None:
            key = unique[i]
            if isinstance(result, Exception):
                counts["failed"] += 1
                example.append(f"request failed: {result}")
                scores[key] = None
                return
            text = result[0].text
            rating = J.parse_rating(text)
            ok = isinstance(rating, (int, float)) and 1 <= rating <= 10
            counts["cached" if result[0].cached else "requests"] += 1
            if not ok:
                counts["unrated"] += 1
                example.append(f"no [[rating]] in {text[:200]!r}")
            scores[key] = rating / 10 if ok else None
            self.journal.append({"key": key, "step": step, "rating": rating if ok else None, "judgment": text,
                                 "cached": result[0].cached})

        params = GenerationParams(temperature=0.0, max_new_tokens=self.cfg.max_tokens)
        run_requests(ClientConfig(**self.client), self.model, [first[k] for k in unique], params, quiet=True,
                     on_result=keep, local_model=self.local_model)
        self.stats.update(counts)
        self.stats["graded"] += len(unique)
        if unique and all(scores[k] is None for k in unique):
            raise FabrikaError(f"rl.rewards.judge: the judge {self.ref} rated none of the {len(unique)} answers of "
                               f"step {step} ({example[0]}); it must end its judgment with a [[rating]] from 1 to 10 "
                               "as FastChat's prompt asks: check the endpoint and model, or use a stronger judge")
        if log_metric is not None:
            for name in ("requests", "cached", "unrated", "failed"):
                log_metric(f"judge/{name}", float(counts[name]))
        zero = 0.0 if self.cfg.on_failure == "zero" else None
        return [scores[k] if scores[k] is not None else zero for k in keys]
