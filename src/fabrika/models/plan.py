"""The compute plan: "8B parameters, 20 GB of text, rented H100s: how long, how much, and is that
enough data?" answered on one screen before any money is spent.

    fabrika plan --arch llama --size 8b --tokens 20e9 --gpu h100 --gpus 8
    fabrika plan --model meta-llama/Meta-Llama-3-8B --data-gb 20 --gpu a100-80gb --gpus 4 --json

Parameters are counted on the real Hugging Face model (built on the meta device); FLOPs, memory,
time and cost follow from stated assumptions, which are printed with the numbers.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from fabrika.errors import FabrikaError
from fabrika.models.checks import check_model_dir
from fabrika.models.presets import layer_linears



@dataclass(frozen=True)
class GPU:
    """An accelerator as the plan and MFU see it: dense bf16 peak TFLOP/s (vendor spec sheets, without
    sparsity), memory in GB, a typical rental price per GPU-hour (None: none typical; the plan then
    needs --price), and the text torch.cuda.get_device_name shows for it."""

    peak_tflops: float
    memory_gb: float
    usd_per_hour: float | None
    device_name: str


GPUS = {
    "h100": GPU(989.0, 80, 2.5, "H100"),
    "h100-pcie": GPU(756.0, 80, None, "H100 PCIe"),
    "h100-nvl": GPU(835.0, 94, None, "H100 NVL"),
    "h200": GPU(989.0, 141, 3.5, "H200"),
    "gh200": GPU(989.0, 96, None, "GH200"),
    "b200": GPU(2250.0, 180, None, "B200"),
    "b100": GPU(1750.0, 180, None, "B100"),
    "a100-80gb": GPU(312.0, 80, 1.6, "A100"),
    "a100-40gb": GPU(312.0, 40, 1.2, "A100"),
    "l40s": GPU(362.0, 48, 1.0, "L40S"),
    "a10g": GPU(125.0, 24, 0.75, "A10G"),
    "rtx4090": GPU(165.0, 24, 0.5, "4090"),
    "l4": GPU(121.0, 24, None, "L4"),
}
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022
NF4_BYTES = 0.5 + 0.127 / 8       # 4-bit weights + double-quantized absmax scales (≈4.127 bits)


def device_peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of the GPU `device_name` names (torch.cuda.get_device_name). The longest matching
    name wins, so that a PCIe or NVL card is not taken for the SXM part of the same name, nor a GH200
    for an H200, nor an L40S for an L4."""
    for gpu in sorted(GPUS.values(), key=lambda g: len(g.device_name), reverse=True):
        if gpu.device_name in device_name:
            return gpu.peak_tflops
    return None


def gpu_hours(flops: float, gpu: str = "h100", mfu: float = 0.4) -> float:
    """Wall-clock GPU hours for `flops` at a model FLOPs utilisation typical of tuned bf16 training."""
    return flops / (GPUS[gpu].peak_tflops * 1e12 * mfu) / 3600


def params_from_name(model: str) -> float | None:
    """Parameters of a Hub model guessed from its name (Meta-Llama-3-8B -> 8e9) when its config is not
    at hand (dry runs offline); None when the name says nothing."""
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model)
    return float(m.group(1)) * 1e9 if m else None


def planned_params(ref: str | None, ctx: Any) -> float | None:
    """Parameters of the model a stage will load, for a dry run: the upstream training stage's own
    estimate (`_params`) when `ref` names one, else a guess from the model's name."""
    if not ref:
        return None
    return ctx.estimates.get(ref, {}).get("_params") or params_from_name(ctx.resolve_model(ref))


