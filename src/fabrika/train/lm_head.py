"""The SFT loss head on devices without Triton (CPU).

TRL replaces the model's LM head by a chunked log-prob kernel that never builds the full logits. On
CUDA (with Triton) it scores only the positions that carry a label; elsewhere it scores every position (prompt and
padding included, so that tile shapes stay fixed for compilers) in tiles folded by many small torch
ops, and recomputes the projection in backward. On a CPU that kernel was 76 % of an SFT step on the
bench model. Here the head runs once over the labelled positions only, with one log-softmax, which
is what the plain Trainer does minus the positions it throws away (bench/sft_throughput.py).
"""

from __future__ import annotations

from typing import Any

# Output scalings TRL's kernel applies and this head does not: such models keep TRL's kernel.
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")


def use_compact_head(model: Any, device: Any) -> bool:
    """Wrap the forward TRL installed so that its `fused_lm_head=True` calls score labelled positions
    only, when training runs on `device` and TRL would score every position there. Returns whether
    the wrap was applied."""
    import functools
    import types

    try:
        from trl.kernels.chunked_logprob import _use_triton
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:  # a TRL without the fused head computes the loss from full logits anyway
        return False
    if _use_triton(device):  # TRL's kernel already skips unlabelled positions there
        return False
    if "forward" not in vars(model):  # TRL did not install its head: nothing asks for fused_lm_head
        return False
    config = model.config.get_text_config()
    if any(getattr(config, name, None) is not None for name in _SCALED_LOGITS):
        return False
    trl_forward = model.forward

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or kwargs.get("shift_labels") is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        import torch

        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(hidden.device)
        mask = targets != -100
        wanted = targets[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float()
        log_softmax = logits.log_softmax(-1)
        picked = log_softmax.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
            top1 = logits.argmax(-1) == wanted
        # zero where there is no label, like TRL's outputs; masked_scatter keeps an all-masked batch differentiable
        log_probs = picked.new_zeros(mask.shape).masked_scatter(mask, picked)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / denominator, log_probs=log_probs, label_mask=mask,
            entropy=entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
            is_top1=top1.new_zeros(mask.shape).masked_scatter(mask, top1))

    model.forward = types.MethodType(forward, model)
    return True
