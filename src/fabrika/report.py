"""The run report: one self-contained HTML page and a Markdown summary per run directory.

    fabrika report runs/tiny-cpu        (also written at the end of every `fabrika run`)

Everything comes from what the stages left on disk (pipeline.json, manifests, metrics.jsonl,
results.json, verification.json), so a report can be rebuilt at any time, also for a run that failed
half way. Plots are PNG images inside the page (data URIs): the file can be mailed or attached to an
issue and still shows everything.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from fabrika.artifacts import atomic_write_text, read_json, read_jsonl
from fabrika.runs import read_run

SECTIONS = {"pipeline": "Pipeline", "data": "Datasets", "training": "Training", "evaluation": "Evaluation",
            "gguf": "GGUF export", "reproduce": "Reproduce"}
STATE_COLORS = {"done": "#c8e6c9", "failed": "#ffcdd2", "damaged": "#ffcdd2", "interrupted": "#fff3c4",
                "stale": "#e0e0e0", "pending": "#f5f5f5"}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:1.5rem;
color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee;margin:.4rem 0}
nav a{margin-right:1rem}.muted{color:#777}.state-done{background:#e8f5e9}.state-failed{background:#ffebee}
pre{background:#f7f7f7;padding:.8rem;overflow:auto;font-size:.82rem;max-height:28rem}
details{margin:.4rem 0}
"""


# --- collecting what the run left ------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- sections -------------------------------------------------------------------------------

def diagram(stages: list[dict[str, Any]]) -> str:
    """Stages as boxes in columns by depth (a stage sits right of everything it reads), arrows for inputs."""
    plt = _pyplot()
    from matplotlib.patches import FancyBboxPatch

    level: dict[str, int] = {}
    for s in stages:  # stages are stored in run (topological) order
        level[s["name"]] = 1 + max((level[d] for d in s["deps"] if d in level), default=-1)
    columns: dict[int, list[str]] = {}
    for s in stages:
        columns.setdefault(level[s["name"]], []).append(s["name"])
    rows = max(len(c) for c in columns.values())
    pos = {name: (lv * 2.2, (rows - 1) / 2 - i) for lv, names in columns.items() for i, name in enumerate(names)}
    long_jumps = sum(level[s["name"]] - level[d] > 1 for s in stages for d in s["deps"] if d in level)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.75 * len(columns)), 1.1 + 1.05 * rows + 0.14 * long_jumps))
    for s in stages:
        x, y = pos[s["name"]]
        ax.add_patch(FancyBboxPatch((x - 0.85, y - 0.36), 1.7, 0.72, boxstyle="round,pad=0.03",
                                    fc=STATE_COLORS.get(s["state"], "#fff"), ec="#555"))
        took = s["manifest"].get("duration_s")
        sub = f"{s['state']}" + (f" · {_duration(took)}" if took is not None else "")
        ax.text(x, y + 0.12, s["name"], ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x, y - 0.16, f"{s['kind']}\n{sub}" if s["kind"] != s["name"] else sub, ha="center", va="center",
                fontsize=7.5, color="#333")
    top = max(p[1] for p in pos.values()) + 0.36
    lanes = 0
    for s in stages:
        x, y = pos[s["name"]]
        for k, d in enumerate(s["deps"]):
            if d not in pos:
                continue
            dx, dy = pos[d]
            if level[s["name"]] - level[d] == 1:  # neighbours: a straight arrow
                ax.annotate("", xy=(x - 0.87, y), xytext=(dx + 0.87, dy),
                            arrowprops=dict(arrowstyle="->", color="#666"))
                continue
            lanes += 1  # a longer jump goes over the boxes, in a lane of its own
            lane = top + 0.12 + 0.13 * lanes
            x0, x1 = dx + 0.3 + 0.08 * (lanes % 4), x - 0.3 - 0.08 * k
            ax.plot([x0, x0, x1], [dy + 0.36, lane, lane], color="#888", lw=1)
            ax.annotate("", xy=(x1, y + 0.37), xytext=(x1, lane), arrowprops=dict(arrowstyle="->", color="#888"))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(min(ys) - 0.5, top + 0.25 + 0.13 * lanes)
    ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def data_section(stages: list[dict[str, Any]]) -> tuple[str, list[str]]:
    parts, md = [], []
    for s in stages:
        if s["kind"] != "collect" or not s["manifest"]:
            continue
        m = s["manifest"]["metrics"]
        by_lang = m.get("by_language", {})
        reasons = sorted({k for c in by_lang.values() for k in c if k.startswith("dropped:")})
        header = ["language", "sampled", "answered", "kept", *[r.split(":", 1)[1] for r in reasons], "tokens", "cost $"]
        rows = [[lang, c.get("sampled", 0), c.get("answered", 0), c.get("kept", 0), *[c.get(r, 0) for r in reasons],
                 c.get("tokens", 0), round(c.get("cost_usd", 0.0), 4)] for lang, c in by_lang.items()]
        cfg = s["manifest"].get("config", {})
        mode = "preference pairs" if cfg.get("preference") else "instruction data"
        parts.append(f"<h3>{html.escape(s['name'])} <span class='muted'>({mode} from "
                     f"{html.escape(str(cfg.get('source')))}, teacher {html.escape(str(cfg.get('teacher')))})</span></h3>"
                     + _table(header, rows)
                     + f"<p>{m.get('kept', 0):,} rows kept of {m.get('answered', 0):,} answered; "
                       f"{m.get('tokens', 0):,} tokens; API cost ${m.get('cost_usd', 0):.4f}; malformed source rows: "
                       f"{m.get('malformed_rows', 0)}.</p>")
        md.append(f"- **{s['name']}** ({mode}): {m.get('kept', 0)} rows kept of {m.get('answered', 0)} answered, "
                  f"${m.get('cost_usd', 0):.4f}")
    return "".join(parts) or "<p class='muted'>No collect stage in this run.</p>", md


