"""What the fine-tuning stages (sft, prefer, rl) share: the starting model and its tokenizer with the
chat template installed, adapters (LoRA, QLoRA) on top, and the final save with its merge.

Each stage names its own settings in messages (`stage` below is "sft", "prefer" or "rl"), so a bad
value points at the key the user wrote, whichever stage it was in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from fabrika import ranks
from fabrika.config import Config
from fabrika.errors import FabrikaError
from fabrika.models.model_dir import (ADAPTER_DIR, MODEL_DIR, check_model, merge_adapter, model_path,
                                      save_generation_contract, saved_end_of_turn)
from fabrika.models.templates import TEMPLATES
from fabrika.train import setup


class LoraParams(Config):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target: str | list[str] = Field("all-linear", description="Module names to adapt, or all-linear.")


def starting_model(ref: str, ctx: Any, stage: str) -> str:
    """The model directory or Hub id a stage starts from (a stage name, `hf:`, a directory), checked."""
    return check_model(model_path(ctx.resolve_model(ctx.resolve(ref))), f"{stage}.model")


def check_method(method: str, stage: str) -> None:
    """Fail before loading anything when the method needs what this machine lacks."""
    import torch

    key = f"{stage}.method"
    if method == "qlora":
        if not torch.cuda.is_available():
            raise FabrikaError(f"{key}: qlora needs a CUDA GPU (bitsandbytes 4-bit training is not reliable on "
                               "CPU); use method: lora on this machine")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise FabrikaError(f"{key}: qlora needs bitsandbytes (pip install bitsandbytes)") from None


def apply_template(tokenizer, name: str, need_generation_marker: bool, stage: str = "sft") -> tuple[str, int]:
    """Install the chat template on the tokenizer, adding the tokens it needs (the embeddings are
    resized by the caller). Returns the end-of-turn token and how many tokens were added."""
    added = 0
    if name == "tokenizer":
        template = tokenizer.chat_template
        if not template:
            raise FabrikaError(f"{stage}.template: the model's tokenizer has no chat template; choose chatml, llama3 "
                               "or mistral")
        eot = tokenizer.eos_token
    else:
        spec = TEMPLATES[name]
        missing = [t for t in spec.special_tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            added = tokenizer.add_special_tokens({"additional_special_tokens": missing})
        template = spec.jinja
        eot = spec.end_of_turn or tokenizer.eos_token
    if need_generation_marker and "{% generation %}" not in template.replace("{%- generation %}", "{% generation %}"):
        raise FabrikaError(f"{stage}.template: the {name} template has no {{% generation %}} marker, so assistant "
                           "tokens cannot be found; use chatml/llama3/mistral or set assistant_only_loss: false")
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return eot, added


def load_tokenizer(base: str, template: str, stage: str, need_generation_marker: bool = False):
    """The starting model's tokenizer with the chat template installed: (tokenizer, end-of-turn token,
    ids of the tokens the template added)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as e:
        raise FabrikaError(f"{stage}.model: cannot load the tokenizer of {base!r}: {e}") from None
    before = len(tokenizer)
    eot, added = apply_template(tokenizer, template, need_generation_marker, stage)
    if template == "tokenizer":
        eot = saved_end_of_turn(base, tokenizer)
    return tokenizer, eot, list(range(before, len(tokenizer))) if added else []


FULL_LR = 1e-5  # the usual peak for full fine-tuning of 1-70B models; LoRA's adapters take ~10x more


def training_params(params: setup.TrainParams, method: str, lr_given: bool) -> setup.TrainParams:
    """The optimisation settings a method trains with. A stage's default learning rate is chosen for
    LoRA (sft: 2e-4), where a few million fresh adapter weights move; updating every weight of the
    model at that rate wrecks it, so full fine-tuning takes at most FULL_LR unless the user set one
    (`lr_given`), which is always kept."""
    if method != "full" or lr_given or params.lr <= FULL_LR:
        return params
    return params.model_copy(update={"lr": FULL_LR})


def choices(lr: float, method: str, precision: str, quiet: bool) -> dict[str, Any]:
    """The learning rate and the weights' dtype the method trains with (training_params,
    setup.weights_dtype): said once by rank 0 (run.log in a pipeline) and kept in the metrics."""
    made = {"lr": lr, "weights_dtype": setup.weights_dtype(method, precision), "precision": precision}
    if not quiet and ranks.is_main_process():
        print(f"{method} training: learning rate {lr:g}, weights loaded in {made['weights_dtype']}, "
              f"{precision} compute", flush=True)
    return made


def load_base(path: str, method: str, params: setup.TrainParams, precision: str, stage: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "auto": "auto"}[setup.weights_dtype(method, precision)]
    kwargs: dict[str, Any] = {"attn_implementation": setup.attention(params, precision, fine_tuning=True),
                              "dtype": dtype}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(  # bf16 storage: FSDP can shard the 4-bit weights
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
        if torch.cuda.is_available():  # 4-bit weights load straight onto this rank's GPU, not all onto GPU 0
            kwargs["device_map"] = {"": ranks.local_rank()}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise FabrikaError(f"{stage}.model: cannot load {path!r}: {e}") from None


def lora_config(lora: LoraParams, model, new_token_ids: list[int], stage: str):
    """peft settings; unknown target modules are named together with the ones the model has."""
    from peft import LoraConfig

    linear = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                     if type(mod).__name__ in ("Linear", "Linear4bit", "Conv1D") and "lm_head" not in name})
    target = lora.target
    if target != "all-linear":
        targets = [target] if isinstance(target, str) else target
        unknown = [t for t in targets if t not in linear]
        if unknown:
            raise FabrikaError(f"{stage}.lora.target: {', '.join(unknown)} not in this model; its linear modules: "
                               f"{', '.join(linear)}")
    extra: dict[str, Any] = {}
    if new_token_ids:  # new template tokens need trainable embeddings, not only adapters
        emb = model.get_input_embeddings()
        names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is emb or m is model.get_output_embeddings()]
        extra["modules_to_save"] = sorted(set(names))
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=target, task_type="CAUSAL_LM", **extra)


def load_model(base: str, tokenizer, method: str, lora: LoraParams, params: setup.TrainParams, precision: str,
               seed: int, stage: str, new_token_ids: Sequence[int] = ()):
    """The model to train: the base with embeddings for the template's new tokens, prepared for 4-bit
    training (qlora) and wrapped with fresh adapters (lora, qlora)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    set_seed(seed)  # adapters are initialised before the Trainer seeds anything: a rerun must match
    model = load_base(base, method, params, precision, stage)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
        if not new_token_ids:  # frozen, yet upcast to fp32 above: +2 GB for Llama-3-8B's embeddings and LM head
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                layer.to(torch.bfloat16)
    if method in ("lora", "qlora"):
        model = get_peft_model(model, lora_config(lora, model, list(new_token_ids), stage))
    return model


def save_final(trainer, method: str, merge: bool, out: Path, base: str, tokenizer, eot: str, quiet: bool) -> Path:
    """The final model or adapter (setup.save_weights), then on rank 0 its tokenizer, the generation
    contract and, for an adapter, the merged model. Returns what the stage hands on: the merged or
    fully trained model, else the adapter."""
    final = out / (MODEL_DIR if method == "full" else ADAPTER_DIR)

    def on_main() -> None:
        tokenizer.save_pretrained(final)
        save_generation_contract(final, tokenizer, eot)
        if method != "full" and merge:
            merge_adapter(base, final, out / MODEL_DIR, tokenizer, eot)

    setup.save_weights(trainer, final, quiet, on_main)
    return out / MODEL_DIR if method != "full" and merge else final
