"""The `evaluate` stage: MT-Bench judged by an LLM, perplexity, lm-evaluation-harness tasks and a
benchmark contamination check, folded into one results.json, a Markdown table and plots.

    fabrika eval mtbench --model hf:runs/x/sft/model --bench ru_mt_bench --judge openai:gpt-4o --out DIR
    fabrika eval mtbench --answers other/model_answer/m.jsonl --bench mt_bench --judge openai:gpt-4o --out DIR
    fabrika eval show DIR/*/model_judgment/*.jsonl

or as an `evaluate` stage of a pipeline (`model: sft`, `mtbench: {bench: [mt_bench, ru_mt_bench], judge: judge}`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fabrika.artifacts import Artifact, RunContext, atomic_write_json, atomic_write_text, read_jsonl
from fabrika.config import Config
from fabrika.errors import FabrikaError
from fabrika.evaluate import judge as J
from fabrika.evaluate import mtbench as M
from fabrika.evaluate.render import markdown, plot
from fabrika.evaluate.scores import pair_win_rate, summarise, summarise_pairs
from fabrika.infer.client import ClientConfig, default_cache_dir
from fabrika.infer.costs import api_cost
from fabrika.models.refs import api_model, parse_ref


class MTBenchParams(Config):
    bench: list[str] = Field(default_factory=lambda: ["mt_bench"], description="Benches (mt_bench, ru_mt_bench, ru_mt_bench_50, zh_mt_bench) or FastChat question files.")
    judge: str = Field("openai:gpt-4o", description="Judge model reference (a named model, openai:..., hf:...).")
    prompts: Literal["auto", "fastchat", "multilingual"] = Field("auto", description="fastchat, multilingual, or auto (multilingual for non-English).")
    questions: int | None = Field(None, ge=1, description="Only the first N questions (quick checks).")
    max_new_tokens: int = Field(1024, ge=1, description="Answer length, FastChat's default.")
    answers: str | None = Field(None, description="Judge this existing answer file instead of generating.")
    judge_retries: int = Field(1, ge=0, description="Extra tries for judgments without a [[rating]].")
    judge_max_tokens: int = Field(2048, ge=1, description="Longest judgment (FastChat: 2048).")
    client: ClientConfig = Field(default_factory=ClientConfig, description="Judge client settings (concurrency, "
                                 "retries, cache_dir, ...).")
    mode: Literal["single", "pairwise", "both"] = Field(
        "single", description="single: grade 1-10; pairwise: compare with `baseline` (pair-v2, both orders).")
    baseline: str | None = Field(None, description="Pairwise opponent: a model reference or a FastChat answer file.")

    @field_validator("bench", mode="before")
    @classmethod
    def _list(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _baseline(self):
        if self.mode != "single" and not self.baseline:
            raise ValueError(f"mode {self.mode} compares two models: set baseline (a model or an answer file)")
        if self.mode == "single" and self.baseline:
            raise ValueError("baseline is only used with mode: pairwise or both")
        return self


class PerplexityParams(Config):
    data: str = Field(description="Text file, dataset, or a prepare stage (its validation shards).")
    context: int = Field(512, ge=8, description="Tokens per window.")
    max_tokens: int = Field(16384, ge=16, description="Tokens scored at most.")


class HarnessParams(Config):
    tasks: list[str] = Field(description="lm-eval task names.")
    include_path: str | None = Field(None, description="Folder of custom task YAML files.")
    limit: float | None = Field(None, gt=0, description="Examples per task (or fraction).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples.")


class ContaminationParams(Config):
    data: str = Field(description="Training dataset (a collect stage, dataset dir or file).")
    benches: list[str] = Field(default_factory=lambda: list(M.BENCHES), description="Benches to check against.")
    n: int = Field(8, ge=3, description="n-gram size (words; characters for Chinese).")
    threshold: float = Field(0.5, gt=0, le=1, description="Overlap that flags a pair.")


class EvaluateConfig(Config):
    model: str | None = Field(None, description="Model to evaluate: a stage, hf:DIR, gguf:FILE, openai:MODEL@URL.")
    model_id: str | None = Field(None, description="Name in answer and judgment files (default: the model's stage, "
                                 "directory, file or Hub id).")
    tokenizer: str | None = Field(None, description="HF tokenizer for perplexity of a GGUF file.")
    mtbench: MTBenchParams | None = Field(None, description="MT-Bench settings.")
    perplexity: PerplexityParams | None = Field(None, description="Perplexity settings.")
    harness: HarnessParams | None = Field(None, description="lm-evaluation-harness settings.")
    contamination: ContaminationParams | None = Field(None, description="Benchmark contamination check.")


CONFIG = EvaluateConfig


def inputs(cfg: EvaluateConfig) -> list[str]:
    """Everything the results depend on, answer and question files too: judged again when they change."""
    refs = [cfg.model, cfg.tokenizer]
    if cfg.perplexity:
        refs.append(cfg.perplexity.data)
    if cfg.contamination:
        refs.append(cfg.contamination.data)
    if cfg.mtbench:
        refs += [cfg.mtbench.judge, cfg.mtbench.answers, cfg.mtbench.baseline]
        refs += [b for b in cfg.mtbench.bench if b not in M.BENCHES]
    return [r for r in refs if r]


def model_ref(cfg: EvaluateConfig, ctx: RunContext) -> str:
    if not cfg.model:
        raise FabrikaError("evaluate.model: which model? (a stage name, hf:DIR, gguf:FILE or openai:MODEL@URL)")
    return ctx.generator_ref(cfg.model)


def default_model_id(cfg: EvaluateConfig, ctx: RunContext) -> str:
    """The name in answer and judgment files when `model_id` is not set: the pipeline stage, else the
    model itself (its directory, GGUF file or Hub/API model name, as FastChat names answer files), else
    the `model_id` inside the answer file being judged."""
    if cfg.model_id:
        return cfg.model_id
    if cfg.model and cfg.model in ctx.inputs:
        return cfg.model
    if cfg.mtbench and cfg.mtbench.answers and not cfg.model:
        answers = M.load_answers(Path(cfg.mtbench.answers))
        return answers[0]["model_id"] if answers else Path(cfg.mtbench.answers).stem
    if not cfg.model:
        return "model"
    return parse_ref(ctx.generator_ref(cfg.model)).display_name


def _progress(what: str, quiet: bool):
    """Done / total and the time left, as the judge client shows for its requests."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from fabrika.logs import progress

    return progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("left"), TimeRemainingColumn(),
                    disable=quiet)


