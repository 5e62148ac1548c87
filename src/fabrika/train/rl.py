"""Reinforcement learning from rewards (GRPO), through TRL's GRPOTrainer.

    fabrika rl --model runs/x/sft --data prompts.jsonl --reward judge=1,language=0.5 --judge openai:gpt-4o --out DIR

or as the `rl` stage of a pipeline. fabrika brings the prompts (a file, a Hub dataset or a collect
stage), the rewards (named, weighted, each logged on its own), the judge's cache and journal, and the
pipeline; the algorithm is TRL's. Model loading, LoRA/QLoRA, the chat-template contract, seeds, exact
resume and saving are the ones `sft` uses, so a model trained here stops and chats exactly like one
trained there.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

from pydantic import Field, model_validator

from fabrika import ranks
from fabrika.artifacts import Artifact, RunContext, atomic_write_json, read_jsonl
from fabrika.config import Config
from fabrika.data import filters as F
from fabrika.data.formats import RowError, prompt_messages
from fabrika.data.sources import load_dataset_any
from fabrika.errors import FabrikaError
from fabrika.models import plan
from fabrika.models.model_dir import stop_ids
from fabrika.models.templates import TemplateName
from fabrika.train import rewards as R
from fabrika.train import finetune, setup
from fabrika.train.judge_reward import Judge, JudgeReward
from fabrika.train.finetune import LoraParams


class Rewards(Config):
    """Each key is a reward; its settings include its weight. At least one is needed."""

    judge: JudgeReward | None = Field(None, description="An LLM judge's 1-10 rating (FastChat's prompt).")
    verifiable: R.VerifiableReward | None = Field(None, description="Answer checked against a reference, a regex "
                                                  "or a JSON Schema.")
    language: R.LanguageReward | None = Field(None, description="Answer in the prompt's language.")
    length: R.LengthReward | None = Field(None, description="Penalty outside a length range (characters).")
    format: R.FormatReward | None = Field(None, description="Template checks: pattern, ending, stopping by itself.")

    @model_validator(mode="after")
    def _some(self) -> "Rewards":
        if not self.enabled():
            raise ValueError(f"no reward configured; name at least one of {', '.join(type(self).model_fields)}")
        return self

    def enabled(self) -> dict[str, R.RewardParams]:
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}


class Rollouts(Config):
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the GRPO group).")
    max_completion_length: int = Field(512, ge=1, description="Longest completion in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="Who generates: transformers, or vLLM (CUDA; TRL's integration). auto: vLLM on CUDA "
        "where it is installed, else transformers.")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: vLLM shares the training GPUs in this process; server: a separate "
        "`trl vllm-serve` process at vllm_server.")
    vllm_server: str | None = Field(None, description="Base URL of the vLLM server (server mode).")
    vllm_gpu_memory: float = Field(0.3, gt=0, lt=1, description="GPU memory fraction vLLM may take (colocate mode).")


def _rl_train_defaults() -> setup.TrainParams:
    return setup.TrainParams(max_steps=500, lr=1e-5, batch_size=8, grad_accum=1, warmup_steps=0, weight_decay=0.0,
                             schedule="constant", eval_steps=None, save_steps=50, logging_steps=1, adam_beta2=0.999)


RLTrain = setup.stage_train(_rl_train_defaults)


class RLConfig(Config):
    model: str = Field(description="Starting model: a stage (base, sft, prefer), a model directory, hf:ID or Hub id.")
    data: str = Field(description="Prompts: a collect stage, a dataset directory, a file or a Hub id.")
    split: str = Field("train", description="Split to read.")
    prompt_field: str = Field("prompt", description="Column with plain-text prompts (else messages/conversations).")
    language_field: str = Field("language", description="Column with each prompt's language (detected when absent).")
    languages: list[str] = Field(default_factory=lambda: ["en", "ru", "zh"],
                                 description="Languages told apart when detecting one (ISO 639-1 codes).")
    rewards: Rewards = Field(description="Named rewards with weights, e.g. {judge: {model: judge}, language: "
                             "{weight: 0.5}}.")
    rollouts: Rollouts = Field(default_factory=Rollouts, description="Sampling of the completions.")
    beta: float = Field(0.04, ge=0, description="KL penalty to the starting model (0: no reference, no KL).")
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="What to train: full (all weights; lr at most 1e-5 unless train.lr is set), lora or qlora.")
    lora: LoraParams = Field(default_factory=LoraParams, description="Adapter settings for lora/qlora.")
    template: Literal[TemplateName, "tokenizer"] = Field("tokenizer", description="Chat template: the model's own (from sft) by default.")
    merge: bool = Field(True, description="Also save the adapter merged into the model.")
    train: RLTrain

    @model_validator(mode="after")
    def _groups(self) -> "RLConfig":
        per_step = self.train.batch_size * self.train.grad_accum
        if per_step % self.rollouts.num_generations:
            raise ValueError(f"train.batch_size × train.grad_accum ({per_step}) must be a multiple of "
                             f"rollouts.num_generations ({self.rollouts.num_generations}): every prompt's group of "
                             "completions is scored together")
        return self


CONFIG = RLConfig


def inputs(cfg: RLConfig) -> list[str]:
    judge = cfg.rewards.judge
    return [cfg.model, cfg.data] + ([judge.model] if judge else [])


# --- prompts ----------------------------------------------------------------------------------

def load_prompts(cfg: RLConfig, ref: str, need_language: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of {prompt (messages ending with the user's turn), language, reference columns}; a
    conversation that ends with an answer (collect's output) is cut back to its question."""
    ds = load_dataset_any(ref, cfg.split)
    columns = ds.column_names
    for name, reward in cfg.rewards.enabled().items():
        R.check_columns(name, reward, columns, ref)
    keep = sorted({c for reward in cfg.rewards.enabled().values() for c in reward.columns()})
    codes = tuple(sorted(set(cfg.languages)))
    if need_language:
        F.check_languages(list(codes))
    rows, bad = [], []
    for i, row in enumerate(ds):
        try:
            fmt = "prompt" if isinstance(row.get(cfg.prompt_field), str) else "auto"
            msgs = prompt_messages(row, fmt, prompt_field=cfg.prompt_field)
        except RowError as e:
            bad.append((i, str(e)))
            continue
        out: dict[str, Any] = {"prompt": msgs, **{c: None if row[c] is None else str(row[c]) for c in keep}}
        if need_language:
            given = row.get(cfg.language_field)
            out["language"] = (_language(given) if given else None) or F.detect(msgs[-1]["content"], codes)
        rows.append(out)
    if bad:
        print(f"{ref}: skipped {len(bad)} malformed rows (first: row {bad[0][0]}: {bad[0][1]})")
    if not rows:
        raise FabrikaError(f"rl.data: {ref} has no usable prompt ({len(bad)} rows malformed; first: "
                           f"{bad[0][1] if bad else 'the dataset is empty'})")
    langs = sorted({r["language"] or "?" for r in rows}) if need_language else []
    return rows, {"prompts": len(rows), "malformed": len(bad), "languages": langs}


