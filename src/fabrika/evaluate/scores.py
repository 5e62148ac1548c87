"""Scores from MT-Bench judgment files, FastChat's or fabrika's (the same format), computed as
FastChat's `show_result.py` does: judgments scored -1 are dropped, then turn 1, turn 2 and the mean
of all judgments per model; plus per category and per language, which FastChat does not show.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from fabrika.errors import FabrikaError

# Published MT-Bench scores for context (judge gpt-4-turbo unless noted), from the sets' maintainers.
REFERENCE_SCORES = {
    "mt_bench": {"gpt-3.5-turbo": 8.26, "Llama-3-8B-Instruct": 7.98, "Starling-LM-7B-beta": 7.92,
                 "Suzume-Llama-3-8B-multilingual": 7.73, "Qwen2-7B-Instruct (judge gpt-4o)": 7.56},
    "ru_mt_bench_50": {"Starling-LM-7B-beta": 8.28, "Suzume-Llama-3-8B-multilingual": 8.19, "gpt-3.5-turbo": 7.94,
                       "Qwen2-7B-Instruct (judge gpt-4o)": 7.29},
    "zh_mt_bench": {"Qwen2-7B-Instruct (judge gpt-4o)": 7.67, "gpt-3.5-turbo": 7.55,
                    "Suzume-Llama-3-8B-multilingual": 7.11, "Starling-LM-7B-beta": 6.97},
}


def _read(paths: Iterable[str | Path], fields: tuple[str, ...], what: str, hint: str) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FabrikaError(f"{path}: judgment file not found")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FabrikaError(f"{path}:{n}: not JSON ({e.msg})") from None
            missing = [k for k in fields if k not in row]
            if missing:
                raise FabrikaError(f"{path}:{n}: not a {what} judgment (missing {', '.join(missing)}); {hint}")
            row.setdefault("_file", str(path))
            rows.append(row)
    return rows


def read_judgments(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    return _read(paths, ("question_id", "model", "score", "turn"), "single-answer",
                 "pairwise files are summarised with --pairwise")


def read_pair_judgments(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    return _read(paths, ("question_id", "model_1", "model_2", "g1_winner", "g2_winner", "turn"), "pairwise",
                 "single-answer files are summarised without --pairwise")


def question_categories(judgment_file: str | Path) -> dict[int, str]:
    """Category of each question id for a judgment file: from the question file of the bench its
    folder names (`<bench>/model_judgment/`: a packaged bench, or a FastChat `question.jsonl` beside
    `model_judgment/`), else MT-Bench's own; its ids 81-160 keep their categories in every packaged
    translation."""
    from importlib import resources

    bench_dir = Path(judgment_file).resolve().parent.parent
    packaged = resources.files("fabrika.evaluate").joinpath("data")
    for candidate in (bench_dir / "question.jsonl", packaged.joinpath(bench_dir.name, "question.jsonl"),
                      packaged.joinpath("mt_bench", "question.jsonl")):
        if candidate.is_file():
            rows = [json.loads(line) for line in candidate.read_text(encoding="utf-8").splitlines() if line.strip()]
            return {q["question_id"]: q.get("category", "?") for q in rows if "question_id" in q}
    return {}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(rows: list[dict[str, Any]], categories: dict[int, str] | None = None,
              languages: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """{model: {turn1, turn2, overall, n, failed, by_category, by_language}}.

    `categories` maps question ids to categories (from the question file); `languages` maps a judgment
    file (or bench) to a language, when several languages are evaluated together."""
    by_model: dict[str, dict[str, Any]] = defaultdict(lambda: {"t1": [], "t2": [], "all": [], "failed": 0,
                                                                "cat": defaultdict(list), "lang": defaultdict(list)})
    for r in rows:
        m = by_model[r["model"]]
        if r["score"] == -1:
            m["failed"] += 1
            continue
        s = float(r["score"])
        m["t1" if r["turn"] == 1 else "t2"].append(s)
        m["all"].append(s)
        if categories and r["question_id"] in categories:
            m["cat"][categories[r["question_id"]]].append(s)
        if languages:
            m["lang"][languages.get(r.get("_file", ""), r.get("language", "?"))].append(s)
    out = {}
    for model, m in by_model.items():
        out[model] = {"turn1": _mean(m["t1"]), "turn2": _mean(m["t2"]), "overall": _mean(m["all"]),
                      "n": len(m["all"]), "failed": m["failed"],
                      "by_category": {c: _mean(v) for c, v in sorted(m["cat"].items())},
                      "by_language": {lang: _mean(v) for lang, v in sorted(m["lang"].items())}}
    return out


def summarise_pairs(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Win/loss/tie per model pair, FastChat's way: g1 and g2 disagreeing counts as a tie."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        key = f"{r['model_1']} vs {r['model_2']}"
        c = out.setdefault(key, {"model_1_wins": 0, "model_2_wins": 0, "ties": 0, "errors": 0})
        w = r["g1_winner"] if r["g1_winner"] == r["g2_winner"] else "tie"
        c[{"model_1": "model_1_wins", "model_2": "model_2_wins", "tie": "ties"}.get(w, "errors")] += 1
    return out


def pair_win_rate(counts: dict[str, int]) -> float | None:
    """Model 1's share of decided comparisons, a tie counting half (errors left out)."""
    decided = counts["model_1_wins"] + counts["model_2_wins"] + counts["ties"]
    return (counts["model_1_wins"] + 0.5 * counts["ties"]) / decided if decided else None


def leaderboard(roots: Iterable[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """Every model graded under `roots` (any depth of `<bench>/model_judgment/*_single.jsonl`), per
    bench, best first, with the published reference scores of that bench in the same ranking."""
    files: dict[str, list[Path]] = defaultdict(list)
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FabrikaError(f"{root}: no such results folder")
        for f in sorted(root.rglob("model_judgment/*_single.jsonl")):
            files[f.parent.parent.name].append(f)
    if not files:
        raise FabrikaError(f"no model_judgment/*_single.jsonl under {', '.join(map(str, roots))}")
    board: dict[str, list[dict[str, Any]]] = {}
    for bench, paths in sorted(files.items()):
        entries = [{"model": m, "published": False, "judge": ", ".join(sorted({Path(p).stem.removesuffix("_single")
                                                                              for p in paths})), **sm}
                   for m, sm in summarise(read_judgments(paths)).items() if sm["overall"] is not None]
        entries += [{"model": m, "published": True, "overall": v, "turn1": None, "turn2": None, "n": None,
                     "judge": "gpt-4"} for m, v in REFERENCE_SCORES.get(bench, {}).items()]
        board[bench] = sorted(entries, key=lambda e: -(e["overall"] or 0))
    return board
