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
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from fabrika import logs, ranks
from fabrika.artifacts import Artifact, RunContext, atomic_write_json, read_jsonl
from fabrika.config import Config
from fabrika.data.formats import convert_rows
from fabrika.data.sources import iter_rows
from fabrika.errors import FabrikaError
from fabrika.models import plan
from fabrika.models.model_dir import (ADAPTER_DIR, MODEL_DIR, check_model, merge_adapter, model_path,
                                      save_generation_contract)
from fabrika.models.templates import get_template
from fabrika.train import lm_head, setup

class DataSource(Config):
    path: str = Field(description="A collect stage, a dataset directory, a data file or a Hub id.")
    weight: float = Field(1.0, gt=0, description="Fraction of this source's rows used (above 1 repeats rows).")
    split: str = Field("train", description="Split to read from a Hub or saved dataset.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "chatml", "text"] = Field(
        "auto", description="Row format; auto detects it from the columns.")


class LoraParams(Config):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target: str | list[str] = Field("all-linear", description="Module names to adapt, or all-linear.")


def _sft_train_defaults() -> setup.TrainParams:
    # A proven recipe for ~3k conversations: 3 epochs, lr 2e-4 with LoRA, effective batch 8.
    return setup.TrainParams(epochs=3, lr=2e-4, batch_size=2, grad_accum=4, warmup_steps=10, weight_decay=0.0,
                             schedule="cosine", min_lr_ratio=0.0, eval_steps=50, save_steps=100, adam_beta2=0.999)


class SFTConfig(Config):
    model: str = Field(description="Base model: a stage name, hf:ID, a model directory or Hub id.")
    data: str | list[DataSource] = Field(description="Chat data: a stage, dataset dir, file or Hub id; or a weighted list of sources.")
    template: str = Field("chatml", description="chatml, llama3, mistral, or tokenizer (the model's own).")
    method: Literal["full", "lora", "qlora"] = Field("lora", description="What to train: full (all weights), lora (an adapter) or qlora (an adapter on a 4-bit base).")
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
    train: setup.TrainParams = Field(default_factory=_sft_train_defaults, description="Optimisation settings.")

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


def apply_template(tokenizer, model, name: str, need_generation_marker: bool) -> tuple[str, int]:
    """Install the chat template on the tokenizer, adding the tokens it needs (the embeddings are
    resized by the caller). Returns the end-of-turn token and how many tokens were added."""
    added = 0
    if name == "tokenizer":
        template = tokenizer.chat_template
        if not template:
            raise FabrikaError("sft.template: the model's tokenizer has no chat template; choose chatml, llama3 or mistral")
        eot = tokenizer.eos_token
    else:
        spec = get_template(name)
        missing = [t for t in spec.special_tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            added = tokenizer.add_special_tokens({"additional_special_tokens": missing})
        template = spec.jinja
        eot = spec.end_of_turn or tokenizer.eos_token
    if need_generation_marker and "{% generation %}" not in template.replace("{%- generation %}", "{% generation %}"):
        raise FabrikaError(f"sft.template: the {name} template has no {{% generation %}} marker, so assistant "
                           "tokens cannot be found; use chatml/llama3/mistral or set assistant_only_loss: false")
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return eot, added


def split_by_length(convs: list[list[dict]], tokenizer, max_length: int, overlong: str):
    lengths = [len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in convs]
    too_long = sum(n > max_length for n in lengths)
    if overlong == "drop":
        convs = [c for c, n in zip(convs, lengths) if n <= max_length]
        lengths = [n for n in lengths if n <= max_length]
    if not convs:
        raise FabrikaError(f"sft: every conversation is longer than max_length={max_length}; raise it")
    return convs, {"overlong": too_long, "overlong_action": overlong, "tokens": sum(min(n, max_length) for n in lengths)}


# --- model ------------------------------------------------------------------------------------

def _check_method(cfg: SFTConfig, key: str = "sft.method") -> None:
    import torch

    if cfg.method == "qlora":
        if not torch.cuda.is_available():
            raise FabrikaError(f"{key}: qlora needs a CUDA GPU (bitsandbytes 4-bit training is not reliable on "
                               "CPU); use method: lora on this machine")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise FabrikaError(f"{key}: qlora needs bitsandbytes (pip install bitsandbytes)") from None


def load_base(path: str, cfg: SFTConfig, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": setup.attention(cfg.train, precision, fine_tuning=True)}
    if precision == "bf16":
        kwargs["dtype"] = torch.bfloat16
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(  # bf16 storage: FSDP can shard the 4-bit weights
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
        kwargs["dtype"] = torch.bfloat16
        if torch.cuda.is_available():  # 4-bit weights load straight onto this rank's GPU, not all onto GPU 0
            kwargs["device_map"] = {"": ranks.local_rank()}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise FabrikaError(f"sft.model: cannot load {path!r}: {e}") from None


def lora_config(cfg: SFTConfig, model, new_token_ids: list[int]):
    """peft settings; unknown target modules are named together with the ones the model has."""
    from peft import LoraConfig

    linear = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                     if type(mod).__name__ in ("Linear", "Linear4bit", "Conv1D") and "lm_head" not in name})
    target = cfg.lora.target
    if target != "all-linear":
        targets = [target] if isinstance(target, str) else target
        unknown = [t for t in targets if t not in linear]
        if unknown:
            raise FabrikaError(f"sft.lora.target: {', '.join(unknown)} not in this model; its linear modules: "
                               f"{', '.join(linear)}")
    extra: dict[str, Any] = {}
    if new_token_ids:  # new template tokens need trainable embeddings, not only adapters
        emb = model.get_input_embeddings()
        names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is emb or m is model.get_output_embeddings()]
        extra["modules_to_save"] = sorted(set(names))
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=target, task_type="CAUSAL_LM", **extra)


