"""The `export` stage: a model (pretrain/sft/prefer output, an adapter, an HF dir or Hub id) to GGUF
files for llama.cpp, quantized by llama.cpp itself and verified against the original.

    fabrika export runs/x/sft --quant q4_k_m,q8_0 --out runs/x/export
    fabrika chat gguf:runs/x/export/model-q4_k_m.gguf

F32/F16/BF16/Q8_0 are written directly; every other type (Q4_0, Q4_K_M, Q5_K_M, Q6_K, ...) is made by
`llama_model_quantize` from an F16 (or `base_type`) file, removed afterwards unless `quant` lists it
too, optionally with an importance matrix computed on calibration text (`imatrix: builtin` or a file;
see fabrika.export.imatrix). Every file is loaded back with llama.cpp and compared with the HF model;
an unquantized file that disagrees fails the stage, and each quantized file is set beside the range
llama.cpp reports for its type. An Ollama Modelfile is written beside the files.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from fabrika.artifacts import Artifact, RunContext, atomic_write_json, atomic_write_text, read_manifest, replacing
from fabrika.config import Config
from fabrika.errors import FabrikaError
from fabrika.export import gguf as writer
from fabrika.export import verify as verifier
from fabrika.models.checks import check_model_dir, is_adapter_dir
from fabrika.models.reference import model_size, reference_placement
from fabrika.models.refs import hf_target


class VerifyParams(Config):
    enabled: bool = Field(True, description="Load each file in llama.cpp and compare with the HF model.")
    calibration: str = Field("builtin", description="Calibration text file, or builtin (en/ru/zh excerpts).")
    max_tokens: int = Field(512, ge=16, description="Calibration tokens compared.")


class ExportConfig(Config):
    model: str = Field(description="A stage name, model or adapter directory, hf:ID or Hub id.")
    quant: list[str] = Field(default_factory=lambda: ["f16", "q4_k_m"], description="GGUF types to produce, e.g. q4_k_m,q8_0,f16 (comma-separated on the command line).")
    base_type: Literal["f16", "bf16", "f32"] = Field(
        "f16", description="Type quantization starts from: f16, bf16 or f32 (kept only if quant lists it).")
    imatrix: str | None = Field(None, description="Calibration text for an importance matrix, or builtin.")
    name: str = Field("model", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$",
                      description="File name stem: <name>-<type>.gguf (a plain name: no folders).")
    verify: VerifyParams = Field(default_factory=VerifyParams, description="Verification settings.")

    @field_validator("quant", mode="before")
    @classmethod
    def _split(cls, v):
        return [q.strip().lower() for q in v.split(",")] if isinstance(v, str) else [q.lower() for q in v]


CONFIG = ExportConfig


def inputs(cfg: ExportConfig) -> list[str]:
    return [cfg.model]


def llama_cpp_types() -> dict[str, int]:
    """Quantization types llama.cpp offers, from its own constants (e.g. q4_k_m → 15)."""
    try:
        import llama_cpp
    except ImportError:
        raise FabrikaError("export needs llama-cpp-python for quantization: pip install 'fabrika[llama]'") from None
    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {n[len(prefix):].lower(): getattr(llama_cpp, n) for n in dir(llama_cpp) if n.startswith(prefix)}


def _importance(cfg: ExportConfig, model_dir: Path) -> dict[str, Any]:
    """The importance matrix on the calibration text (`builtin`: the shipped en/ru/zh excerpts)."""
    from fabrika.export import imatrix

    config = writer.load_config(model_dir)
    plan = writer.plan_tensors(config, writer.tensor_shapes(model_dir))
    names = {hf: s.gguf_name for s in plan for hf in s.hf_names if len(s.hf_names) == 1}
    return imatrix.compute(model_dir, verifier.calibration_text(cfg.imatrix, "export.imatrix"), names)


# Bits per weight of a file of each type, for the memory check before conversion: exact for the float
# types; Q8_0's 8.5 (32 weights share one f16 scale) bounds every other quantization from above.
BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, "bf16": 16.0}
QUANTIZED_BITS_BOUND = 8.5


def check_memory(cfg: ExportConfig, model_dir: Path) -> None:
    """Fail now, before conversion and quantization (minutes to hours on a large model), when the
    importance matrix or the verification will not fit in the memory free."""
    weighted = cfg.imatrix and any(q not in writer.DIRECT_TYPES for q in cfg.quant)
    if not (weighted or cfg.verify.enabled):
        return
    from fabrika.export import imatrix

    placement = reference_placement()
    size = model_size(model_dir)
    if weighted:
        imatrix.check_imatrix_fits(size, imatrix.CONTEXT, placement)
    if cfg.verify.enabled:
        bits = max(BITS_PER_WEIGHT.get(q, QUANTIZED_BITS_BOUND) for q in cfg.quant)
        verifier.check_verification_fits(size, int(size[0] * bits / 8), cfg.verify.max_tokens, placement)


def quantize(src: Path, dst: Path, qtype: str, imatrix: dict[str, Any] | None = None) -> None:
    import llama_cpp
    from llama_cpp import _logger

    from fabrika.export.imatrix import CArray

    _logger.set_verbose(False)  # llama.cpp's per-tensor chatter; its errors still show
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp_types()[qtype]
    if imatrix:
        data = CArray(imatrix)  # referenced until the call returns
        params.imatrix = data.pointer()
    with replacing(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise FabrikaError(f"llama.cpp could not quantize {src.name} to {qtype} (code {rc})")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a file holds: shows llama.cpp's fallbacks (e.g. q4_K → q5_0
    for rows that are not multiples of 256) and the mixed types a *_M scheme uses by design."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def _resolve_model(cfg: ExportConfig, ctx: RunContext) -> tuple[Path, dict[str, Any]]:
    """An HF model directory to convert (an adapter is merged first) and its lineage."""
    ref = ctx.resolve_model(ctx.resolve(cfg.model))
    ref = hf_target(ref)
    check_model_dir(ref, "export.model")
    path = Path(ref)
    lineage: dict[str, Any] = {"source": ref}
    art = ctx.input_artifact(cfg.model)
    if art is not None:
        m = read_manifest(art.dir) or {}
        lineage.update({"stage": art.stage, "kind": art.kind, "fingerprint": art.fingerprint,
                        "inputs": m.get("inputs", {})})
    if not path.exists():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        except Exception as e:
            raise FabrikaError(f"export.model: {ref!r} is neither a directory nor a downloadable Hub model ({e})") from None
    if is_adapter_dir(path):
        path = _merge_adapter(path, ctx.stage_dir / "merged")
        lineage["merged_adapter"] = True
    return path, lineage


def _merge_adapter(adapter: Path, out: Path) -> Path:
    if (out / "config.json").exists():
        return out
    from fabrika.models.model_dir import adapter_base, merge_adapter

    base = adapter_base(adapter, "export.model")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    merge_adapter(base, adapter, out, tok, tok.eos_token)
    return out


OLLAMA_TEMPLATES = {
    "<|im_start|>": ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                     '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}'
                     '<|im_start|>assistant\n{{ .Response }}<|im_end|>\n', "<|im_end|>"),
    "<|start_header_id|>": ('{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
                            '{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}'
                            '<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>', "<|eot_id|>"),
    "[INST]": ("[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}", "</s>"),
}


def modelfile(gguf_name: str, chat_template: str | None) -> str:
    lines = ["# Ollama: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    for marker, (template, stop) in OLLAMA_TEMPLATES.items():
        if chat_template and marker in chat_template:
            lines += [f'TEMPLATE """{template}"""', f'PARAMETER stop "{stop}"']
            break
    lines += ["PARAMETER temperature 0.7", "PARAMETER num_ctx 4096"]
    return "\n".join(lines) + "\n"


def show_files(files: dict[str, Path], verification: dict[str, Any] | None) -> None:
    """The files written and, per file, what llama.cpp's comparison with the original model says,
    with what each number means and the range llama.cpp itself reports for the type."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows = (verification or {}).get("files", {})
    ref = (verification or {}).get("reference", {})
    table = Table(title="GGUF files" + (f" (checked on {verification['tokens']} calibration tokens against the "
                                        f"original in {ref['dtype']} on {ref['device']})" if verification else ""))
    for col in ("file", "MB", "top-1", "KL", "PPL (original)", "llama.cpp range", "verdict"):
        table.add_column(col, justify="left" if col in ("file", "llama.cpp range", "verdict") else "right")
    for qtype, path in files.items():
        r = rows.get(qtype)
        if r is None:
            table.add_row(path.name, f"{path.stat().st_size / 2**20:.1f}", "", "", "", "", "not verified")
            continue
        table.add_row(path.name, f"{r['bytes'] / 2**20:.1f}", f"{r['top1']:.3f}", f"{r['kl']:.4f}",
                      f"{r['ppl']:.2f} ({r['hf_ppl']:.2f}, ×{r['ppl'] / r['hf_ppl']:.3f})", r["llama_cpp_range"],
                      r["verdict"])
    console.print(table)
    if rows:
        for name, meaning in verifier.MEANING.items():
            console.print(f"  {name}: {meaning}", highlight=False)


