"""The CPU loss head scores labelled positions only, and must give what TRL's chunked kernel gives:
the same loss, per-token log-probs, entropy, top-1 flags and gradients, through PEFT as well."""

from __future__ import annotations

import pytest

from fabrika.train.lm_head import use_compact_head


def _pair(chat_model, lora: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    models = []
    for compact in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(chat_model)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        inner = model.get_base_model() if lora else model
        add_fused_lm_head(inner, outputs=("log_probs", "entropy", "is_top1"))
        if compact:
            assert use_compact_head(inner, torch.device("cpu"))
        models.append(model)
    return models


@pytest.mark.parametrize("lora", [False, True])
def test_compact_head_matches_trl_kernel(chat_model, lora):
    import torch

    trl_model, compact_model = _pair(chat_model, lora)
    torch.manual_seed(1)
    ids = torch.randint(0, 400, (3, 24))
    mask = torch.ones_like(ids)
    mask[2, 18:] = 0
    labels = ids.clone()
    labels[:, :8] = -100  # the prompt
    labels[2, 18:] = -100  # padding
    rows = []
    compact_model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    outputs = []
    for model in (trl_model, compact_model):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        outputs.append(out)
    a, b = outputs
    assert rows == [int((labels[:, 1:] != -100).sum())]  # the head saw the labelled positions only
    assert torch.allclose(a.loss, b.loss, atol=1e-5)
    for field in ("log_probs", "entropy"):
        assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-4)
    assert torch.equal(a.is_top1, b.is_top1) and torch.equal(a.label_mask, b.label_mask)
    grads = {n: p.grad for n, p in trl_model.named_parameters() if p.requires_grad}
    for name, p in compact_model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[name], atol=1e-5), name
    # generation and plain calls keep the model's own forward
    assert compact_model(input_ids=ids).logits.shape == (3, 24, compact_model.config.vocab_size)


def test_unpatched_models_and_scaled_logits_are_left_alone(chat_model):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(chat_model)
    assert not use_compact_head(model, torch.device("cpu"))  # no head of TRL's to replace
    add_fused_lm_head(model)
    model.config.final_logit_softcapping = 30.0
    assert not use_compact_head(model, torch.device("cpu"))