def training_plot(metrics: list[dict[str, Any]], title: str) -> str | None:
    train = [r for r in metrics if "loss" in r]
    if not train:
        return None
    evals = [r for r in metrics if "eval_loss" in r]
    plt = _pyplot()
    panels = [("loss", "loss"), ("learning_rate", "learning rate"), ("tokens_per_s", "tokens/s")]
    if any("rewards/margins" in r for r in train):
        panels.append(("rewards/margins", "reward margin"))
    if any("reward" in r for r in train):  # GRPO: the weighted reward with its components, KL, answer length
        panels += [("reward", "reward"), ("kl", "KL to the reference"),
                   ("completions/mean_length", "completion tokens")]
    components = sorted({k for r in train for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0))
    for ax, (key, label) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label="train" if key == "loss" else None, color="#1565c0")
        if key == "reward" and components:
            for comp in components:
                ax.plot(*zip(*[(r["step"], r[comp]) for r in train if r.get(comp) is not None]), lw=0.8,
                        label=comp.split("/")[1])
            ax.legend(fontsize=7)
        if key == "loss" and evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="#e65100", label="eval")
            ax.legend()
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _png(fig)


def training_section(stages: list[dict[str, Any]]) -> tuple[str, list[str]]:
    parts, md = [], []
    for s in stages:
        if s["kind"] not in ("pretrain", "sft", "prefer", "rl") or not (s["dir"] / "metrics.jsonl").exists():
            continue
        metrics = list(read_jsonl(s["dir"] / "metrics.jsonl"))
        m = s["manifest"].get("metrics", {})
        cfg = s["manifest"].get("config", {})
        img = training_plot(metrics, f"{s['name']} ({s['kind']})")
        keys = [k for k in ("train_loss", "eval_loss", "eval_ppl", "reward_first", "reward_last", "kl", "tokens_per_s",
                            "mfu", "steps", "train_tokens", "parameters", "trainable_parameters") if k in m]
        detail = f"method {cfg.get('method')}" if cfg.get("method") else ""
        parts.append(f"<h3>{html.escape(s['name'])} <span class='muted'>{html.escape(s['kind'])} "
                     f"{html.escape(detail)}</span></h3>"
                     + (f"<img alt='{html.escape(s['name'])} curves' src='{img}'>" if img else "")
                     + _table(["metric", "value"], [[k, m[k]] for k in keys]))
        md.append(f"- **{s['name']}**: " + ", ".join(f"{k} {_cell(m[k])}" for k in keys[:4]))
    return "".join(parts) or "<p class='muted'>No training stage in this run.</p>", md