# Seconds per billion parameters on the 2-core machine of bench/RESULTS.md (GGUF export, 1B row): F16
# conversion 10 s, llama.cpp's Q4_K_M 35 s; verification (both models over the calibration windows) is
# taken as one more quantization's time per file. A GPU host's many cores make these upper bounds.
CONVERT_S_PER_B, QUANTIZE_S_PER_B = 10.0, 35.0


def estimate(cfg: ExportConfig, ctx: RunContext) -> dict[str, Any]:
    from fabrika.models.plan import planned_params

    out: dict[str, Any] = {"files": len(cfg.quant), "types": ",".join(cfg.quant)}
    if n := planned_params(cfg.model, ctx):
        quantized = [q for q in cfg.quant if q not in writer.DIRECT_TYPES]
        seconds = n / 1e9 * (CONVERT_S_PER_B + QUANTIZE_S_PER_B * (len(quantized) + len(cfg.quant)))
        out["est_minutes"] = round(seconds / 60, 1)
    return out


def run(cfg: ExportConfig, ctx: RunContext) -> Artifact:
    known = llama_cpp_types()
    unknown = [q for q in cfg.quant if q not in writer.DIRECT_TYPES and q not in known]
    if unknown:
        raise FabrikaError(f"export.quant: unknown type(s) {', '.join(unknown)}; llama.cpp offers "
                           f"{', '.join(sorted(set(known) | set(writer.DIRECT_TYPES)))}")

    if cfg.imatrix:
        verifier.calibration_text(cfg.imatrix, "export.imatrix")  # a missing file fails before any work
    model_dir, lineage = _resolve_model(cfg, ctx)
    check_memory(cfg, model_dir)
    out = ctx.stage_dir
    files: dict[str, Path] = {}
    conversions: dict[str, Any] = {}
    for qtype in dict.fromkeys(q for q in cfg.quant if q in writer.DIRECT_TYPES):
        path = out / f"{cfg.name}-{qtype}.gguf"
        if not path.exists():  # a rerun after a kill keeps finished files (each written atomically)
            conversions[qtype] = writer.convert(model_dir, path, qtype, lineage=lineage)
        files[qtype] = path
    base = out / f"{cfg.name}-{cfg.base_type}.gguf"
    imatrix = None
    for qtype in cfg.quant:
        if qtype in files:
            continue
        path = out / f"{cfg.name}-{qtype}.gguf"
        if not path.exists():
            if not base.exists():
                conversions[cfg.base_type] = writer.convert(model_dir, base, cfg.base_type, lineage=lineage)
            if cfg.imatrix and imatrix is None:
                imatrix = _importance(cfg, model_dir)
            quantize(base, path, qtype, imatrix)
        files[qtype] = path
    if cfg.base_type not in cfg.quant:  # only what was asked for stays; the intermediate goes once used
        base.unlink(missing_ok=True)
    types = {q: tensor_types(p) for q, p in files.items()}

    report: dict[str, Any] = {"model": str(model_dir), "conversion": conversions, "tensor_types": types}
    if imatrix:
        report["imatrix"] = {"calibration": cfg.imatrix, "tensors": sorted(imatrix)}
    if cfg.verify.enabled:
        report["verification"] = verifier.verify(model_dir, files, cfg.verify.calibration, cfg.verify.max_tokens)
        atomic_write_json(out / "verification.json", report)
        problems = verifier.check_lossless(report["verification"])
        if problems:
            raise FabrikaError("GGUF verification failed (a conversion bug, not quantization noise):\n  "
                               + "\n  ".join(problems))
    else:
        atomic_write_json(out / "verification.json", report)
    if not ctx.quiet:
        show_files(files, report.get("verification"))

    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(model_dir).chat_template
    main = files[cfg.quant[0]]
    atomic_write_text(out / "Modelfile", modelfile(main.name, template))
    metrics: dict[str, Any] = {}
    if "verification" in report:
        metrics["reference"] = report["verification"]["reference"]
    for q, row in report.get("verification", {}).get("files", {}).items():
        metrics[f"{q}_kl"] = row["kl"]
        metrics[f"{q}_top1"] = row["top1"]
        metrics[f"{q}_mb"] = round(row["bytes"] / 2**20, 2)
    return ctx.finish(main, cfg, metrics=metrics, extra={"files": {q: p.name for q, p in files.items()}})