def _language(value: Any) -> str | None:
    """A language column's value as an ISO code lingua knows; None (then detected) for anything else."""
    try:
        code = F.language_code(str(value))
        F.check_languages([code])
        return code
    except FabrikaError:
        return None


# --- generation backend -----------------------------------------------------------------------

def vllm_arguments(cfg: RLConfig) -> dict[str, Any]:
    """TRL's vLLM settings, or none for transformers' generate; vLLM is asked for only where it can run."""
    import importlib.util

    import torch

    r = cfg.rollouts
    has_vllm = importlib.util.find_spec("vllm") is not None
    if r.backend == "vllm":
        if not torch.cuda.is_available():
            raise FabrikaError("rl.rollouts.backend: vllm generation in training needs a CUDA GPU (TRL's integration); "
                               "use transformers on this machine")
        if not has_vllm:
            raise FabrikaError("rl.rollouts.backend: vllm is not installed (pip install vllm), or use transformers")
    use = r.backend == "vllm" or (r.backend == "auto" and torch.cuda.is_available() and has_vllm)
    if not use:
        return {}
    if r.vllm_mode == "server" and not r.vllm_server:
        raise FabrikaError("rl.rollouts.vllm_server: server mode needs the URL of a running `trl vllm-serve`")
    return {"use_vllm": True, "vllm_mode": r.vllm_mode, "vllm_server_base_url": r.vllm_server,
            "vllm_gpu_memory_utilization": r.vllm_gpu_memory}


# --- the stage --------------------------------------------------------------------------------

def estimate(cfg: RLConfig, ctx: RunContext) -> dict[str, Any]:
    p, r = cfg.train, cfg.rollouts
    completions = (p.max_steps or 0) * p.batch_size * p.grad_accum * ranks.world_size()
    out: dict[str, Any] = {"method": cfg.method, "rewards": "+".join(cfg.rewards.enabled()), "steps": p.max_steps,
                           "completions": completions, "generated_tokens_max": completions * r.max_completion_length}
    if n := plan.planned_params(cfg.model, ctx):
        out["_params"] = n  # for the stages downstream (export's time)
    if cfg.rewards.judge:  # every completion distinct: an upper bound; the cache absorbs repeats
        from fabrika.infer.costs import api_cost
        from fabrika.models.refs import api_model

        judge = cfg.rewards.judge
        out["judge_calls_max"] = completions
        # ~350 tokens of grading prompt and question around the answer, ~250 of judgment
        cost = api_cost(api_model(ctx.resolve_model(judge.model)), 350 + r.max_completion_length, 250, completions,
                        judge.client.prices)
        if cost.known:
            out["est_judge_usd_max"] = round(cost.usd, 2)
    return out