def flops_per_token(config: Any, seq_len: int, frozen_weights: bool = False) -> float:
    """Training FLOPs per token: 6·N (matmul parameters, input embedding excluded) plus attention
    scores 12·L·H·Q·T (PaLM, appendix B). MoE models count only the experts a token visits. With
    `frozen_weights` (LoRA, QLoRA) the base weights get no gradients: 4·N (the forward's 2·N and the
    activations' gradients' 2·N); the adapters' own FLOPs are a rounding error."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    experts = getattr(config, "num_local_experts", None) or 1
    active = (getattr(config, "num_experts_per_tok", None) or 1) if experts > 1 else 1
    router = hidden * experts if experts > 1 else 0
    matmul = sum(i * o for i, o in layer_linears(config, experts=active))
    n = layers * (matmul + router) + hidden * config.vocab_size  # + lm_head
    return (4.0 if frozen_weights else 6.0) * n + 12.0 * layers * heads * head_dim * seq_len


@dataclass
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass
class Plan:
    model: str
    params: dict[str, int]
    seq_len: int
    micro_batch: int
    tokens: float
    tokens_source: str
    flops_per_token: float
    total_flops: float
    chinchilla_tokens: float
    data_verdict: str
    gpu: str
    gpus: int
    mfu: float
    price_per_gpu_hour: float
    hours: float
    gpu_hours: float
    cost: float
    gpu_memory_gb: float
    memory: dict[str, Memory] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def fits(self, method: str) -> bool:
        return self.memory[method].total / 1e9 <= self.gpu_memory_gb * 0.95

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"] = {k: {**asdict(m), "total": m.total, "fits": self.fits(k)} for k, m in self.memory.items()}
        return d


def _config(arch: str, size: str, model: str | None):
    """The HF config to plan: a model directory or its config.json, a Hub id, or a preset."""
    if model:
        from pathlib import Path

        from transformers import AutoConfig

        path = Path(model)
        if not path.is_file():
            check_model_dir(model, "--model")
        try:
            if path.is_file():
                from transformers import CONFIG_MAPPING

                settings = json.loads(path.read_text(encoding="utf-8"))
                kind = settings.pop("model_type", None)
                if kind not in CONFIG_MAPPING:
                    raise FabrikaError(f"--model: {model} has no known model_type ({kind!r}); "
                                       "expected a Hugging Face config.json")
                return CONFIG_MAPPING[kind](**settings), path.parent.name or model
            return AutoConfig.from_pretrained(model), model
        except (OSError, ValueError) as e:
            raise FabrikaError(f"--model: cannot read a Hugging Face config from {model!r} ({e})") from None
    from fabrika.models.presets import make_config

    return make_config(arch, size), f"{arch}-{size}"


def memory_estimates(config, params: dict[str, int], seq: int, batch: int, gpus: int, checkpointing: bool,
                     lora_r: int) -> dict[str, Memory]:
    n = params["total"]
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    per_layer_full = 34 * seq * batch * h  # bytes, bf16, flash/SDPA attention (no s² term)
    acts = (2 * seq * batch * h * layers + per_layer_full) if checkpointing else per_layer_full * layers
    acts += seq * batch * vocab * 4  # fp32 logits for the loss
    shard = gpus if gpus > 1 else 1
    lora = layers * sum(lora_r * (i + o) for i, o in layer_linears(config))
    linear = layers * sum(i * o for i, o in layer_linears(config))
    return {
        "full": Memory(weights=2 * n / shard, gradients=2 * n / shard, optimizer=12 * n / shard, activations=acts),
        "lora": Memory(weights=2 * n + 4 * lora, gradients=4 * lora, optimizer=8 * lora, activations=acts),
        "qlora": Memory(weights=NF4_BYTES * linear + 2 * (n - linear) + 4 * lora, gradients=4 * lora,
                        optimizer=8 * lora, activations=acts),
    }


def make_plan(arch: str = "llama", size: str = "8b", model: str | None = None, tokens: float | None = None,
              data_gb: float | None = None, bytes_per_token: float = 4.0, gpu: str = "h100", gpus: int = 1,
              mfu: float = 0.4, price_per_gpu_hour: float | None = None, seq_len: int | None = None,
              micro_batch: int = 1, grad_checkpointing: bool = True, lora_r: int = 16) -> Plan:
    from fabrika.models.presets import count_parameters

    if gpu not in GPUS:
        raise FabrikaError(f"--gpu: unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    price = GPUS[gpu].usd_per_hour if price_per_gpu_hour is None else price_per_gpu_hour
    if price is None:
        raise FabrikaError(f"--gpu {gpu}: no typical rental price is known for it; give one with --price")
    if gpus < 1 or micro_batch < 1 or not 0 < mfu <= 1 or bytes_per_token <= 0:
        raise FabrikaError("--gpus and --micro-batch must be at least 1, --mfu in (0, 1], --bytes-per-token > 0")
    if tokens is None and data_gb is None:
        raise FabrikaError("give the training data as --tokens (e.g. 20e9) or --data-gb (raw text)")
    if (tokens is not None and tokens <= 0) or (data_gb is not None and data_gb <= 0):
        raise FabrikaError("--tokens and --data-gb must be positive")
    config, name = _config(arch, size, model)
    params = count_parameters(config)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
    seq = seq_len or min(4096, positions)
    if tokens is None:
        tokens = data_gb * 1e9 / bytes_per_token
        source = f"{data_gb:g} GB of text at {bytes_per_token:g} bytes/token"
    else:
        source = "given"
    fpt = flops_per_token(config, seq)
    total = fpt * tokens
    peak, mem_gb = GPUS[gpu].peak_tflops, GPUS[gpu].memory_gb
    hours = total / (gpus * peak * 1e12 * mfu) / 3600
    optimal = CHINCHILLA_TOKENS_PER_PARAM * params.get("active", params["total"])
    ratio = tokens / optimal
    if ratio < 0.5:
        verdict = (f"not enough data for this size: {1 / ratio:.1f}× fewer tokens than Chinchilla-optimal; a model "
                   f"of ~{tokens / CHINCHILLA_TOKENS_PER_PARAM / 1e9:.2g}B parameters would use it fully")
    elif ratio <= 2:
        verdict = f"about Chinchilla-optimal ({ratio:.2f}× of 20 tokens/parameter)"
    else:
        verdict = (f"{ratio:.1f}× beyond Chinchilla-optimal: compute-inefficient to train but a better model "
                   "to serve (Llama-3-8B saw 15T tokens, ~94× its optimum)")
    plan = Plan(model=name, params=params, seq_len=seq, micro_batch=micro_batch, tokens=tokens, tokens_source=source,
                flops_per_token=fpt, total_flops=total, chinchilla_tokens=optimal, data_verdict=verdict, gpu=gpu,
                gpus=gpus, mfu=mfu, price_per_gpu_hour=price, hours=hours, gpu_hours=hours * gpus,
                cost=hours * gpus * price, gpu_memory_gb=mem_gb,
                memory=memory_estimates(config, params, seq, micro_batch, gpus, grad_checkpointing, lora_r))
    plan.assumptions = [
        "FLOPs/token = 6·N (N: matmul parameters, input embedding excluded; MoE: active experts only) "
        "+ 12·layers·heads·head_dim·seq for attention scores (PaLM, appendix B)",
        f"time = total FLOPs / ({gpus} × {peak:g} TFLOP/s dense bf16 × MFU {mfu:.0%})",
        f"cost at ${price:g} per GPU-hour",
        "Chinchilla-optimal data = 20 tokens per parameter (Hoffmann et al. 2022)",
        "full: bf16 weights and gradients, fp32 AdamW moments and master weights (16 bytes/parameter)"
        + (f", sharded over {gpus} GPUs (FSDP / ZeRO-3)" if gpus > 1 else ""),
        f"lora / qlora: rank {lora_r} on every linear projection (16 bytes per adapter parameter); qlora keeps "
        "the linear weights in NF4 with double quantization (≈4.13 bits), the rest in bf16",
        f"activations per GPU at micro-batch {micro_batch} × {seq} tokens, bf16, SDPA/flash attention; "
        + ("gradient checkpointing keeps each layer's input (2·s·b·h bytes) plus one layer's full activations "
           "(34·s·b·h)" if grad_checkpointing else "no checkpointing: 34·s·b·h bytes per layer")
        + "; plus fp32 logits (4·s·b·vocab)",
        "frameworks add 1–3 GB per GPU (CUDA context, allocator caches, communication buffers)",
    ]
    return plan


def _count(x: float) -> str:
    """Parameters and tokens the way model cards and papers write them: 8.03B, 15T, 125M."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _sci(x: float) -> str:
    """FLOPs in plain scientific notation (5.05e+22), as compute budgets are quoted."""
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def render_plan(plan: Plan, console) -> None:
    from rich.table import Table

    p = plan.params
    active = f", {_count(p['active'])} active per token" if "active" in p else ""
    console.print(f"[bold]{plan.model}[/]: {_count(p['total'])} parameters ({_count(p['non_embedding'])} without "
                  f"the input embedding{active}); {plan.gpus} × {plan.gpu}, sequence {plan.seq_len}")
    compute = Table(title="compute", show_header=False)
    compute.add_column(justify="left")
    compute.add_column(justify="right")
    for k, v in [("training tokens", f"{_count(plan.tokens)} ({plan.tokens_source})"),
                 ("FLOPs per token", _sci(plan.flops_per_token)),
                 ("total FLOPs", _sci(plan.total_flops)),
                 ("Chinchilla-optimal tokens", _count(plan.chinchilla_tokens)),
                 ("data", plan.data_verdict),
                 ("wall-clock", f"{plan.hours:,.1f} h ({plan.hours / 24:,.1f} days)"),
                 ("GPU-hours", f"{plan.gpu_hours:,.0f}"),
                 ("cost", f"${plan.cost:,.0f}")]:
        compute.add_row(k, v)
    console.print(compute)
    mem = Table(title=f"memory per GPU (GB; {plan.gpu} has {plan.gpu_memory_gb})")
    for col in ("method", "weights", "gradients", "optimizer", "activations", "total", "fits?"):
        mem.add_column(col, justify="right")
    for method, m in plan.memory.items():
        mem.add_row(method, *(f"{v / 1e9:.1f}" for v in (m.weights, m.gradients, m.optimizer, m.activations, m.total)),
                    "[green]yes[/]" if plan.fits(method) else "[red]no[/]")
    console.print(mem)
    console.print("[bold]assumptions[/]")
    for a in plan.assumptions:
        console.print(f"  • {a}")


