"""GGUF export cost: conversion and Q4_K_M quantization time, peak memory, and bytes/s against the
disk's own sequential write speed measured in the same run.

    python bench/export.py                      # tiny and ~1B Llama (random weights, built here)
    python bench/export.py --sizes tiny         # quick

Each measurement runs in a fresh process that reports its own peak RSS; the baseline row is the same
process doing the imports only, so "peak − baseline" is what the conversion itself holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
def peak_rss():  # VmHWM: this process's own high-water mark (ru_maxrss keeps the parent's over exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
import gguf, numpy, torch, safetensors, transformers  # what conversion imports: baseline, not conversion
from transformers import AutoTokenizer
from fabrika.export import gguf as writer
from fabrika.export.stage import quantize
args = json.loads(sys.argv[1])
t = time.perf_counter(); info = None
if args["what"] == "convert":
    info = writer.convert(args["model"], args["out"], "f16")
elif args["what"] == "quantize":
    quantize(__import__("pathlib").Path(args["src"]), __import__("pathlib").Path(args["out"]), "q4_k_m")
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss": peak_rss(),
                  "largest": info["largest_tensor_bytes"] if info else None}))
"""


def child(**args) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def disk_write_speed(directory: Path, nbytes: int) -> float:
    """Plain sequential write of the same number of bytes, fsync'd: the bound a converter can reach."""
    block = os.urandom(1 << 24)
    path = directory / "speed.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(block)
            written += len(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return written / seconds


def build_model(size: str, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fabrika.models.presets import make_config

    from fabrika.artifacts import RunContext
    from fabrika.models import tokenizer

    tok_dir = out.parent / "tok"
    art = tokenizer.run(tokenizer.CONFIG(paths=[str(REPO / "data" / "corpus" / "en")], vocab_size=4096),
                        RunContext(stage="t", kind="tokenizer", stage_dir=tok_dir, quiet=True))
    tok = AutoTokenizer.from_pretrained(art.path)
    config = make_config("llama", size, vocab_size=32768 if size != "tiny" else len(tok))
    config.vocab_size = max(config.vocab_size, len(tok))
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,1b")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        work = Path(tmp)
        baseline = child(what="none")["peak_rss"]
        for size in args.sizes.split(","):
            model = build_model(size, work / size)
            f16 = work / f"{size}-f16.gguf"
            conv = child(what="convert", model=str(model), out=str(f16))
            quant = child(what="quantize", src=str(f16), out=str(work / f"{size}-q4_k_m.gguf"))
            nbytes = f16.stat().st_size
            disk = disk_write_speed(work, nbytes)
            rows.append((size, nbytes, conv, quant, disk))
    table = Table(title="GGUF export (F16 conversion, then Q4_K_M by llama.cpp)",
                  caption=f"RSS after the imports: {baseline / 2**20:.0f} MB; tensor memory = peak − the tiny "
                          "model's peak (fixed costs such as the tokenizer load)")
    for col in ("model", "F16 size", "convert s", "MB/s", "disk MB/s", "vs disk", "peak RSS", "largest tensor",
                "tensor memory / largest", "Q4_K_M s", "Q4_K_M peak RSS"):
        table.add_column(col, justify="right")
    # What converting costs regardless of size (the tokenizer loaded for its vocabulary, library state)
    # is the tiny model's peak; what grows with the model is measured above it.
    fixed = rows[0][2]["peak_rss"] if rows[0][0] == "tiny" else baseline
    for size, nbytes, conv, quant, disk in rows:
        speed = nbytes / conv["seconds"]
        over = (conv["peak_rss"] - fixed) / conv["largest"] if size != "tiny" else float("nan")
        table.add_row(size, f"{nbytes / 2**20:.1f} MB", f"{conv['seconds']:.2f}", f"{speed / 2**20:.0f}",
                      f"{disk / 2**20:.0f}", f"{disk / speed:.2f}× slower", f"{conv['peak_rss'] / 2**20:.0f} MB",
                      f"{conv['largest'] / 2**20:.1f} MB", f"{over:.2f}", f"{quant['seconds']:.2f}",
                      f"{quant['peak_rss'] / 2**20:.0f} MB")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