def save_final(trainer, method: str, merge: bool, out: Path, base: str, tokenizer, eot: str, quiet: bool) -> Path:
    """The final model or adapter, saved by every rank: under FSDP and ZeRO-3 gathering the weights is
    a collective, so a rank that returned before it would leave rank 0 waiting for the NCCL timeout at
    the very end of a run. `Trainer.save_model` gathers on all ranks and writes on rank 0; the rank-0
    work that follows (tokenizer, generation contract, merge) ends at a barrier the ranks leave together."""
    final = out / (MODEL_DIR if method == "full" else ADAPTER_DIR)
    if trainer.is_fsdp_enabled:  # checkpoints were sharded; the final model must load with from_pretrained
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final))
    if not quiet:
        print(f"rank {ranks.rank()} of {ranks.world_size()}: final {'model' if method == 'full' else 'adapter'} saved",
              flush=True)
    if ranks.is_main_process():
        tokenizer.save_pretrained(final)
        save_generation_contract(final, tokenizer, eot)
        if method != "full" and merge:
            merge_adapter(base, final, out / MODEL_DIR, tokenizer, eot)
    trainer.accelerator.wait_for_everyone()
    return out / MODEL_DIR if method != "full" and merge else final


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
                           "tokens_per_step": p.batch_size * p.grad_accum * ranks.world_size() * cfg.max_length}
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
    _check_method(cfg)
    if cfg.method == "qlora" and "gradient_checkpointing" not in cfg.train.model_fields_set:
        # QLoRA is chosen to fit a small GPU: activations of 8B at 2k tokens would not, without recomputing
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": True})})
    base = check_model(model_path(ctx.resolve_model(ctx.resolve(cfg.model))), "sft.model")
    convs, data_stats = load_conversations(cfg, ctx, ctx.seed)

    import datasets  # after the checks: a wrong setting or a bad row is reported without waiting for these
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig as TRLConfig, SFTTrainer

    set_seed(ctx.seed)  # adapters are initialised before the Trainer seeds anything: a rerun must match
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as e:
        raise FabrikaError(f"sft.model: cannot load the tokenizer of {base!r}: {e}") from None
    before = len(tokenizer)
    eot, added = apply_template(tokenizer, None, cfg.template, cfg.assistant_only_loss)
    convs, length_stats = split_by_length(convs, tokenizer, cfg.max_length, cfg.overlong)

    model = load_base(base, cfg, precision)
    new_ids = list(range(before, len(tokenizer))) if added else []
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
        if not new_ids:  # frozen, yet upcast to fp32 above: +2 GB for Llama-3-8B's embeddings and LM head
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                layer.to(torch.bfloat16)
    if cfg.method in ("lora", "qlora"):
        model = get_peft_model(model, lora_config(cfg, model, new_ids))

    ds = datasets.Dataset.from_dict({"messages": convs})
    eval_ds = None
    if cfg.eval_fraction and len(ds) >= 20:
        parts = ds.train_test_split(test_size=cfg.eval_fraction, seed=ctx.seed)
        ds, eval_ds = parts["train"], parts["test"]

    out = ctx.stage_dir
    batching = batching_mode(cfg, precision)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * ranks.world_size() * cfg.max_length
    args = setup.trainer_arguments(
        cfg.train, out, precision, ctx.seed, cls=TRLConfig,
        max_length=cfg.max_length, packing=batching == "packed", assistant_only_loss=cfg.assistant_only_loss,
        eos_token=eot, neftune_noise_alpha=cfg.neftune_alpha,  # the pad token: the tokenizer's own
        dataset_num_proc=None, train_sampling_strategy="group_by_length" if batching == "grouped" else "random",
        **({} if eval_ds is not None else {"eval_strategy": "no"}))
    trainer = _trainer_class(SFTTrainer, batching, ctx.seed)(
        model=model, args=args, train_dataset=ds, eval_dataset=eval_ds, processing_class=tokenizer,
                         callbacks=setup.make_callbacks(out, tokens_per_step,
                                                        plan.flops_per_token(model.config, cfg.max_length,
                                                                              frozen_weights=cfg.method != "full"),
                                                        setup.peak_flops(cfg.train)))
    compact = lm_head.use_compact_head(trainer.model.get_base_model() if cfg.method != "full" else trainer.model,
                                       trainer.args.device)
    setup.quiet_trainer(trainer, ctx.quiet)
    resume = setup.resume_point(out)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    metrics: dict[str, Any] = {"train_loss": result.training_loss, "steps": result.global_step,
                               "conversations": len(ds), **length_stats, "world_size": ranks.world_size(),
                               "batching": batching, "loss_head": "labelled positions" if compact else "trl"}
    if eval_ds is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50))
    speeds = [r["tokens_per_s"] for r in read_jsonl(out / setup.METRICS) if "tokens_per_s" in r]
    if speeds:
        metrics["tokens_per_s"] = sum(speeds) / len(speeds)
    final = save_final(trainer, cfg.method, cfg.merge, out, base, tokenizer, eot, ctx.quiet)
    if not ranks.is_main_process():
        return Artifact(stage=ctx.stage, kind=ctx.kind, dir=out, path=out, fingerprint=ctx.fingerprint)
    atomic_write_json(out / "data_stats.json", {**data_stats, **length_stats})
    if not cfg.train.keep_checkpoints:
        shutil.rmtree(out / setup.CHECKPOINTS, ignore_errors=True)
    return ctx.finish(final, cfg, metrics=metrics, extra={"base": base, "template": cfg.template, "eot": eot})
