"""Preference tuning (DPO, IPO; ORPO and SimPO through TRL's experimental trainers) on
prompt/chosen/rejected data, starting from an `sft` output or any model.

    fabrika prefer --model runs/x/sft --data runs/x/collect_pairs --method lora --out runs/x/prefer

or as the `prefer` stage of a pipeline. It shares model loading, LoRA, the chat-template contract
and exact resume with `sft`; it differs in data (pairs) and loss. Rewards, margins and accuracy are
logged to metrics.jsonl.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fabrika.artifacts import Artifact, RunContext
from fabrika.config import Config
from fabrika.data.formats import RowError, to_messages
from fabrika.data.sources import iter_rows
from fabrika.errors import FabrikaError
from fabrika.models.templates import TemplateName
from fabrika.models import plan
from fabrika.train import finetune, setup
from fabrika.train.finetune import LoraParams


def _prefer_train_defaults() -> setup.TrainParams:
    return setup.TrainParams(epochs=1, lr=5e-6, batch_size=2, grad_accum=4, warmup_steps=10, weight_decay=0.0,
                             schedule="cosine", min_lr_ratio=0.0, eval_steps=50, save_steps=100, adam_beta2=0.999)


PreferTrain = setup.stage_train(_prefer_train_defaults)


class PreferConfig(Config):
    model: str = Field(description="Starting model: an sft stage, a model directory, hf:ID or Hub id.")
    data: str = Field(description="Preference pairs (prompt/chosen/rejected): a stage, dataset dir, file or Hub id.")
    split: str = Field("train", description="Split to read.")
    loss: Literal["dpo", "ipo", "orpo", "simpo"] = Field("dpo", description="Preference objective: dpo, ipo, orpo or simpo.")
    beta: float = Field(0.1, gt=0, description="Strength of the preference (KL) term.")
    method: Literal["full", "lora"] = Field(
        "lora", description="Train all weights (full: lr at most 1e-5 unless train.lr is set; DPO/IPO reference "
        "log-probabilities computed once before training) or a LoRA adapter (lora).")
    lora: LoraParams = Field(default_factory=LoraParams, description="Adapter settings.")
    template: Literal[TemplateName, "tokenizer"] = Field("tokenizer", description="Chat template: the model's own (from sft) by default.")
    max_length: int = Field(1024, ge=16, description="Prompt + answer tokens kept.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Held-out fraction of pairs.")
    merge: bool = Field(True, description="Also save the adapter merged into the model.")
    train: PreferTrain


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


PRECOMPUTED, ADAPTER_OFF, NONE = "precomputed log-probs", "adapter disabled", "none"


def reference(loss: str, method: str) -> str:
    """Where DPO and IPO get the reference model's log-probabilities (ORPO and SimPO need none).
    With an adapter, from the same model with the adapter disabled. Fully fine-tuned, TRL would load
    a second full copy of the model and keep it on the device for the whole run, beside the trained
    weights, their gradients and Adam state (for 8B: 16 GB more in bf16, 32 GB in fp32). Instead the
    reference log-probabilities of every pair are computed once, before the first step, by the
    model as loaded (TRL's precompute_ref_log_probs): no second copy on one device, nor on each rank
    under data parallel or DeepSpeed (TRL passes the sharded model through its inference engine);
    under FSDP TRL loads the reference only for that pass and frees it. The cost is one forward pass
    over the pairs up front, no more than the reference's forwards during training would be. The
    pass runs when the trainer is built, before a checkpoint is restored, so a resumed run gets the
    same reference (TRL caches it by the data's and the model's hash)."""
    if loss not in ("dpo", "ipo"):
        return NONE
    return ADAPTER_OFF if method == "lora" else PRECOMPUTED


def estimate(cfg: PreferConfig, ctx: RunContext) -> dict[str, Any]:
    out: dict[str, Any] = {"loss": cfg.loss, "method": cfg.method, "epochs": cfg.train.epochs}
    if n := plan.planned_params(cfg.model, ctx):
        out["_params"] = n  # for the stages downstream (export's time)
    return out


def run(cfg: PreferConfig, ctx: RunContext) -> Artifact:
    precision = setup.check_device(cfg.train)
    base = finetune.starting_model(cfg.model, ctx, "prefer")
    ref = ctx.resolve(cfg.data)
    pairs, bad = load_pairs(ref, cfg.split)
    if bad:
        print(f"{ref}: skipped {len(bad)} malformed pairs (first: row {bad[0][0]}: {bad[0][1]})")
    if not pairs:
        raise FabrikaError(f"prefer.data: {ref} has no usable preference pair")

    import datasets  # after the checks: a wrong setting or a bad row is reported without waiting for these

    tokenizer, eot, _ = finetune.load_tokenizer(base, cfg.template, "prefer")
    ds, eval_ds = setup.split_eval(datasets.Dataset.from_list(pairs), cfg.eval_fraction, ctx.seed)

    out = ctx.stage_dir
    config_cls, trainer_cls, loss_args = _trainer_classes(cfg.loss)
    params = finetune.training_params(cfg.train, cfg.method, setup.set_by_user(cfg, "train", "lr"))
    chosen = {**finetune.choices(params.lr, cfg.method, precision, ctx.quiet),
              "reference": reference(cfg.loss, cfg.method)}
    args = setup.trainer_arguments(  # before the model: see trainer_arguments
        params, out, precision, ctx.seed, cls=config_cls, evaluate=eval_ds is not None, beta=cfg.beta,
        max_length=cfg.max_length, **loss_args,
        **({"precompute_ref_log_probs": True} if chosen["reference"] == PRECOMPUTED else {}))
    model = finetune.load_model(base, tokenizer, cfg.method, cfg.lora, params, precision, ctx.seed, "prefer")
    trainer = trainer_cls(model=model, args=args, train_dataset=ds, eval_dataset=eval_ds, processing_class=tokenizer,
                          callbacks=setup.make_callbacks(out, params, model.config, cfg.max_length,
                                                         frozen_weights=cfg.method != "full"))
    setup.quiet_trainer(trainer, ctx.quiet)
    resume = setup.resume_point(out)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    metrics: dict[str, Any] = {"train_loss": result.training_loss, "steps": result.global_step, "pairs": len(ds),
                               "malformed": len(bad), **chosen}
    last = [r for r in trainer.state.log_history if any(k.startswith("rewards/") for k in r)]
    if last:
        metrics.update({k: v for k, v in last[-1].items() if k.startswith("rewards/")})
    if eval_ds is not None:
        ev = setup.final_evaluation(trainer, result.global_step)
        metrics.update({k: v for k, v in ev.items() if k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")})
    metrics.update(setup.run_metrics(trainer, out))
    final = finetune.save_final(trainer, cfg.method, cfg.merge, out, base, tokenizer, eot, ctx.quiet)
    return setup.finish(ctx, cfg, final, cfg.train.keep_checkpoints, metrics,
                        extra={"base": base, "eot": eot, "loss": cfg.loss})