def _trainer_class():
    """GRPOTrainer whose prompt sampler is seeded per epoch. TRL's sampler draws each epoch's order
    from one generator that lives as long as the process, so a run resumed in a later epoch would see
    the first epoch's order again and train on other prompts than an uninterrupted run."""
    import torch
    from trl import GRPOTrainer
    from trl.trainer.utils import RepeatSampler

    class EpochSeededRepeatSampler(RepeatSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            if self.shuffle:
                self.generator = torch.Generator().manual_seed((self.seed or 0) + self.epoch)
            return super().__iter__()

    class Trainer(GRPOTrainer):
        def _get_train_sampler(self, dataset=None):
            sampler = super()._get_train_sampler(dataset)
            sampler.__class__ = EpochSeededRepeatSampler
            return sampler

    return Trainer


def run(cfg: RLConfig, ctx: RunContext) -> Artifact:
    import datasets
    from trl import GRPOConfig

    precision = setup.check_device(cfg.train)
    finetune.check_method(cfg.method, "rl")
    vllm = vllm_arguments(cfg)
    base = finetune.starting_model(cfg.model, ctx, "rl")
    tokenizer, eot, _ = finetune.load_tokenizer(base, cfg.template, "rl")
    enabled = cfg.rewards.enabled()
    need_language = "language" in enabled or "judge" in enabled
    source = ctx.resolve(cfg.data)
    rows, data_stats = load_prompts(cfg, source, need_language)

    eos_ids = stop_ids(tokenizer, eot)
    out = ctx.stage_dir
    codes = tuple(sorted(set(cfg.languages) | {r["language"] for r in rows if r.get("language")}))
    funcs: list[Any] = []
    judge = None
    for name, reward in enabled.items():
        if name == "judge":
            judge = Judge(reward, ctx.generator_ref(reward.model), out)
            funcs.append(judge)
        else:
            funcs.append(R.trl_function(name, R.rule_scorer(name, reward, codes), set(eos_ids)))

    r = cfg.rollouts
    params = finetune.training_params(cfg.train, cfg.method, setup.set_by_user(cfg, "train", "lr"))
    chosen = finetune.choices(params.lr, cfg.method, precision, ctx.quiet)
    args = setup.trainer_arguments(  # before the model: see trainer_arguments
        params, out, precision, ctx.seed, cls=GRPOConfig, evaluate=False,
        num_generations=r.num_generations, max_completion_length=r.max_completion_length, temperature=r.temperature,
        top_p=r.top_p, beta=cfg.beta, reward_weights=[rw.weight for rw in enabled.values()], **vllm)
    model = finetune.load_model(base, tokenizer, cfg.method, cfg.lora, params, precision, ctx.seed, "rl")
    model.generation_config.eos_token_id = eos_ids  # completions end where chat answers end
    trainer = _trainer_class()(model=model, reward_funcs=funcs, args=args, processing_class=tokenizer,
                               train_dataset=datasets.Dataset.from_list(rows),
                               callbacks=setup.make_callbacks(out, params, model.config, r.max_completion_length,
                                                              frozen_weights=cfg.method != "full"))
    setup.quiet_trainer(trainer, ctx.quiet)
    resume = setup.resume_point(out)
    with judge or nullcontext():  # a local judge is served, and the judge's journal open, while training runs
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    metrics = {"train_loss": result.training_loss, "steps": result.global_step, **data_stats, **chosen,
               **summarise(list(read_jsonl(out / setup.METRICS)), list(enabled)), **setup.run_metrics(trainer, out)}
    if judge is not None:
        metrics.update({f"judge_{k}": v for k, v in sorted(judge.stats.items())})
    final = finetune.save_final(trainer, cfg.method, cfg.merge, out, base, tokenizer, eot, ctx.quiet)
    if ranks.is_main_process():
        atomic_write_json(out / "data_stats.json", data_stats)
    return setup.finish(ctx, cfg, final, cfg.train.keep_checkpoints, metrics,
                        extra={"base": base, "eot": eot, "rewards": {n: rw.weight for n, rw in enabled.items()}})


def summarise(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Reward (total and per component) over the first and the last quarter of the logged steps, the
    last KL and the mean completion length: how far the run moved, in a few numbers."""
    logged = [r for r in rows if "reward" in r]
    if not logged:
        return {}
    k = max(1, len(logged) // 4)
    out: dict[str, Any] = {}
    for key, label in [("reward", "reward"), *((f"rewards/{n}/mean", f"reward_{n}") for n in names)]:
        vals = [r[key] for r in logged if isinstance(r.get(key), (int, float))]
        if vals:
            out[f"{label}_first"] = sum(vals[:k]) / len(vals[:k])
            out[f"{label}_last"] = sum(vals[-k:]) / len(vals[-k:])
    kl = [r["kl"] for r in logged if isinstance(r.get("kl"), (int, float))]
    if kl:
        out["kl"] = kl[-1]
    lengths = [r["completions/mean_length"] for r in rows if isinstance(r.get("completions/mean_length"), (int, float))]
    if lengths:
        out["completion_length"] = sum(lengths) / len(lengths)
    return out
