"""Supervised fine-tuning on chat data: full weights, LoRA or QLoRA, through TRL's SFTTrainer.

    fabrika sft --model hf:meta-llama/Meta-Llama-3-8B --data runs/x/collect --method qlora --out runs/x/sft
    fabrika sft --config sft.yaml --out DIR --set train.epochs=1

or as the `sft` stage of a pipeline. Data in ShareGPT, OpenAI messages, ChatML text or Alpaca form
(several sources may be mixed with weights) is converted to one message schema, rendered with one
chat template, and trained with the loss on assistant tokens only and packed sequences by default.
The template and its end-of-turn token are saved with the model, so every later tool formats
prompts as training did and stops where the model learned to stop.
"""

from __future__ import annotations

import math
import random
from typing import Any, Literal

from pydantic import Field, field_validator

from fabrika import logs, ranks
from fabrika.artifacts import Artifact, RunContext, atomic_write_json
from fabrika.config import Config
from fabrika.data.formats import convert_rows
from fabrika.data.sources import iter_rows
from fabrika.errors import FabrikaError
from fabrika.models.templates import TemplateName
from fabrika.models import plan
from fabrika.train import finetune, lm_head, setup
from fabrika.train.finetune import LoraParams


class DataSource(Config):
    path: str = Field(description="A collect stage, a dataset directory, a data file or a Hub id.")
    weight: float = Field(1.0, gt=0, description="Fraction of this source's rows used (above 1 repeats rows).")
    split: str = Field("train", description="Split to read from a Hub or saved dataset.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "chatml", "text"] = Field(
        "auto", description="Row format; auto detects it from the columns.")


def _sft_train_defaults() -> setup.TrainParams:
    # A proven recipe for ~3k conversations: 3 epochs, lr 2e-4 with LoRA, effective batch 8.
    return setup.TrainParams(epochs=3, lr=2e-4, batch_size=2, grad_accum=4, warmup_steps=10, weight_decay=0.0,
                             schedule="cosine", min_lr_ratio=0.0, eval_steps=50, save_steps=100, adam_beta2=0.999)


SFTTrain = setup.stage_train(_sft_train_defaults)


class SFTConfig(Config):
    model: str = Field(description="Base model: a stage name, hf:ID, a model directory or Hub id.")
    data: str | list[DataSource] = Field(description="Chat data: a stage, dataset dir, file or Hub id; or a weighted list of sources.")
    template: Literal[TemplateName, "tokenizer"] = Field("chatml", description="chatml, llama3, mistral, or tokenizer (the model's own).")
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="What to train: full (all weights, in fp32 with bf16 autocast; lr at most 1e-5 unless "
        "train.lr is set), lora (an adapter) or qlora (an adapter on a 4-bit base).")
    lora: LoraParams = Field(default_factory=LoraParams, description="Adapter settings for lora/qlora.")
    max_length: int = Field(2048, ge=16, description="Tokens per training sequence (packed).")
    batching: Literal["auto", "packed", "grouped", "padded"] = Field(
        "auto", description="packed: padding-free packing (fast with flash attention on CUDA); grouped: batches of "
        "similar length, padded (fastest with SDPA, e.g. on CPU); padded: random batches; auto picks for the machine.")
    assistant_only_loss: bool = Field(True, description="Loss on the assistant's tokens only.")
    overlong: Literal["truncate", "drop"] = Field("drop", description="What to do with conversations over max_length.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Held-out fraction for eval loss.")
    neftune_alpha: float | None = Field(None, gt=0, description="NEFTune embedding noise (e.g. 5).")
    merge: bool = Field(True, description="Also save the adapter merged into the base model.")
    train: SFTTrain

    @field_validator("data")
    @classmethod
    def _sources(cls, v):
        return v if isinstance(v, list) else [DataSource(path=v)]


CONFIG = SFTConfig


def inputs(cfg: SFTConfig) -> list[str]:
    return [cfg.model] + [s.path for s in cfg.data]


