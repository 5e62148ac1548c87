"""Pretrain a Llama/Mistral/Mixtral/Qwen2/GPT-2-style model from scratch on token shards.

    fabrika pretrain --data runs/x/prepare --arch llama --size tiny --out runs/x/pretrain
    torchrun --nproc_per_node 2 -m fabrika.cli pretrain --config pretrain.yaml --out DIR      # DDP
    accelerate launch --config_file $(fabrika accelerate-config fsdp) -m fabrika.cli pretrain ...

or as the `pretrain` stage of a pipeline. Reads the shards written by `prepare`, packs them into
fixed-length sequences (documents are already separated by EOS) and trains through the Hugging Face
Trainer, so precision, accumulation, checkpointing, DDP/FSDP/DeepSpeed come from accelerate. A killed
run resumes exactly from its last checkpoint: model, optimizer, scheduler, RNG and data position.
The model is saved with its tokenizer, so `AutoModelForCausalLM.from_pretrained` loads it anywhere, and
`AutoTokenizer.from_pretrained` on the model directory gives the very tokenization the shards were
prepared with: checked before the first step (a mismatch would waste the whole run) and after saving.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from fabrika.artifacts import Artifact, RunContext
from fabrika.config import Config
from fabrika.errors import FabrikaError
from fabrika.models import plan
from fabrika.models.model_dir import MODEL_DIR
from fabrika.models.presets import ModelSpec
from fabrika.models.tokenizer import check_loads_back
from fabrika.train import setup

class PretrainConfig(Config):
    data: str = Field("prepare", description="The prepare stage (or a prepared directory) to train on.")
    tokenizer: str | None = Field(None, description="Tokenizer dir or stage; default: the one saved with the data.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Architecture and size (presets) with overrides.")
    init_from: str | None = Field(None, description="Continue from this HF model (dir or Hub id) instead of random weights.")
    seq_len: int = Field(512, ge=8, description="Tokens per packed training sequence.")
    train: setup.TrainParams = Field(default_factory=setup.TrainParams, description="Optimisation settings.")


CONFIG = PretrainConfig


def inputs(cfg: PretrainConfig) -> list[str]:
    return [r for r in (cfg.data, cfg.tokenizer, cfg.init_from) if r]


class PackedTokens:
    """Fixed-length windows over the concatenated shards, read from memmaps on demand, so a corpus
    larger than memory trains without loading it."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, limit: int | None = None) -> None:
        self.shards = [s for s in shards if len(s)]
        self.seq_len = seq_len
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        n = int(self.offsets[-1]) // seq_len
        self.n = min(n, limit) if limit else n

    def __len__(self) -> int:
        return self.n

    def tokens(self, start: int, length: int) -> np.ndarray:
        out = []
        while length > 0:
            i = int(np.searchsorted(self.offsets, start, side="right")) - 1
            local = start - int(self.offsets[i])
            take = min(length, len(self.shards[i]) - local)
            out.append(np.asarray(self.shards[i][local:local + take], dtype=np.int64))
            start, length = start + take, length - take
        return np.concatenate(out)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        import torch

        if idx < 0 or idx >= self.n:
            raise IndexError(idx)
        ids = torch.from_numpy(self.tokens(idx * self.seq_len, self.seq_len))
        return {"input_ids": ids, "labels": ids.clone()}


def _data_dir(cfg: PretrainConfig, ctx: RunContext) -> Path:
    path = Path(ctx.resolve(cfg.data))
    if not (path / "index.json").exists():
        raise FabrikaError(f"pretrain.data: {path} is not a prepared dataset (no index.json); "
                           "run the prepare stage first, or point data at its output")
    return path


def _load_data(cfg: PretrainConfig, data_dir: Path, index: dict):
    from fabrika.data.corpus import open_split

    if not index.get("complete"):
        raise FabrikaError(f"pretrain.data: {data_dir} was not prepared to the end; run prepare again to finish it")
    train = PackedTokens(open_split(data_dir, "train"), cfg.seq_len)
    if len(train) == 0:
        raise FabrikaError(f"pretrain.data: {data_dir} holds fewer than seq_len={cfg.seq_len} training tokens")
    val = PackedTokens(open_split(data_dir, "val"), cfg.seq_len, limit=cfg.train.eval_samples)
    return train, val


def _tokenizer_path(cfg: PretrainConfig, ctx: RunContext, data_dir: Path, index: dict) -> str:
    if cfg.tokenizer:
        return ctx.resolve(cfg.tokenizer)
    return str(data_dir / index.get("tokenizer", "tokenizer"))


