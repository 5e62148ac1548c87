"""The bottom line of `fabrika run --dry-run`: what the whole pipeline costs in wall time, GPU hours and
API money, and the warnings a plan deserves before it is paid for.

Each stage's `estimate` answers for itself; this adds them up under stated assumptions, because a total
without its assumptions reads as a promise. Training time comes from FLOPs at a typical utilisation
(models.plan.gpu_hours); an API stage takes its requests at REQUEST_S seconds each, `concurrency` at a
time, since a provider's answer speed is what bounds it; answers a local model generates (MT-Bench)
take GPU time at LOCAL_TOKENS_S, and export the time its estimate gives (measured conversion and
quantization speeds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fabrika.artifacts import read_manifest

REQUEST_S = 10.0  # one chat answer of ~600 tokens at ~60 tokens/s, as large API models answer
LOCAL_TOKENS_S = 500.0  # batched answers of a 7-8B model on one GPU with transformers (vLLM: several times more)
REPEAT_WARNING = 4.0  # more epochs over a pretraining corpus than this, and the loss stops meaning much


def gpus() -> int:
    """The world size estimates assume: the launcher's WORLD_SIZE (or `--gpus`, which sets it)."""
    from fabrika.ranks import world_size

    return world_size()


def _concurrency(cfg: Any) -> int:
    for client in (getattr(cfg, "client", None), getattr(getattr(cfg, "mtbench", None), "client", None)):
        if client is not None:
            return client.concurrency
    return 1


def _api_hours(requests: Any, cfg: Any) -> float:
    return requests * REQUEST_S / _concurrency(cfg) / 3600 if isinstance(requests, int) else 0.0


def repeated_corpus(estimates: dict[str, dict[str, Any]], data_stage: str, data_dir: Path | None,
                    train_tokens: int) -> str | None:
    """A warning when pretraining would go over its prepared corpus many times: the tokens asked for
    against the tokens the prepare stage is estimated to make, or made when it has finished."""
    corpus = estimates.get(data_stage, {}).get("est_tokens")
    if not corpus and data_dir is not None:
        corpus = ((read_manifest(data_dir) or {}).get("metrics") or {}).get("train_tokens")
    if not corpus or train_tokens <= REPEAT_WARNING * corpus:
        return None
    return (f"pretraining on {train_tokens:,} tokens repeats the ~{corpus:,}-token corpus of {data_stage!r} "
            f"~{train_tokens / corpus:.0f} times: more text, or fewer steps")


def totals(stages: list[Any], estimates: dict[str, dict[str, Any]]) -> str:
    """One line: wall time, GPU hours and API cost of the stages that would run."""
    world = gpus()
    gpu_h = wall_h = usd = usd_max = 0.0
    for stage in stages:
        est = estimates.get(stage.name)
        if est is None:
            continue
        if "h100_hours" in est:  # GPU-hours of all the GPUs together
            gpu_h += est["h100_hours"]
            wall_h += est["h100_hours"] / world
        wall_h += sum(_api_hours(est.get(k), stage.cfg) for k in ("api_calls", "judge_calls", "answer_calls"))
        if "answer_tokens_max" in est:  # at most: answers usually end before max_new_tokens
            hours = est["answer_tokens_max"] / LOCAL_TOKENS_S / 3600
            gpu_h += hours
            wall_h += hours
        wall_h += est.get("est_minutes", 0) / 60
        cost = est.get("est_cost_usd", 0) + est.get("est_judge_usd", 0)
        usd += cost
        usd_max += est.get("est_cost_max_usd", est.get("est_cost_usd", 0)) + est.get("est_judge_usd", 0)
    money = f"${usd:,.2f}" + (f" (up to ${usd_max:,.2f} if many answers are dropped)" if usd_max > usd else "")
    wall = f"{wall_h:.1f} h" if wall_h >= 1 else f"{wall_h * 60:.0f} min"
    return (f"total: ~{wall} wall, {gpu_h:.1f} H100 GPU-hours on {world} GPU(s), {money} API; "
            f"training at 40% MFU, API requests at {REQUEST_S:.0f} s each, `concurrency` at a time, local "
            f"answers at {LOCAL_TOKENS_S:.0f} tokens/s")