# --- data -------------------------------------------------------------------------------------

def load_conversations(cfg: SFTConfig, ctx: RunContext, seed: int) -> tuple[list[list[dict]], dict[str, Any]]:
    """Every source converted and mixed by weight; bad rows counted with the first few shown."""
    rng = random.Random(seed)
    mixed, stats = [], {"sources": {}}
    for src in cfg.data:
        ref = ctx.resolve(src.path)
        good, bad = convert_rows(iter_rows(ref, src.split), src.format)
        if bad:
            shown = "; ".join(f"row {i}: {why}" for i, why in bad[:3])
            logs.say(f"{ref}: skipped {len(bad)} malformed rows ({shown})")
        if not good:
            raise FabrikaError(f"sft.data: {ref} has no usable conversation ({len(bad)} rows malformed; first: "
                               f"{f'row {bad[0][0]}: {bad[0][1]}' if bad else 'the dataset is empty'})")
        whole, frac = int(src.weight), src.weight - int(src.weight)
        picked = good * whole + rng.sample(good, round(len(good) * frac))
        stats["sources"][src.path] = {"rows": len(good), "malformed": len(bad), "used": len(picked)}
        mixed += picked
    rng.shuffle(mixed)
    return mixed, stats


def split_by_length(convs: list[list[dict]], tokenizer, max_length: int, overlong: str):
    lengths = [len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in convs]
    too_long = sum(n > max_length for n in lengths)
    if overlong == "drop":
        convs = [c for c, n in zip(convs, lengths) if n <= max_length]
        lengths = [n for n in lengths if n <= max_length]
    if not convs:
        raise FabrikaError(f"sft: every conversation is longer than max_length={max_length}; raise it")
    return convs, {"overlong": too_long, "overlong_action": overlong, "tokens": sum(min(n, max_length) for n in lengths)}


# --- the stage --------------------------------------------------------------------------------

TOKENS_PER_EXAMPLE = 800  # a distilled chat example (Tagengo-like: ~200 prompt + ~600 answer tokens)


def _trainer_class(base: type, batching: str, seed: int) -> type:
    """For `grouped` batching: transformers' length-grouped sampler draws from the global RNG, so a
    resumed run would see other batches than an uninterrupted one; this one is seeded per epoch."""
    if batching != "grouped":
        return base
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            self.generator = torch.Generator().manual_seed(seed + self.epoch)
            return super().__iter__()

    class GroupedTrainer(base):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                sampler.__class__ = SeededLengthGroupedSampler
            return sampler

    return GroupedTrainer


def batching_mode(cfg: SFTConfig, precision: str) -> str:
    """Packing without padding pays off only where attention takes packed sequences natively (flash
    attention's varlen kernels on CUDA); with SDPA the packed batch becomes one long masked sequence,
    and batches of similar length waste less. Measured in bench/sft_throughput.py."""
    if cfg.batching != "auto":
        return cfg.batching
    return "packed" if setup.attention(cfg.train, precision, fine_tuning=True) == "flash_attention_2" else "grouped"


def estimate(cfg: SFTConfig, ctx: RunContext) -> dict[str, Any]:
    """Training tokens and H100 hours before anything is downloaded: rows from an upstream collect
    stage's plan, parameters from the model's name when its config is not local."""
    p = cfg.train
    out: dict[str, Any] = {"method": cfg.method, "epochs": p.epochs,
                           "tokens_per_step": setup.tokens_per_step(p, cfg.max_length)}
    sources = [cfg.data] if isinstance(cfg.data, str) else [d.path for d in cfg.data]
    rows = sum(ctx.estimates.get(src, {}).get("_rows", 0) for src in sources)
    if p.max_steps:
        tokens = p.max_steps * out["tokens_per_step"]
    else:
        tokens = rows * TOKENS_PER_EXAMPLE * p.epochs if rows else None
    n = plan.planned_params(cfg.model, ctx)
    if n:
        out["_params"] = n  # for the stages downstream (export's time)
    if tokens:
        out["train_tokens"] = int(tokens)
    if tokens and n:
        per_token = 4 * n if cfg.method != "full" else 6 * n  # adapters: no weight gradients for the base
        mfu = 0.25 if cfg.method == "qlora" else 0.4  # NF4 weights are dequantised on every matmul
        out["h100_hours"] = round(plan.gpu_hours(per_token * tokens, mfu=mfu), 2)
    return out


