"""What every training stage shares: the optimisation settings, precision and device checks, the
Trainer arguments, the evaluation split, metrics logging (loss, tokens/s, MFU to metrics.jsonl), exact
resume, the final save on every rank and the stage's ending.

Pretraining, SFT, preference tuning and RL differ in data, trainable parameters and loss; they build
their Trainer from the same pieces here so that a fix to resume, speed accounting or saving reaches
all of them. The fine-tuning stages' shared model loading is in finetune.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from fabrika.artifacts import Artifact, RunContext, atomic_write_text, read_jsonl
from fabrika.config import Config
from fabrika.errors import FabrikaError
from fabrika.faults import fault
from fabrika.models.plan import device_peak_tflops, flops_per_token
from fabrika.ranks import is_main_process, local_rank, rank, world_size

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"

class TrainParams(Config):
    max_steps: int | None = Field(None, description="Optimizer steps to run; overrides epochs when set.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (when max_steps is not set).")
    batch_size: int = Field(8, ge=1, description="Sequences per device per micro-step.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps accumulated into one optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate decay after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr × this ratio.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    adam_beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on a GPU that supports it, else fp32. fp16 needs CUDA.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="torch.compile the model (helps on GPUs, slow to start).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; flash_attention_2 needs CUDA and the flash-attn package. auto = "
        "flash_attention_2 for fine-tuning in bf16/fp16 on CUDA where flash-attn is installed, else sdpa.")
    liger_kernel: bool = Field(
        False, description="Liger's fused Triton kernels in place of the model's own: RMSNorm, RoPE, SwiGLU and fused "
        "linear cross-entropy (SFT keeps TRL's LM head, which already avoids full logits); CUDA only, needs the "
        "liger-kernel package.")
    logging_steps: int = Field(10, ge=1, description="Log loss, lr, tokens/s and MFU every N steps.")
    eval_steps: int | None = Field(100, ge=1, description="Evaluate on the validation split every N steps.")
    eval_samples: int = Field(256, ge=1, description="Validation sequences used per evaluation (at most).")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N steps (a killed run resumes from the last).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    keep_checkpoints: bool = Field(False, description="Keep checkpoints after a successful run.")
    report_to: list[Literal["wandb", "tensorboard"]] = Field(
        default_factory=list, description="Trackers besides metrics.jsonl (wandb works offline with WANDB_MODE=offline).")
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak TFLOP/s per device for MFU; known GPUs are detected, CPUs need it set.")
    dataloader_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    @model_validator(mode="after")
    def _check(self) -> "TrainParams":
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        return self


def sharding() -> str | None:
    """The strategy accelerate launched this process with to shard weights and optimizer state (FSDP,
    DeepSpeed); None on one device or under data parallel, where every rank holds everything."""
    for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(var, "").lower() in ("1", "true"):
            return name
    return None


def stage_train(defaults: Callable[[], TrainParams]) -> Any:
    """The type of a stage's `train:` field when the stage has defaults of its own (sft's lr 2e-4, ...):
    a section given in part (`train: {max_steps: 20}`) changes only the keys it names and keeps the
    stage's other defaults, not TrainParams' generic ones. What the user wrote stays marked as written
    (set_by_user), so a default may still be adapted to the method and a given value never is."""

    def over_defaults(given: Any) -> Any:
        if not isinstance(given, dict):
            return given
        try:
            params = TrainParams.model_validate({**defaults().model_dump(), **given})
        except ValidationError:  # handed back as written: pydantic names each bad setting under `train.`
            return given
        return TrainParams.model_construct(_fields_set=set(given), **dict(params))

    return Annotated[TrainParams, BeforeValidator(over_defaults),
                     Field(default_factory=defaults, description="Optimisation settings.")]


def set_by_user(cfg: Config, *path: str) -> bool:
    """Whether the user wrote this setting (`set_by_user(cfg, "train", "lr")`), rather than it coming
    from a default: a default may then be chosen to suit other settings, a value given never is."""
    node: Any = cfg
    for name in path:
        if not isinstance(node, Config) or name not in node.model_fields_set:
            return False
        node = getattr(node, name)
    return True


def weights_dtype(method: str, precision: str) -> str:
    """The dtype the weights are loaded in: bf16, fp32, or auto (as saved). Frozen base weights (lora,
    qlora) are only read: bf16 when training in bf16, else as saved. Trained weights (full) must be
    fp32 on one device or under data parallel: in bf16, optimizer state and weights round away
    updates smaller than 1/256 of a weight (most of them, at full fine-tuning's learning rates), and
    the Trainer's bf16 is autocast around fp32 master weights. FSDP upcasts trained weights to fp32
    itself and DeepSpeed keeps fp32 master copies, so there they load in bf16, sparing host memory."""
    if method == "qlora" or (precision == "bf16" and (method != "full" or sharding())):
        return "bf16"
    return "fp32" if method == "full" else "auto"


def check_device(params: TrainParams) -> str:
    """Fail before loading anything when an option needs hardware this machine lacks."""
    import torch

    cuda = torch.cuda.is_available()
    if params.precision == "fp16" and not cuda:
        raise FabrikaError("train.precision: fp16 mixed precision needs a CUDA GPU; this machine has none "
                           "(use bf16 or fp32)")
    if params.attn_implementation == "flash_attention_2":
        if not cuda:
            raise FabrikaError("train.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on this machine")
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise FabrikaError("train.attn_implementation: flash_attention_2 needs the flash-attn package "
                               "(pip install flash-attn --no-build-isolation), or use sdpa") from None
    if params.liger_kernel:
        if not cuda:
            raise FabrikaError("train.liger_kernel: Liger's kernels are Triton kernels for CUDA GPUs; this machine has "
                               "none (set it to false)")
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            raise FabrikaError("train.liger_kernel: needs the liger-kernel package (pip install liger-kernel), "
                               "or set it to false") from None
    sharded = sharding()
    if sharded and not cuda:  # accelerate would start every process as an independent rank 0
        raise FabrikaError(f"{sharded} needs CUDA GPUs; on CPU launch data parallel instead (torchrun "
                           "--nproc_per_node N -m fabrika.cli ..., or the ddp accelerate config)")
    gpus = torch.cuda.device_count() if cuda else 0
    if gpus > 1 and "WORLD_SIZE" not in os.environ:  # transformers would wrap the model in nn.DataParallel
        raise FabrikaError(f"this machine has {gpus} GPUs and training was started as one process; launch one "
                           f"process per GPU (accelerate launch --num_processes {gpus} -m fabrika.cli ..., or torchrun "
                           f"--nproc_per_node {gpus} -m fabrika.cli ...), or train on one: CUDA_VISIBLE_DEVICES=0")
    if cuda and "LOCAL_RANK" in os.environ:  # each rank on its own GPU before anything is loaded (4-bit weights too)
        torch.cuda.set_device(local_rank())
    if params.precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return params.precision


def attention(params: TrainParams, precision: str, fine_tuning: bool = False) -> str:
    """`auto`: flash attention where fine-tuning can use it, because its variable-length kernels are what
    make padding-free packed batches pay (see sft.batching_mode); SDPA otherwise, which on CUDA already
    runs a flash kernel for the unpadded, fixed-length sequences of pretraining."""
    if params.attn_implementation != "auto":
        return params.attn_implementation
    import torch

    if fine_tuning and precision in ("bf16", "fp16") and torch.cuda.is_available() and flash_attention_loads():
        return "flash_attention_2"
    return "sdpa"


def flash_attention_loads() -> bool:
    """Whether flash-attn imports, not only whether its files are there: a build made for another torch
    or CUDA is found but fails to load (an undefined symbol), and then SDPA must be chosen."""
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def peak_flops(params: TrainParams) -> float | None:
    if params.peak_tflops:
        return params.peak_tflops * 1e12
    import torch

    if torch.cuda.is_available():
        tflops = device_peak_tflops(torch.cuda.get_device_name(0))
        return tflops * 1e12 if tflops else None
    return None


def tokens_per_step(params: TrainParams, seq_len: int) -> int:
    """Token slots one optimizer step fills over all ranks (an upper bound where batches are padded;
    the metrics use the trainers' own count of real tokens where they log one)."""
    return params.batch_size * params.grad_accum * world_size() * seq_len


def split_eval(ds, fraction: float, seed: int, minimum: int = 20):
    """(train, validation) from one dataset; no validation set when `fraction` is 0 or the data has
    fewer than `minimum` rows, too few to spare any."""
    if not fraction or len(ds) < minimum:
        return ds, None
    parts = ds.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def trainer_arguments(params: TrainParams, out_dir: Path, precision: str, seed: int, cls: Any = None,
                      evaluate: bool = True, **extra: Any):
    """TrainingArguments (or a subclass such as TRL's SFTConfig, via `cls`) from fabrika's settings;
    `evaluate`: whether the stage has a validation set to evaluate on every eval_steps.

    Build them BEFORE the model is loaded, and keep them alive while it loads: they are what tells
    `from_pretrained` that the weights are to be sharded, and without that every rank loads the whole
    model into host RAM first (8 ranks × 16 GB for an 8B model in bf16).
    - DeepSpeed: under `accelerate launch` with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED), creating
      the arguments creates accelerate's DeepSpeedPlugin, which registers transformers' HfDeepSpeedConfig
      through a weak reference. While that object lives, `is_deepspeed_zero3_enabled()` is true and
      `from_pretrained` builds the model inside `deepspeed.zero.Init`, each rank holding its shard only.
    - FSDP: `from_pretrained` loads the weights on local rank 0 alone and leaves the other ranks' on
      the meta device, to be broadcast when FSDP wraps the model (cpu_ram_efficient_loading), only when
      torch.distributed is already initialised and FSDP_CPU_RAM_EFFICIENT_LOADING is set. accelerate
      launch sets that variable from the config (fsdp.yaml sets it); creating the arguments starts the
      process group (their device setup creates accelerate's PartialState)."""
    import torch
    from transformers import TrainingArguments

    schedule = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[params.schedule]
    kwargs: dict[str, Any] = dict(
        output_dir=str(out_dir / CHECKPOINTS),
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        learning_rate=params.lr,
        lr_scheduler_type=schedule,
        lr_scheduler_kwargs={"min_lr_rate": params.min_lr_ratio} if params.schedule == "cosine" else {},
        warmup_steps=params.warmup_steps,
        weight_decay=params.weight_decay,
        adam_beta2=params.adam_beta2,
        max_grad_norm=params.max_grad_norm,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps or -1,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=params.gradient_checkpointing,
        torch_compile=params.compile,
        use_liger_kernel=params.liger_kernel,
        logging_steps=params.logging_steps,
        eval_strategy="steps" if params.eval_steps and evaluate else "no",
        eval_steps=params.eval_steps,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=params.save_total_limit,
        report_to=list(params.report_to) or "none",
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=params.dataloader_workers,
        disable_tqdm=False,
        remove_unused_columns=False,
    )
    if not torch.cuda.is_available() and world_size() > 1:
        kwargs["ddp_backend"] = "gloo"
    if "tensorboard" in params.report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out_dir / "tensorboard"))
    kwargs.update(extra)
    return (cls or TrainingArguments)(**kwargs)