def render_sizes(console) -> None:
    """Every preset `--size` takes, per family, with the released model whose shape it is."""
    from rich.table import Table

    from fabrika.models.presets import ARCHS, PUBLISHED, SAME_AS, sizes

    table = Table(title="presets (--arch, --size)")
    for col in ("arch", "size", "shape of"):
        table.add_column(col)
    for arch in ARCHS:
        for size in sizes(arch):
            released = PUBLISHED.get(arch, {}).get(size, (SAME_AS.get((arch, size), ""),))[0]
            table.add_row(arch, size, released or ("tests" if size == "tiny" else "scaled"))
    console.print(table)


def plan_command(arch: str, size: str, model: str | None, tokens: float | None, data_gb: float | None, gpu: str,
                 gpus: int, mfu: float, price: float | None, seq_len: int | None, micro_batch: int,
                 json_out: bool, bytes_per_token: float = 4.0) -> None:
    from rich.console import Console

    if size == "list":
        render_sizes(Console(width=120))
        return
    plan = make_plan(arch=arch, size=size, model=model, tokens=tokens, data_gb=data_gb, gpu=gpu, gpus=gpus, mfu=mfu,
                     price_per_gpu_hour=price, seq_len=seq_len, micro_batch=micro_batch,
                     bytes_per_token=bytes_per_token)
    if json_out:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        render_plan(plan, Console(width=120))
