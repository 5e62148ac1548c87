"""Importance matrix for llama.cpp's quantizer, computed from the Hugging Face model.

llama.cpp's `llama-imatrix` runs the model over calibration text and keeps, for every weight matrix,
the mean square of each input column's activation; the quantizer then spends its precision where
those activations are large. The same statistics come from forward hooks on the HF model's linear
layers (the activations are the same model's, up to float rounding), and llama.cpp takes them
in-process as a NULL-terminated array of `llama_model_imatrix_data`. MoE expert weights are fused
3-D parameters in transformers, not linear layers: they are quantized without importance data, as
llama.cpp does for tensors its imatrix file lacks.

The model runs in bf16 on the GPU when there is one (fp32 on CPU otherwise); the statistics are
summed in fp32 either way. Whether it fits is checked before it is loaded.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from fabrika.errors import FabrikaError
from fabrika.models.reference import (Part, Placement, check_fits, load_reference, model_parts, model_size,
                                     reference_placement)

CONTEXT = 512  # tokens per forward pass, as llama-imatrix's default context

ADVICE = ("Quantize without an importance matrix (leave imatrix unset), or run the export on a machine with a GPU "
          "(the model then runs there in bf16) or more free RAM.")


def imatrix_parts(params: int, vocab: int, context: int, placement: Placement) -> list[Part]:
    """The model and one window's logits, which the forward pass makes though nothing reads them."""
    return model_parts(params, placement, context * vocab, copies=1)


def check_imatrix_fits(size: tuple[int, int, int | None], context: int, placement: Placement) -> None:
    """Fail before loading when the model of `size` (`model_size`) would not fit in the memory free now."""
    params, vocab, _ = size
    check_fits("export importance matrix", imatrix_parts(params, vocab, context, placement), ADVICE)


def compute(model_dir: Path, text: str, gguf_names: dict[str, str], context: int = CONTEXT,
            max_tokens: int = 8192) -> dict[str, np.ndarray]:
    """{gguf tensor name: mean x² per input column} over up to `max_tokens` tokens of `text`.
    `gguf_names` maps HF weight names (`model.layers.0.mlp.up_proj.weight`) to GGUF ones."""
    import torch
    from transformers import AutoTokenizer

    placement = reference_placement()
    check_imatrix_fits(model_size(model_dir), context, placement)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_reference(model_dir, placement)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens].to(model.device)
    if len(ids) < 16:
        raise FabrikaError("export.imatrix: the calibration text gives fewer than 16 tokens")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        target = gguf_names.get(f"{module_name}.weight")
        if target is None or not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            continue  # embeddings are row lookups, not matmuls: llama.cpp keeps no statistics for them

        def hook(_module, inputs, name=target):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, len(ids), context):
                model(ids[start:start + context].unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).cpu().numpy().astype(np.float32) for name in sums}


class CArray:
    """The imatrix as llama.cpp's quantizer takes it; keeps the buffers alive while it is used."""

    def __init__(self, imatrix: dict[str, np.ndarray]) -> None:
        import llama_cpp

        self.names = [name.encode() for name in imatrix]
        self.data = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
        entries = (llama_cpp.llama_model_imatrix_data * (len(self.data) + 1))()
        for i, (name, values) in enumerate(zip(self.names, self.data)):
            entries[i].name = name
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(self.data)].name = None  # terminator
        self.entries = entries

    def pointer(self) -> Any:
        import llama_cpp

        return ctypes.cast(self.entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