def last_checkpoint(out_dir: Path) -> Path | None:
    ckpts = []
    for p in (out_dir / CHECKPOINTS).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "trainer_state.json").exists():
            ckpts.append((int(m.group(1)), p))
    return max(ckpts)[1] if ckpts else None


def quiet_trainer(trainer, quiet: bool):
    """No progress bar or printed log dicts when the stage runs quietly (metrics.jsonl still gets all)."""
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    return trainer


def resume_point(out_dir: Path) -> Path | None:
    """The checkpoint to resume from, with metrics.jsonl cut back to it; None starts afresh."""
    ckpt = last_checkpoint(out_dir)
    if ckpt is None:
        if is_main_process():
            (out_dir / METRICS).unlink(missing_ok=True)
        return None
    step = int(ckpt.name.split("-")[1])
    if is_main_process():
        truncate_metrics(out_dir, step)
        print(f"resuming from {ckpt} (step {step})", flush=True)
    return ckpt


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop rows logged after `step`: a resumed run logs those steps again."""
    path = out_dir / METRICS
    if path.exists():
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def make_callbacks(out_dir: Path, params: TrainParams, model_config: Any, seq_len: int, frozen_weights: bool = False):
    """Callbacks built on demand so that importing this module does not import transformers. Speed and
    MFU are counted the same way for every stage: `seq_len` tokens per sequence slot, FLOPs per token
    of `model_config` (4·N with `frozen_weights`: adapters), the device's peak where it is known."""
    from transformers import TrainerCallback

    from fabrika.logs import live

    step_tokens = tokens_per_step(params, seq_len)
    fpt = flops_per_token(model_config, seq_len, frozen_weights=frozen_weights)
    peak = peak_flops(params)

    class MetricsLogger(TrainerCallback):
        """Append every log to metrics.jsonl (on the main process) with tokens/s, MFU and perplexity.

        Speed is training speed: the time spent evaluating and writing checkpoints after a step is
        measured (from the step's end, or its log, to the evaluation's or the save's end) and left out
        of the interval it falls in, or a run that evaluates often would look slow."""

        def __init__(self) -> None:
            self.last_time: float | None = None
            self.last_step = 0
            self.last_tokens: float | None = None
            self.mark = 0.0  # when the last training work ended (a step, its log, an evaluation, a save)
            self.paused = 0.0  # evaluation and saving time inside the current interval

        def on_train_begin(self, args, state, control, **kw):
            self.last_time, self.last_step = time.perf_counter(), state.global_step
            self.mark, self.paused = self.last_time, 0.0

        def on_step_end(self, args, state, control, **kw):
            self.mark = time.perf_counter()

        def on_evaluate(self, args, state, control, **kw):
            self._pause()

        def on_save(self, args, state, control, **kw):
            self._pause()

        def _pause(self) -> None:
            now = time.perf_counter()
            self.paused += now - self.mark
            self.mark = now

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            row: dict[str, Any] = {"step": state.global_step, "time": time.time()}
            row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            if "loss" in logs and self.last_time is not None:
                now = time.perf_counter()
                steps = state.global_step - self.last_step
                if steps > 0:
                    # TRL counts the tokens really trained (no padding); packed pretraining fills every slot
                    if "num_tokens" in logs and self.last_tokens is not None:
                        tokens = logs["num_tokens"] - self.last_tokens
                    else:
                        tokens = steps * step_tokens
                    tps = tokens / max(now - self.last_time - self.paused, 1e-9)
                    row["tokens_per_s"] = tps
                    if peak:
                        row["mfu"] = tps * fpt / (peak * world_size())
                self.last_time, self.last_step = now, state.global_step
                self.last_tokens = logs.get("num_tokens")
                self.mark, self.paused = now, 0.0
            if "eval_loss" in logs:
                row["eval_ppl"] = math.exp(min(logs["eval_loss"], 50))
            with open(out_dir / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    class FaultInjection(TrainerCallback):
        """Test hook: FABRIKA_FAULT=kill_at_step=N makes the process SIGKILL itself after step N,
        the way an OOM killer or a preempted node would."""

        def __init__(self, step: int) -> None:
            self.step = step

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)

    class ProgressLine(TrainerCallback):
        """The stage's live line on a terminal (fabrika.logs): step/total with ETA, loss and tokens/s."""

        def on_train_begin(self, args, state, control, **kw):
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

            from fabrika.logs import progress

            self.bar = progress(BarColumn(), MofNCompleteColumn(), TextColumn("steps, left"),
                                     TimeRemainingColumn(), TextColumn("{task.fields[numbers]}"))
            self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step, numbers="")
            self.start, self.first_step, self.numbers = time.perf_counter(), state.global_step, {}
            self.bar.start()

        def on_step_end(self, args, state, control, **kw):
            steps = state.global_step - self.first_step
            if steps > 0:
                self.numbers["tok/s"] = f"{steps * step_tokens / (time.perf_counter() - self.start):,.0f}"
            self._show(state)

        def on_log(self, args, state, control, logs=None, **kw):
            for key, label in (("loss", "loss"), ("eval_loss", "eval loss")):
                if isinstance((logs or {}).get(key), (int, float)):
                    self.numbers[label] = f"{logs[key]:.3f}"
            self._show(state)

        def on_train_end(self, args, state, control, **kw):
            self.bar.stop()

        def _show(self, state) -> None:
            text = " · ".join(f"{k} {v}" for k, v in self.numbers.items())
            self.bar.update(self.task, completed=state.global_step, numbers=text)

    callbacks = [MetricsLogger()]
    if live() and is_main_process():
        callbacks.append(ProgressLine())
    if kill_at := fault("kill_at_step"):
        callbacks.append(FaultInjection(kill_at))
    return callbacks


