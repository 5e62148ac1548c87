"""What a trained model directory holds, and the few things every tool does with one: find an
adapter's base model, check a model before transformers is asked, fold an adapter into its base, and
write the generation contract (stop where the model learned to stop).

A fine-tuning stage writes its result under MODEL_DIR (full weights, or an adapter merged into its
base) and, for adapters, ADAPTER_DIR; training, serving and export read these directories back the
same way through the functions here.
"""

from __future__ import annotations

import json
from pathlib import Path

from fabrika.errors import FabrikaError
from fabrika.models.checks import ADAPTER_CONFIG, check_model_dir, check_tokenizer_dir, hub_id_shaped, is_adapter_dir
from fabrika.models.refs import hf_target

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


def model_path(ref: str) -> str:
    """A model reference as transformers takes it: `hf:` dropped."""
    return hf_target(ref)


def adapter_base(ref: str | Path, setting: str) -> str | None:
    """The base model the adapter directory `ref` names, checked to be there (a directory, or a Hub
    id to download); None when `ref` is not an adapter. An adapter moved away from a base it names by
    a local path would otherwise fail deep inside transformers with a question about the Hub."""
    if not is_adapter_dir(ref):
        return None
    base = json.loads((Path(ref) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    if not (base and (Path(base).exists() or hub_id_shaped(base))):
        raise FabrikaError(f"{setting}: the adapter {ref} names base model {base!r}, which is not there")
    return base


def check_model(ref: str, setting: str) -> str:
    """A model directory or Hub id; an adapter directory must name a base model that can be found."""
    check_model_dir(ref, setting)
    if adapter_base(ref, setting) is None:
        check_tokenizer_dir(ref, setting)
    return ref


def stop_ids(tokenizer, eot: str) -> list[int]:
    """The ids generation stops at: the end-of-turn token, then the plain eos."""
    ids = []
    for tok in (eot, tokenizer.eos_token):
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def saved_end_of_turn(model: str, tokenizer) -> str:
    """The end-of-turn token of a model trained on its own chat template: the one its generation config
    stops at besides eos (what a fine-tune saved there, e.g. <|im_end|>), else the tokenizer's eos. A
    stage that keeps the model's template must end answers there too, and save the same contract;
    stopping at eos alone lets the next fine-tune's answers run on past the turn."""
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        return tokenizer.eos_token
    for i in [ids] if isinstance(ids, int) else (ids or []):
        if i != tokenizer.eos_token_id and i < len(tokenizer):
            return tokenizer.convert_ids_to_tokens(i)
    return tokenizer.eos_token


def save_generation_contract(model_dir: Path, tokenizer, eot: str) -> None:
    """generation_config stops at the end-of-turn token (and the plain eos) exactly as trained."""
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=stop_ids(tokenizer, eot), pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(model_dir)


def merge_adapter(base: str, adapter_dir: Path, out: Path, tokenizer, eot: str) -> None:
    """Merge on a fresh full-precision copy of the base: merging into 4-bit weights would lose precision."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if len(tokenizer) != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_generation_contract(out, tokenizer, eot)
