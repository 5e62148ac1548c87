"""Pretraining throughput: tokens/s and MFU of the `pretrain` stage for several model sizes.

    python bench/pretrain_throughput.py                      # tiny and 125m on this machine
    python bench/pretrain_throughput.py --sizes 1b --seq-len 2048 --batch-size 8 --steps 30   # on a GPU

MFU needs the device's peak: GPUs are looked up by name (dense bf16 spec-sheet numbers); on a CPU the
peak is *measured* here with a large fp32 matmul, so CPU MFU means "fraction of what this CPU's BLAS
reaches on one big matmul", stated in the table's caption.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measured_cpu_peak_tflops(n: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def prepare_data(work: Path) -> Path:
    from fabrika.artifacts import RunContext
    from fabrika.data import corpus
    from fabrika.models import tokenizer

    tok = tokenizer.run(tokenizer.CONFIG(paths=[str(REPO / "data" / "corpus")], vocab_size=8192),
                        RunContext(stage="tokenizer", kind="tokenizer", stage_dir=work / "tok", quiet=True))
    return corpus.run(corpus.CONFIG(tokenizer=str(tok.path), paths=[str(REPO / "data" / "corpus")], shard_mb=4),
                      RunContext(stage="prepare", kind="prepare", stage_dir=work / "prep", quiet=True)).path


def bench_one(data: Path, work: Path, arch: str, size: str, seq_len: int, batch: int, steps: int,
              peak_tflops: float | None, precision: str) -> dict:
    from fabrika.artifacts import RunContext, read_jsonl
    from fabrika.train import pretrain

    cfg = pretrain.CONFIG(data=str(data), model={"arch": arch, "size": size}, seq_len=seq_len,
                          train={"max_steps": steps, "batch_size": batch, "logging_steps": 1, "eval_steps": None,
                                 "save_steps": 10_000, "peak_tflops": peak_tflops, "precision": precision})
    out = work / f"{arch}-{size}"
    art = pretrain.run(cfg, RunContext(stage="pretrain", kind="pretrain", stage_dir=out, quiet=True))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "tokens_per_s" in r][2:]  # skip warm-up steps
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    mfus = [r["mfu"] for r in rows if "mfu" in r]
    return {"model": f"{arch}-{size}", "params": art.metrics["parameters"], "seq": seq_len, "batch": batch,
            "tokens/s": tps, "mfu": statistics.median(mfus) if mfus else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--sizes", default="tiny,125m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    peak = None
    if not torch.cuda.is_available():
        peak = measured_cpu_peak_tflops()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_data(work)
        results = [bench_one(data, work, args.arch, s, args.seq_len, args.batch_size, args.steps, peak,
                             args.precision) for s in args.sizes.split(",")]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    caption = (f"MFU against the measured fp32 matmul peak of this CPU: {peak:.3f} TFLOP/s" if peak
               else "MFU against the GPU's dense bf16 peak")
    table = Table(title=f"pretrain throughput on {device}", caption=caption)
    for col in ("model", "params", "seq", "batch", "tokens/s", "MFU"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["model"], f"{r['params'] / 1e6:.1f}M", str(r["seq"]), str(r["batch"]), f"{r['tokens/s']:,.0f}",
                      f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