def speed_metrics(out_dir: Path) -> dict[str, float]:
    """Mean tokens/s (and MFU where the device's peak is known) over the logged intervals."""
    rows = [r for r in read_jsonl(out_dir / METRICS) if "tokens_per_s" in r]
    out: dict[str, float] = {}
    if rows:
        out["tokens_per_s"] = sum(r["tokens_per_s"] for r in rows) / len(rows)
        mfu = [r["mfu"] for r in rows if "mfu" in r]
        if mfu:
            out["mfu"] = sum(mfu) / len(mfu)
    return out


def device_name(device) -> str:
    """cuda:3 for an accelerator; cpu for the processor, whose index (cpu:0 under data parallel) says
    nothing."""
    return "cpu" if device.type == "cpu" else str(device)


def run_metrics(trainer, out_dir: Path) -> dict[str, Any]:
    """What every training stage reports besides its losses: speed, MFU, the world size and where
    each rank trained ({rank: {local_rank, device}}), gathered from all ranks: a collective, so every
    rank calls it."""
    from accelerate.utils import gather_object

    mine = [{"rank": rank(), "local_rank": local_rank(), "device": device_name(trainer.args.device)}]
    placed = {str(d["rank"]): {"local_rank": d["local_rank"], "device": d["device"]} for d in gather_object(mine)}
    return {**speed_metrics(out_dir), "world_size": world_size(), "devices": placed}


