"""Preference tuning (DPO, IPO; ORPO and SimPO through TRL's experimental trainers) on
prompt/chosen/rejected data, starting from an `sft` output or any model.

    fabrika prefer --model runs/x/sft --data runs/x/collect_pairs --method lora --out runs/x/prefer

or as the `prefer` stage of a pipeline. It shares model loading, LoRA, the chat-template contract
and exact resume with `sft`; it differs in data (pairs) and loss. Rewards, margins and accuracy are
logged to metrics.jsonl.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from fabrika import ranks
from fabrika.artifacts import Artifact, RunContext
from fabrika.config import Config
from fabrika.data.formats import RowError, to_messages
from fabrika.data.sources import iter_rows
from fabrika.errors import FabrikaError
from fabrika.models import plan
from fabrika.models.model_dir import check_model, model_path
from fabrika.train import setup
from fabrika.train.sft import LoraParams, apply_template, load_base, lora_config, save_final


def _prefer_train_defaults() -> setup.TrainParams:
    return setup.TrainParams(epochs=1, lr=5e-6, batch_size=2, grad_accum=4, warmup_steps=10, weight_decay=0.0,
                             schedule="cosine", min_lr_ratio=0.0, eval_steps=50, save_steps=100, adam_beta2=0.999)


class PreferConfig(Config):
    model: str = Field(description="Starting model: an sft stage, a model directory, hf:ID or Hub id.")
    data: str = Field(description="Preference pairs (prompt/chosen/rejected): a stage, dataset dir, file or Hub id.")
    split: str = Field("train", description="Split to read.")
    loss: Literal["dpo", "ipo", "orpo", "simpo"] = Field("dpo", description="Preference objective: dpo, ipo, orpo or simpo.")
    beta: float = Field(0.1, gt=0, description="Strength of the preference (KL) term.")
    method: Literal["full", "lora"] = Field("lora", description="Train all weights (full) or a LoRA adapter (lora).")
    lora: LoraParams = Field(default_factory=LoraParams, description="Adapter settings.")
    template: str = Field("tokenizer", description="Chat template: the model's own (from sft) by default.")
    max_length: int = Field(1024, ge=16, description="Prompt + answer tokens kept.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Held-out fraction of pairs.")
    merge: bool = Field(True, description="Also save the adapter merged into the model.")
    train: setup.TrainParams = Field(default_factory=_prefer_train_defaults, description="Optimisation settings.")


CONFIG = PreferConfig


def inputs(cfg: PreferConfig) -> list[str]:
    return [cfg.model, cfg.data]


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return to_messages({"messages": value}, "messages")


def load_pairs(ref: str, split: str) -> tuple[list[dict], list[tuple[Any, str]]]:
    """Rows in TRL's conversational preference form; malformed rows come back with their reason."""
    pairs, bad = [], []
    for i, row in iter_rows(ref, split):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise FabrikaError(f"prefer.data: {ref} lacks column(s) {', '.join(missing)}; it has {', '.join(row)}")
        try:
            pair = {"prompt": _as_messages(row["prompt"], "user"),
                    "chosen": _as_messages(row["chosen"], "assistant"),
                    "rejected": _as_messages(row["rejected"], "assistant")}
        except RowError as e:
            bad.append((i, str(e)))
            continue
        if pair["chosen"] == pair["rejected"]:
            bad.append((i, "chosen and rejected are the same"))
            continue
        pairs.append(pair)
    return pairs, bad


def _trainer_classes(loss: str):
    if loss in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer, {"loss_type": ["sigmoid" if loss == "dpo" else "ipo"]}
    if loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer, {}
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOConfig, CPOTrainer, {"loss_type": "simpo", "cpo_alpha": 0.0}


def estimate(cfg: PreferConfig, ctx: RunContext) -> dict[str, Any]:
    out: dict[str, Any] = {"loss": cfg.loss, "method": cfg.method, "epochs": cfg.train.epochs}
    if n := plan.planned_params(cfg.model, ctx):
        out["_params"] = n  # for the stages downstream (export's time)
    return out


def run(cfg: PreferConfig, ctx: RunContext) -> Artifact:
    precision = setup.check_device(cfg.train)
    base = check_model(model_path(ctx.resolve_model(ctx.resolve(cfg.model))), "prefer.model")
    ref = ctx.resolve(cfg.data)
    pairs, bad = load_pairs(ref, cfg.split)
    if bad:
        print(f"{ref}: skipped {len(bad)} malformed pairs (first: row {bad[0][0]}: {bad[0][1]})")
    if not pairs:
        raise FabrikaError(f"prefer.data: {ref} has no usable preference pair")

    import datasets  # after the checks: a wrong setting or a bad row is reported without waiting for these
    from peft import get_peft_model
    from transformers import AutoTokenizer, set_seed

    set_seed(ctx.seed)  # adapters are initialised before the Trainer seeds anything: a rerun must match
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as e:
        raise FabrikaError(f"prefer.model: cannot load {base!r}: {e}") from None
    eot, _ = apply_template(tokenizer, None, cfg.template, need_generation_marker=False)

    model = load_base(base, cfg, precision)  # cfg.method is full or lora here: no quantization
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if cfg.method == "lora":
        model = get_peft_model(model, lora_config(cfg, model, []))

    ds = datasets.Dataset.from_list(pairs)
    eval_ds = None
    if cfg.eval_fraction and len(ds) >= 20:
        parts = ds.train_test_split(test_size=cfg.eval_fraction, seed=ctx.seed)
        ds, eval_ds = parts["train"], parts["test"]

    out = ctx.stage_dir
    config_cls, trainer_cls, loss_args = _trainer_classes(cfg.loss)
    args = setup.trainer_arguments(cfg.train, out, precision, ctx.seed, cls=config_cls, beta=cfg.beta,
                                   max_length=cfg.max_length, **loss_args,
                                   **({} if eval_ds is not None else {"eval_strategy": "no"}))
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * ranks.world_size() * cfg.max_length
    trainer = trainer_cls(model=model, args=args, train_dataset=ds, eval_dataset=eval_ds, processing_class=tokenizer,
                          callbacks=setup.make_callbacks(out, tokens_per_step, 0.0, None))
    setup.quiet_trainer(trainer, ctx.quiet)
    resume = setup.resume_point(out)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    metrics: dict[str, Any] = {"train_loss": result.training_loss, "steps": result.global_step, "pairs": len(ds),
                               "malformed": len(bad)}
    last = [r for r in trainer.state.log_history if any(k.startswith("rewards/") for k in r)]
    if last:
        metrics.update({k: v for k, v in last[-1].items() if k.startswith("rewards/")})
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics.update({k: v for k, v in ev.items() if k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")})
    final = save_final(trainer, cfg.method, cfg.merge, out, base, tokenizer, eot, ctx.quiet)
    if not ranks.is_main_process():
        return Artifact(stage=ctx.stage, kind=ctx.kind, dir=out, path=out, fingerprint=ctx.fingerprint)
    if not cfg.train.keep_checkpoints:
        shutil.rmtree(out / setup.CHECKPOINTS, ignore_errors=True)
    return ctx.finish(Path(final), cfg, metrics=metrics, extra={"base": base, "eot": eot, "loss": cfg.loss})