def evaluation_section(stages: list[dict[str, Any]]) -> tuple[str, list[str]]:
    from fabrika.evaluate.render import plot, win_rate
    from fabrika.evaluate.scores import REFERENCE_SCORES

    parts, md = [], []
    for s in stages:
        results_file = s["dir"] / "results.json"
        if s["kind"] != "evaluate" or not results_file.exists():
            continue
        results = read_json(results_file)
        parts.append(f"<h3>{html.escape(s['name'])} <span class='muted'>model {html.escape(str(results.get('model')))}"
                     "</span></h3>")
        bench = results.get("mtbench") or {}
        if bench:
            rows = []
            for name, r in bench.items():
                rows.append([name, r.get("language"), r.get("turn1"), r.get("turn2"), r.get("overall"), r.get("n", 0),
                             r.get("failed", 0), r.get("judge")])
                for ref_model, score in REFERENCE_SCORES.get(name, {}).items():
                    rows.append([f"↳ published: {ref_model}", "", None, None, score, None, None, "gpt-4"])
                md.append(f"- **MT-Bench {name}**: overall {_cell(r.get('overall'))} "
                          f"(turn 1 {_cell(r.get('turn1'))}, turn 2 {_cell(r.get('turn2'))}; {r.get('failed', 0)} "
                          "judgments without a rating)")
            parts.append("<h4>MT-Bench</h4>" + _table(["bench", "language", "turn 1", "turn 2", "overall", "graded",
                                                       "no rating", "judge"], rows))
            pairs = [[name, r["pairwise"]["baseline"], r["pairwise"]["wins"], r["pairwise"]["losses"],
                      r["pairwise"]["ties"], win_rate(r["pairwise"])] for name, r in bench.items() if r.get("pairwise")]
            if pairs:
                parts.append("<h4>Pairwise (pair-v2, both orders; disagreement = tie)</h4>"
                             + _table(["bench", "against", "wins", "losses", "ties", "win rate"], pairs))
            cats = sorted({c for r in bench.values() for c in (r.get("by_category") or {})})
            if cats:
                parts.append(_table(["category", *bench], [[c, *[(r.get("by_category") or {}).get(c) for r in
                                                                  bench.values()]] for c in cats]))
            buf = io.BytesIO()
            if plot(results, buf):
                parts.append(f"<img alt='MT-Bench by category' src='data:image/png;base64,"
                             f"{base64.b64encode(buf.getvalue()).decode()}'>")
            if any(r.get("failed") and not r.get("n") for r in bench.values()):
                parts.append("<p class='muted'>No judgment carried a [[rating]]: the judge did not follow the "
                             "grading format (expected of a tiny demo judge).</p>")
        if results.get("perplexity"):
            p = results["perplexity"]
            parts.append("<h4>Perplexity</h4>" + _table(["data", "tokens", "context", "perplexity"],
                                                        [[p.get("source"), p.get("tokens"), p.get("context"), p.get("ppl")]]))
            md.append(f"- **perplexity** ({p.get('source')}): {_cell(p.get('ppl'))}")
        if results.get("harness"):
            rows = [[task, k, v] for task, vals in results["harness"].items() if isinstance(vals, dict)
                    for k, v in vals.items() if isinstance(v, (int, float))]
            parts.append("<h4>lm-evaluation-harness</h4>" + _table(["task", "metric", "value"], rows))
        if results.get("contamination"):
            parts.append("<h4>Contamination</h4><pre>" + html.escape(json.dumps(results["contamination"], indent=1)[:4000])
                         + "</pre>")
    return "".join(parts) or "<p class='muted'>No evaluate stage in this run.</p>", md


