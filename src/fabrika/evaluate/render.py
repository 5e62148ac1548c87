"""MT-Bench scores as people read them: the terminal tables of `fabrika eval show` and `eval leaderboard`,
the evaluate stage's results.md, and its plot (also embedded in the run report).

Numbers are computed in scores.py; this module only lays them out, so the CLI, the evaluate stage and
the report show one score the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

from rich.console import RenderableType
from rich.table import Table

from fabrika.evaluate.scores import (REFERENCE_SCORES, leaderboard, pair_win_rate, question_categories,
                                     read_judgments, read_pair_judgments, summarise, summarise_pairs)


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def win_rate(pairwise: dict[str, Any]) -> str:
    return "—" if pairwise.get("win_rate") is None else f"{pairwise['win_rate']:.0%}"


def pairwise_table(files: list[Path]) -> Table:
    """`fabrika eval show --pairwise`: wins, losses and ties per model pair."""
    table = Table(title="MT-Bench (pairwise; disagreement between the two orders = tie)")
    for col in ("models", "model 1 wins", "model 2 wins", "ties", "errors", "model 1 win rate"):
        table.add_column(col, justify="right")
    for pair, c in summarise_pairs(read_pair_judgments(files)).items():
        rate = pair_win_rate(c)
        table.add_row(pair, str(c["model_1_wins"]), str(c["model_2_wins"]), str(c["ties"]), str(c["errors"]),
                      "—" if rate is None else f"{rate:.0%}")
    return table


def single_tables(files: list[Path]) -> list[RenderableType]:
    """`fabrika eval show`: the models best first, their scores by category, and by language where a
    model was graded in more than one."""
    rows = read_judgments(files)
    categories = {}
    for f in files:
        categories.update(question_categories(f))
    summary = summarise(rows, categories, languages={str(f): f.parent.parent.name for f in files})
    table = Table(title="MT-Bench (single-answer grading)")
    for col in ("model", "turn 1", "turn 2", "overall", "graded", "failed"):
        table.add_column(col, justify="right")
    ranked = sorted(summary.items(), key=lambda kv: -(kv[1]["overall"] or 0))
    for model, s in ranked:
        table.add_row(model, fmt(s["turn1"]), fmt(s["turn2"]), fmt(s["overall"]), str(s["n"]), str(s["failed"]))
    by_cat = Table(title="by category")
    by_cat.add_column("category")
    for model, _ in ranked:
        by_cat.add_column(model, justify="right")
    for cat in sorted({c for _, s in ranked for c in s["by_category"]}):
        by_cat.add_row(cat, *(fmt(s["by_category"].get(cat)) for _, s in ranked))
    languages = [f"{model} by language: " + ", ".join(f"{k} {fmt(v)}" for k, v in s["by_language"].items())
                 for model, s in summary.items() if len(s["by_language"]) > 1]
    return [table, by_cat, *languages]


def leaderboard_tables(dirs: list[Path]) -> tuple[list[Table], str]:
    """`fabrika eval leaderboard`: one table per bench, published scores dimmed, and the same as Markdown."""
    tables: list[Table] = []
    md = ["# MT-Bench leaderboard", ""]
    for bench, entries in leaderboard(dirs).items():
        table = Table(title=f"{bench}")
        md += [f"## {bench}", "", "| # | model | turn 1 | turn 2 | overall | judge |", "|---|---|---|---|---|---|"]
        for col in ("#", "model", "turn 1", "turn 2", "overall", "judge"):
            table.add_column(col, justify="right")
        for i, e in enumerate(entries, 1):
            name = f"{e['model']} (published)" if e["published"] else e["model"]
            cells = [str(i), name, fmt(e["turn1"]), fmt(e["turn2"]), fmt(e["overall"]), e["judge"]]
            table.add_row(*cells, style="dim" if e["published"] else None)
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
        tables.append(table)
    return tables, "\n".join(md)


def plot(results: dict[str, Any], path: Path | BinaryIO) -> Path | BinaryIO | None:
    """Per-category MT-Bench scores, one bar group per bench, turn 1 vs turn 2 beside, as a PNG file
    (the evaluate stage) or into a buffer (the report embeds it)."""
    benches = {b: r for b, r in results.get("mtbench", {}).items() if r.get("by_category")}
    if not benches:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    cats = sorted({c for r in benches.values() for c in r["by_category"]})
    width = 0.8 / len(benches)
    for i, (bench, r) in enumerate(benches.items()):
        axes[0].bar([k + i * width for k in range(len(cats))], [r["by_category"].get(c) or 0 for c in cats],
                    width, label=bench)
        axes[1].bar([i * 3, i * 3 + 1], [r.get("turn1") or 0, r.get("turn2") or 0], label=bench)
    axes[0].set_xticks([k + 0.4 - width / 2 for k in range(len(cats))], cats, rotation=30, ha="right")
    axes[0].set_ylim(0, 10)
    axes[0].set_title("MT-Bench by category")
    axes[0].legend()
    axes[1].set_xticks([i * 3 + 0.5 for i in range(len(benches))], list(benches), rotation=30, ha="right")
    axes[1].set_ylim(0, 10)
    axes[1].set_title("turn 1 | turn 2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(results: dict[str, Any], model_id: str) -> str:
    """results.md: what `fabrika eval mtbench` prints and the stage folder keeps beside results.json."""
    lines = [f"# Evaluation of {model_id}", ""]
    if results.get("mtbench"):
        lines += ["## MT-Bench", "", "| bench | turn 1 | turn 2 | overall | graded | failed | skipped | judge |",
                  "|---|---|---|---|---|---|---|---|"]
        for bench, r in results["mtbench"].items():
            lines.append(f"| {bench} | {fmt(r.get('turn1'))} | {fmt(r.get('turn2'))} | {fmt(r.get('overall'))} | "
                         f"{r.get('n', 0)} | {r.get('failed', 0)} | {len(r.get('skipped', []))} | {r.get('judge')} |")
            for ref_model, score in REFERENCE_SCORES.get(bench, {}).items():
                lines.append(f"| ↳ published: {ref_model} | | | {score:.2f} | | | | gpt-4-turbo |")
        lines.append("")
        for bench, r in results["mtbench"].items():
            if r.get("skipped"):
                turns = ", ".join(f"question {s['question_id']} turn {s['turn']}" for s in r["skipped"])
                lines += [f"{bench}: not answered, the prompt did not fit the model's context: {turns}. "
                          "Lower `mtbench.max_new_tokens` or evaluate a model with a longer context.", ""]
        pairs = {b: r["pairwise"] for b, r in results["mtbench"].items() if r.get("pairwise")}
        if pairs:
            lines += ["### Pairwise (pair-v2, both orders; disagreement = tie)", "",
                      "| bench | against | wins | losses | ties | win rate |", "|---|---|---|---|---|---|"]
            lines += [f"| {b} | {r['baseline']} | {r['wins']} | {r['losses']} | {r['ties']} | {win_rate(r)} |"
                      for b, r in pairs.items()]
            lines.append("")
    if results.get("perplexity"):
        r = results["perplexity"]
        lines += ["## Perplexity", "", f"{r['ppl']:.3f} on {r['tokens']} tokens of {r['source']} (context {r['context']})", ""]
    if results.get("harness"):
        lines += ["## lm-evaluation-harness", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in results["harness"].items():
            lines += [f"| {task} | {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)]
        lines.append("")
    if "contamination" in results:
        flagged = results["contamination"]
        lines += ["## Contamination", "", f"{len(flagged)} training rows overlap benchmark questions."]
        lines += [f"- question {f['question_id']} ~ row {f['row']} ({f['overlap']:.0%})" for f in flagged[:20]]
    return "\n".join(lines) + "\n"