def run(cfg: SFTConfig, ctx: RunContext) -> Artifact:
    precision = setup.check_device(cfg.train)
    finetune.check_method(cfg.method, "sft")
    if cfg.method == "qlora" and "gradient_checkpointing" not in cfg.train.model_fields_set:
        # QLoRA is chosen to fit a small GPU: activations of 8B at 2k tokens would not, without recomputing
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": True})})
    base = finetune.starting_model(cfg.model, ctx, "sft")
    convs, data_stats = load_conversations(cfg, ctx, ctx.seed)

    import datasets  # after the checks: a wrong setting or a bad row is reported without waiting for these
    from trl import SFTConfig as TRLConfig, SFTTrainer

    tokenizer, eot, new_ids = finetune.load_tokenizer(base, cfg.template, "sft", cfg.assistant_only_loss)
    convs, length_stats = split_by_length(convs, tokenizer, cfg.max_length, cfg.overlong)
    ds, eval_ds = setup.split_eval(datasets.Dataset.from_dict({"messages": convs}), cfg.eval_fraction, ctx.seed)

    out = ctx.stage_dir
    batching = batching_mode(cfg, precision)
    params = finetune.training_params(cfg.train, cfg.method, setup.set_by_user(cfg, "train", "lr"))
    chosen = finetune.choices(params.lr, cfg.method, precision, ctx.quiet)
    args = setup.trainer_arguments(  # before the model: see trainer_arguments
        params, out, precision, ctx.seed, cls=TRLConfig, evaluate=eval_ds is not None,
        max_length=cfg.max_length, packing=batching == "packed", assistant_only_loss=cfg.assistant_only_loss,
        eos_token=eot, neftune_noise_alpha=cfg.neftune_alpha,  # the pad token: the tokenizer's own
        dataset_num_proc=None, train_sampling_strategy="group_by_length" if batching == "grouped" else "random")
    model = finetune.load_model(base, tokenizer, cfg.method, cfg.lora, params, precision, ctx.seed, "sft", new_ids)
    trainer = _trainer_class(SFTTrainer, batching, ctx.seed)(
        model=model, args=args, train_dataset=ds, eval_dataset=eval_ds, processing_class=tokenizer,
        callbacks=setup.make_callbacks(out, params, model.config, cfg.max_length, frozen_weights=cfg.method != "full"))
    compact = lm_head.use_compact_head(trainer.model.get_base_model() if cfg.method != "full" else trainer.model,
                                       trainer.args.device)
    setup.quiet_trainer(trainer, ctx.quiet)
    resume = setup.resume_point(out)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    metrics: dict[str, Any] = {"train_loss": result.training_loss, "steps": result.global_step,
                               "conversations": len(ds), **length_stats, "batching": batching,
                               "loss_head": "labelled positions" if compact else "trl",
                               **chosen}
    if eval_ds is not None:
        metrics["eval_loss"] = setup.final_evaluation(trainer, result.global_step)["eval_loss"]
        metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50))
    metrics.update(setup.run_metrics(trainer, out))
    final = finetune.save_final(trainer, cfg.method, cfg.merge, out, base, tokenizer, eot, ctx.quiet)
    if ranks.is_main_process():
        atomic_write_json(out / "data_stats.json", {**data_stats, **length_stats})
    return setup.finish(ctx, cfg, final, cfg.train.keep_checkpoints, metrics,
                        extra={"base": base, "template": cfg.template, "eot": eot})