def gguf_section(stages: list[dict[str, Any]]) -> tuple[str, list[str]]:
    parts, md = [], []
    for s in stages:
        vfile = s["dir"] / "verification.json"
        if s["kind"] != "export" or not vfile.exists():
            continue
        v = read_json(vfile)
        files = (v.get("verification") or {}).get("files", {})
        rows = []
        for qtype, r in files.items():
            size = round(r["bytes"] / 1e6, 2) if r.get("bytes") else None
            parity = r.get("tokenizer_parity") or {}
            rows.append([qtype, size, r.get("kl"), r.get("top1"), r.get("ppl"), r.get("hf_ppl"),
                         "yes" if parity and all(parity.values()) else ("no" if parity else None),
                         "yes" if r.get("end_of_turn_stops") else ("no" if "end_of_turn_stops" in r else None)])
        fallbacks = {q: c.get("fallbacks") for q, c in (v.get("conversion") or {}).items() if c.get("fallbacks")}
        parts.append(f"<h3>{html.escape(s['name'])} <span class='muted'>from {html.escape(str(v.get('model')))}</span></h3>"
                     + _table(["type", "MB", "mean KL", "top-1 agreement", "perplexity", "HF perplexity",
                               "tokenizer parity", "chat stops"], rows)
                     + _table(["type", "tensor types"], [[q, ", ".join(f"{k} {n}" for k, n in t.items())]
                                                        for q, t in (v.get("tensor_types") or {}).items()])
                     + (f"<p>Fallbacks: {html.escape(json.dumps(fallbacks))}</p>" if fallbacks else ""))
        md += [f"- **GGUF {q}**: KL {_cell(r.get('kl'))}, top-1 {_cell(r.get('top1'))}" for q, r in files.items()]
    return "".join(parts) or "<p class='muted'>No export stage in this run.</p>", md


def reproduce_section(spec: dict[str, Any], stages: list[dict[str, Any]]) -> str:
    versions = next((s["manifest"].get("versions") for s in reversed(stages) if s["manifest"].get("versions")), {})
    host = next((s["manifest"].get("host") for s in reversed(stages) if s["manifest"].get("host")), {})
    configs = "".join(f"<details><summary>{html.escape(s['name'])} ({html.escape(s['kind'])}), fingerprint "
                      f"{html.escape(str(s['fingerprint']))}</summary>"
                      f"<pre>{html.escape(json.dumps(s['manifest'].get('config'), indent=2))}"
                      "</pre></details>" for s in stages if s["manifest"])
    return (f"<p>Run again with <code>fabrika run {html.escape(spec.get('source', ''))}</code> "
            f"(seed {html.escape(str(spec.get('seed')))});"
            " finished stages with unchanged fingerprints are reused.</p>"
            + _table(["package", "version"], sorted(versions.items()))
            + _table(["host", "value"], [[k, v] for k, v in host.items()]) + configs)


# --- the page ----------------------------------------------------------------------------------

def build(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.html and report.md into the run directory; returns their paths."""
    run_dir = Path(run_dir)
    spec, stages = read_run(run_dir)
    overview = _table(["stage", "kind", "state", "duration"],
                      [[s["name"], s["kind"], s["state"], _duration(s["manifest"]["duration_s"])
                        if s["manifest"].get("duration_s") is not None else None] for s in stages])
    data_html, data_md = data_section(stages)
    train_html, train_md = training_section(stages)
    eval_html, eval_md = evaluation_section(stages)
    gguf_html, gguf_md = gguf_section(stages)
    bodies = {"pipeline": f"<img alt='pipeline diagram' src='{diagram(stages)}'>" + overview,
              "data": data_html, "training": train_html, "evaluation": eval_html, "gguf": gguf_html,
              "reproduce": reproduce_section(spec, stages)}
    name = html.escape(spec["name"])
    nav = "".join(f"<a href='#{k}'>{v}</a>" for k, v in SECTIONS.items())
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fabrika run {name}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>"
            f"<h1>fabrika run <code>{name}</code></h1><p class='muted'>{html.escape(str(run_dir))} · "
            f"{sum(s['state'] == 'done' for s in stages)} of {len(stages)} stages done</p><nav>{nav}</nav>"
            + "".join(f"<section id='{k}'><h2>{SECTIONS[k]}</h2>{bodies[k]}</section>" for k in SECTIONS)
            + "</body></html>")
    md = [f"# fabrika run `{spec['name']}`", "", "| stage | kind | state | duration |", "|---|---|---|---|"]
    md += [f"| {s['name']} | {s['kind']} | {s['state']} | "
           f"{_duration(s['manifest']['duration_s']) if s['manifest'].get('duration_s') is not None else ''} |"
           for s in stages]
    for title, lines in (("Datasets", data_md), ("Training", train_md), ("Evaluation", eval_md), ("GGUF", gguf_md)):
        if lines:
            md += ["", f"## {title}", "", *lines]
    md += ["", "Full report with plots: report.html", ""]
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    atomic_write_text(html_path, page)
    atomic_write_text(md_path, "\n".join(md))
    return html_path, md_path