def _model_config(cfg: PretrainConfig, ctx: RunContext, tokenizer):
    """The model's config, read (init_from) or built before the data or the weights load, so that a
    setting it contradicts (seq_len past its positions, a tokenizer larger than its vocabulary) is
    named first, not taken for too little data or met after minutes of loading."""
    if cfg.init_from:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(ctx.resolve(cfg.init_from))
    else:
        hf_config = cfg.model.to_hf_config(vocab_size=len(tokenizer))
        hf_config.bos_token_id = tokenizer.bos_token_id
        hf_config.eos_token_id = tokenizer.eos_token_id
        hf_config.pad_token_id = tokenizer.pad_token_id
    positions = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if positions and cfg.seq_len > positions:
        raise FabrikaError(f"pretrain.seq_len: {cfg.seq_len} exceeds the model's {positions} positions "
                           f"(max_position_embeddings); lower seq_len or raise model.overrides.max_position_embeddings")
    if len(tokenizer) > hf_config.vocab_size:
        raise FabrikaError(f"pretrain: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                           f"{hf_config.vocab_size}")
    check_loads_back(tokenizer, hf_config, "pretrain.model.arch")
    return hf_config


def _build_model(cfg: PretrainConfig, ctx: RunContext, hf_config, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    attention = setup.attention(cfg.train, precision)
    if cfg.init_from:
        dtype = torch.bfloat16 if setup.weights_dtype("full", precision) == "bf16" else torch.float32
        return AutoModelForCausalLM.from_pretrained(ctx.resolve(cfg.init_from), attn_implementation=attention,
                                                    dtype=dtype)
    torch.manual_seed(ctx.seed)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention)


def estimate(cfg: PretrainConfig, ctx: RunContext) -> dict[str, Any]:
    """Tokens this run will train on and its FLOPs, without building the model's weights."""
    p = cfg.train
    tokens_per_step = setup.tokens_per_step(p, cfg.seq_len)
    out: dict[str, Any] = {"tokens_per_step": tokens_per_step}
    try:
        hf_config = cfg.model.to_hf_config(vocab_size=32000)
        fpt = plan.flops_per_token(hf_config, cfg.seq_len)
    except FabrikaError:
        fpt = None
    if p.max_steps:
        out["steps"] = p.max_steps
        out["train_tokens"] = p.max_steps * tokens_per_step
    if fpt and "train_tokens" in out:
        out["train_flops"] = float(fpt * out["train_tokens"])
        out["h100_hours"] = round(plan.gpu_hours(out["train_flops"]), 2)
    return out


def run(cfg: PretrainConfig, ctx: RunContext) -> Artifact:
    from transformers import AutoTokenizer, GenerationConfig, Trainer

    from fabrika.data.corpus import read_index

    precision = setup.check_device(cfg.train)
    data_dir = _data_dir(cfg, ctx)
    index = read_index(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_path(cfg, ctx, data_dir, index))
    hf_config = _model_config(cfg, ctx, tokenizer)
    train_ds, val_ds = _load_data(cfg, data_dir, index)

    out = ctx.stage_dir
    args = setup.trainer_arguments(cfg.train, out, precision, ctx.seed, evaluate=len(val_ds) > 0)  # see its docstring
    model = _build_model(cfg, ctx, hf_config, precision)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds if len(val_ds) else None,
                      callbacks=setup.make_callbacks(out, cfg.train, model.config, cfg.seq_len))

    setup.quiet_trainer(trainer, ctx.quiet)
    resume = setup.resume_point(out)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    metrics: dict[str, Any] = {"train_loss": result.training_loss, "steps": result.global_step,
                               "train_tokens": result.global_step * setup.tokens_per_step(cfg.train, cfg.seq_len),
                               "parameters": sum(p.numel() for p in model.parameters())}
    if len(val_ds):
        metrics["eval_loss"] = setup.final_evaluation(trainer, result.global_step)["eval_loss"]
        metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50))
    metrics.update(setup.run_metrics(trainer, out))

    model_dir = out / MODEL_DIR

    def on_main() -> None:
        tokenizer.save_pretrained(model_dir)
        check_loads_back(tokenizer, model.config, f"pretrain: {model_dir}", str(model_dir))
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(model_dir)

    setup.save_weights(trainer, model_dir, ctx.quiet, on_main)
    return setup.finish(ctx, cfg, model_dir, cfg.train.keep_checkpoints, metrics)