def bench_name(question_file: Path) -> str:
    """FastChat keeps a bench as `<bench>/question.jsonl`; any other question file names the bench itself."""
    return question_file.parent.name if question_file.stem == "question" else question_file.stem


def skipped_turns(questions: list[dict], answers: list[dict]) -> list[dict[str, int]]:
    """Turns without an answer because the prompt did not fit the model's context: a question never
    answered (turn 1 and what follows), or answered on turn 1 only."""
    by_q = {a["question_id"]: len(a["choices"][0]["turns"]) for a in answers}
    return [{"question_id": q["question_id"], "turn": t} for q in questions
            for t in range(by_q.get(q["question_id"], 0) + 1, len(q["turns"]) + 1)]


def estimate(cfg: EvaluateConfig, ctx: RunContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.mtbench:
        n = 0
        for bench in cfg.mtbench.bench:
            qs = M.load_questions(bench)[0][: cfg.mtbench.questions]
            n += sum(len(q["turns"]) for q in qs)
        judge = api_model(ctx.resolve_model(cfg.mtbench.judge))
        client = cfg.mtbench.client

        def usd(mode: Literal["online", "batch"]) -> float:  # ~1500 tokens of prompt, ~300 of judgment a call
            return round(api_cost(judge, 1500, 300, n, client.prices, mode).usd, 2)

        if client.mode == "batch":
            out.update(judge_calls=n, est_judge_usd=usd("batch"), est_judge_online_usd=usd("online"))
        else:
            out.update(judge_calls=n, est_judge_usd=usd("online"))
        if cfg.model and api_model(ctx.resolve_model(cfg.model)) is not None:
            out["answer_calls"] = n
        elif cfg.model and not cfg.mtbench.answers:  # generated here: every turn at most max_new_tokens long
            out["answer_tokens_max"] = n * cfg.mtbench.max_new_tokens
    return out


def _run_mtbench(cfg: EvaluateConfig, ctx: RunContext, model_id: str) -> dict[str, Any]:
    p = cfg.mtbench
    assert p is not None
    jref = ctx.generator_ref(p.judge)
    judge_name = p.judge if p.judge in ctx.inputs else parse_ref(jref).model.replace("/", "_")
    gen = None
    results: dict[str, Any] = {}
    for bench in p.bench:
        questions, refs, lang = M.load_questions(bench)
        questions = questions[: p.questions] if p.questions else questions
        name = bench if bench in M.BENCHES else bench_name(Path(bench))
        bench_dir = ctx.stage_dir / name
        if p.answers:
            answers = M.load_answers(Path(p.answers))
        else:
            if gen is None:
                from fabrika.infer.backends import load_generator

                gen = load_generator(model_ref(cfg, ctx))
            with _progress(f"{name}: answers", ctx.quiet) as bar:
                task = bar.add_task("answers", total=len(questions))
                answers = M.generate_answers(gen, questions, bench_dir / "model_answer" / f"{model_id}.jsonl",
                                             model_id, p.max_new_tokens,
                                             progress=lambda n: bar.advance(task, n), say=bar.console.print)
        kind = p.prompts if p.prompts != "auto" else ("fastchat" if lang == "en" else "multilingual")
        options = {"cache_dir": str(default_cache_dir()), **p.client.model_dump(exclude_unset=True)}
        summary: dict[str, Any] = {}
        if p.mode in ("single", "both"):
            judgment_file = bench_dir / "model_judgment" / f"{judge_name}_single.jsonl"
            done = {(r["question_id"], r["turn"]) for r in read_jsonl(judgment_file) if r.get("model") == model_id}
            matches = M.judge_matches(questions, answers, refs, judge_name, J.load_prompts(kind), done)
            _say_cost(ctx, name, [m["messages"] for m in matches], jref, p.client)
            M.run_judging(matches, jref, judgment_file, model_id, options, p.judge_retries, quiet=ctx.quiet,
                          max_tokens=p.judge_max_tokens)
            rows = [r for r in read_jsonl(judgment_file) if r["model"] == model_id]
            cats = {q["question_id"]: q.get("category", "") for q in questions}
            summary = summarise(rows, cats).get(model_id, {})
        if p.mode in ("pairwise", "both"):
            summary["pairwise"] = _pairwise(p, ctx, questions, refs, answers, model_id, bench_dir, kind, judge_name,
                                            jref, options)
        summary.update(language=lang, judge=judge_name, prompts=kind,
                       skipped=[] if p.answers else skipped_turns(questions, answers))
        results[name] = summary
    return results


def _say_cost(ctx: RunContext, bench: str, conversations: list[list[dict]], jref: str, client: ClientConfig) -> None:
    est = M.estimate_judging(conversations, api_model(jref), client.prices, client.mode)
    if not ctx.quiet:
        print(f"{bench}: {est['judge_calls']} judge calls to {jref} (estimated ${est['est_cost_usd']}"
              f"{' at the batch price' if client.mode == 'batch' else ''})")


def _pairwise(p: MTBenchParams, ctx: RunContext, questions: list[dict], refs: dict, answers: list[dict],
              model_id: str, bench_dir: Path, kind: str, judge_name: str, jref: str,
              options: dict[str, Any]) -> dict[str, Any]:
    """The model against `baseline`, FastChat's pair-v2 prompts in both orders: a win only when both agree."""
    assert p.baseline is not None
    if p.baseline.endswith(".jsonl") and Path(p.baseline).is_file():
        theirs = M.load_answers(Path(p.baseline))
        baseline_id = theirs[0]["model_id"] if theirs else Path(p.baseline).stem
    else:
        from fabrika.infer.backends import load_generator

        ref = ctx.generator_ref(p.baseline)
        baseline_id = p.baseline if p.baseline in ctx.inputs else Path(parse_ref(ref).model).name
        theirs = M.generate_answers(load_generator(ref), questions, bench_dir / "model_answer" / f"{baseline_id}.jsonl",
                                    baseline_id, p.max_new_tokens)
    if baseline_id == model_id:
        raise FabrikaError(f"evaluate.mtbench.baseline: both models are called {model_id!r}; set model_id")
    pair_file = bench_dir / "model_judgment" / f"{judge_name}_pair.jsonl"
    done = {(r["question_id"], r["turn"]) for r in read_jsonl(pair_file)
            if (r["model_1"], r["model_2"]) == (model_id, baseline_id)}
    matches = M.pair_matches(questions, answers, theirs, refs, judge_name, J.load_prompts(kind), done)
    _say_cost(ctx, f"{bench_dir.name} pairwise", [g for m in matches for g in m["games"]], jref, p.client)
    M.run_pair_judging(matches, jref, pair_file, options, quiet=ctx.quiet, max_tokens=p.judge_max_tokens)
    rows = [r for r in read_jsonl(pair_file) if (r["model_1"], r["model_2"]) == (model_id, baseline_id)]
    c = summarise_pairs(rows).get(f"{model_id} vs {baseline_id}",
                                  {"model_1_wins": 0, "model_2_wins": 0, "ties": 0, "errors": 0})
    return {"baseline": baseline_id, "wins": c["model_1_wins"], "losses": c["model_2_wins"], "ties": c["ties"],
            "errors": c["errors"], "win_rate": pair_win_rate(c)}


def run(cfg: EvaluateConfig, ctx: RunContext) -> Artifact:
    if not any((cfg.mtbench, cfg.perplexity, cfg.harness, cfg.contamination)):
        raise FabrikaError("evaluate: nothing to do; set mtbench, perplexity, harness or contamination")
    if ctx.quiet:
        from fabrika.logs import quiet_libraries

        quiet_libraries()
    model_id = default_model_id(cfg, ctx)
    results: dict[str, Any] = {"model": model_id}
    if cfg.mtbench:
        results["mtbench"] = _run_mtbench(cfg, ctx, model_id)
    if cfg.perplexity:
        from fabrika.evaluate.perplexity import perplexity

        ref = model_ref(cfg, ctx)
        tok = ctx.resolve(cfg.tokenizer) if cfg.tokenizer else None
        results["perplexity"] = perplexity(ref, ctx.resolve(cfg.perplexity.data), cfg.perplexity.context,
                                           cfg.perplexity.max_tokens, tok)
    if cfg.harness:
        from fabrika.evaluate.harness import run_harness

        model = parse_ref(model_ref(cfg, ctx))
        if model.kind != "hf":
            raise FabrikaError("evaluate.harness: lm-evaluation-harness runs on a Hugging Face model directory")
        h = cfg.harness
        results["harness"] = run_harness(model.path, h.tasks, h.include_path, h.limit, h.num_fewshot)
    if cfg.contamination:
        results["contamination"] = check_contamination(cfg.contamination, ctx)
    atomic_write_json(ctx.stage_dir / "results.json", results)
    atomic_write_text(ctx.stage_dir / "results.md", markdown(results, model_id))
    plot(results, ctx.stage_dir / "mtbench.png")
    metrics: dict[str, Any] = {}
    for bench, r in results.get("mtbench", {}).items():
        metrics[bench] = r.get("overall")
        if r.get("skipped"):
            metrics[f"{bench}_skipped_turns"] = len(r["skipped"])
    if "perplexity" in results:
        metrics["ppl"] = results["perplexity"]["ppl"]
    if "contamination" in results:
        metrics["contaminated_rows"] = len(results["contamination"])
    return ctx.finish(ctx.stage_dir / "results.json", cfg, metrics=metrics)


def check_contamination(p: ContaminationParams, ctx: RunContext) -> list[dict[str, Any]]:
    from fabrika.data.formats import RowError, to_messages
    from fabrika.data.sources import iter_rows
    from fabrika.evaluate.contamination import check

    questions = []
    for bench in p.benches:
        for q in M.load_questions(bench)[0]:
            for t, turn in enumerate(q["turns"]):
                questions.append((f"{bench}:{q['question_id']}:{t + 1}", turn))
    rows = []
    for i, row in iter_rows(ctx.resolve(p.data)):
        try:
            rows.append((i, "\n".join(m["content"] for m in to_messages(row))))
        except RowError:
            continue
    return check(questions, rows, p.n, p.threshold)
