"""Where a Hugging Face reference model runs, and whether it fits there before it is loaded.

Export verification, the importance matrix and HF perplexity hold a whole HF model, verification
next to a memory-mapped GGUF file. In fp32 on CPU an 8B model alone is 32 GB, and with its F16 GGUF
beside it about 50 GB: the kernel kills the process on a 24 GB machine, minutes into the work. So the
model goes onto the GPU in bf16 when there is one, and the memory a step needs is estimated from
the model's config (no weights read) and compared with what is free before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fabrika.errors import FabrikaError

GB = 1e9


@dataclass(frozen=True)
class Placement:
    """Device and dtype of a reference model."""

    device: str  # "cuda" or "cpu"
    dtype: str  # "bfloat16" or "float32", as torch and transformers name them

    @property
    def bytes_per_param(self) -> int:
        return {"bfloat16": 2, "float32": 4}[self.dtype]

    def as_dict(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype}


def reference_placement() -> Placement:
    """bf16 on the GPU when there is one: half of fp32's memory, where the forward passes are fast.
    fp32 on CPU otherwise, as before: bf16 matmuls on CPU are slower and only lose precision."""
    import torch

    return Placement("cuda", "bfloat16") if torch.cuda.is_available() else Placement("cpu", "float32")


def load_reference(model_dir: str | Path, placement: Placement):
    """The HF model in eval mode, loaded straight onto its device (shard by shard onto a GPU, never
    whole in host RAM first)."""
    from transformers import AutoModelForCausalLM

    device_map = placement.device if placement.device != "cpu" else None
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=placement.dtype, device_map=device_map).eval()


@dataclass(frozen=True)
class Part:
    """One thing a step holds: what it is, its bytes, and whether they are on the GPU or in host RAM."""

    what: str
    bytes: int
    gpu: bool = False


def model_parts(params: int, placement: Placement, logits: int, copies: int) -> list[Part]:
    """The model's weights where they run, and `copies` fp32 copies of one window's `logits` (window ×
    vocabulary values) on the host; on the GPU also that window's logits in the model's dtype and in
    fp32, as the forward pass leaves them before they are copied out."""
    on_gpu = placement.device == "cuda"
    parts = [Part(f"the HF model in {placement.dtype} on {placement.device}, {params / 1e9:.2f}B parameters",
                  params * placement.bytes_per_param, gpu=on_gpu)]
    if on_gpu:
        parts.append(Part("a window's logits on the GPU", logits * (placement.bytes_per_param + 4), gpu=True))
    parts.append(Part(f"a window's logits in fp32 ×{copies}", logits * 4 * copies))
    return parts


def shortfall(parts: list[Part], free_host: int, free_gpu: int | None) -> str | None:
    """None when `parts` fit in what is free; otherwise where memory is short, by how much, and why."""
    problems = []
    for where, on_gpu, free in (("GPU memory", True, free_gpu), ("RAM", False, free_host)):
        mine = [p for p in parts if p.gpu == on_gpu and p.bytes]
        need = sum(p.bytes for p in mine)
        if need and (free is None or need > free):
            detail = " + ".join(f"{p.what}: {p.bytes / GB:.1f} GB" for p in mine)
            problems.append(f"needs about {need / GB:.1f} GB of {where} ({detail}) but "
                            f"{'no GPU is available' if free is None else f'{free / GB:.1f} GB is free'}")
    return "; and ".join(problems) or None


def free_memory(gpu: bool) -> tuple[int, int | None]:
    """(available host RAM, free memory of the current GPU or None) in bytes, now."""
    import psutil

    host = psutil.virtual_memory().available
    if not gpu:
        return host, None
    import torch

    return host, torch.cuda.mem_get_info()[0]


def check_fits(step: str, parts: list[Part], advice: str) -> None:
    """Fail before loading anything when `parts` do not fit, instead of being killed half-way."""
    problem = shortfall(parts, *free_memory(any(p.gpu for p in parts)))
    if problem:
        raise FabrikaError(f"{step}: {problem}. {advice}")


def model_size(model_dir: str | Path) -> tuple[int, int, int | None]:
    """(parameters, vocabulary size, longest context or None) from the model's config alone."""
    from transformers import AutoConfig

    from fabrika.models.presets import count_parameters

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return count_parameters(config)["total"], text.vocab_size, positions