def final_evaluation(trainer, step: int) -> dict[str, Any]:
    """The validation metrics of the final weights: the evaluation logged at the last step when there
    was one (the same weights), else a new one."""
    logged = [r for r in trainer.state.log_history if "eval_loss" in r]
    return logged[-1] if logged and logged[-1]["step"] == step else trainer.evaluate()


def save_weights(trainer, final: Path, quiet: bool, on_main: Callable[[], Any] | None = None) -> None:
    """The final weights, saved by every rank: under FSDP and ZeRO-3 gathering the weights is a
    collective, so a rank that returned before it would leave rank 0 waiting for the NCCL timeout at
    the very end of a run. `Trainer.save_model` gathers on all ranks and writes on rank 0; the rank-0
    work that follows (`on_main`: tokenizer, generation contract, merge) ends at a barrier the ranks
    leave together."""
    if trainer.is_fsdp_enabled:  # checkpoints were sharded; the final model must load with from_pretrained
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final))
    if not quiet:
        print(f"rank {rank()} of {world_size()} (local rank {local_rank()}, {device_name(trainer.args.device)}): "
              f"final {final.name} saved", flush=True)
    if is_main_process() and on_main is not None:
        on_main()
    trainer.accelerator.wait_for_everyone()


def finish(ctx: RunContext, cfg: Any, final: Path, keep_checkpoints: bool, metrics: dict[str, Any],
           extra: dict[str, Any] | None = None) -> Artifact:
    """The stage's ending: rank 0 drops the checkpoints (unless kept) and writes the manifest; the
    other ranks hand back the stage's directory without one."""
    if not is_main_process():
        return Artifact(stage=ctx.stage, kind=ctx.kind, dir=ctx.stage_dir, path=final, fingerprint=ctx.fingerprint)
    if not keep_checkpoints:
        shutil.rmtree(ctx.stage_dir / CHECKPOINTS, ignore_errors=True)
    return ctx.finish(final, cfg, metrics=metrics, extra=extra)
