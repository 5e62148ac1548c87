"""`prepare` throughput and memory: MB/s and peak RSS on generated corpora of growing size.
Peak RSS must not grow with the corpus (apart from 8 bytes per distinct document for dedup).

    python bench/prepare_throughput.py                 # 0.25 GB and 1 GB
    python bench/prepare_throughput.py --sizes 0.02,0.08
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
def peak_rss():  # VmHWM: this process's own high-water mark (ru_maxrss keeps the parent's over exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
from fabrika.artifacts import RunContext
from fabrika.data import corpus
a = json.loads(sys.argv[1])
t = time.perf_counter()
art = corpus.run(corpus.CONFIG(tokenizer=a["tok"], paths=[a["corpus"]], shard_mb=50),
                 RunContext(stage="p", kind="prepare", stage_dir=a["out"], quiet=True))
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": art.metrics["train_tokens"] + art.metrics["val_tokens"],
                  "docs": art.metrics["documents"], "peak_rss": peak_rss()}))
"""


def paragraphs() -> list[str]:
    from fabrika.data.text_sources import TextSources, iter_documents

    return list(iter_documents(TextSources(paths=[str(REPO / "data" / "corpus")])))


def generate(path: Path, gb: float, paras: list[str], seed: int = 0) -> None:
    """Shipped paragraphs, shuffled and each stamped with a counter so exact-dedup keeps them."""
    rng = random.Random(seed)
    target, written, i = gb * 1e9, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            block = []
            for p in rng.sample(paras, min(1000, len(paras))):
                block.append(f"{p} [{i}]\n\n")
                i += 1
            chunk = "".join(block)
            f.write(chunk)
            written += len(chunk.encode("utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.25,1.0")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from fabrika.artifacts import RunContext
    from fabrika.models import tokenizer

    rows = []
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        work = Path(tmp)
        tok = tokenizer.run(tokenizer.CONFIG(paths=[str(REPO / "data" / "corpus")], vocab_size=8192),
                            RunContext(stage="t", kind="tokenizer", stage_dir=work / "tok", quiet=True)).path
        paras = paragraphs()
        for gb in map(float, args.sizes.split(",")):
            corpus_file = work / f"corpus-{gb}.txt"
            generate(corpus_file, gb, paras)
            size = corpus_file.stat().st_size
            r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(
                {"tok": str(tok), "corpus": str(corpus_file), "out": str(work / f"out-{gb}")})],
                capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append((size, res))
            corpus_file.unlink()
    table = Table(title="prepare: generated corpus → token shards (8k byte-level BPE)")
    for col in ("corpus", "documents", "tokens", "seconds", "MB/s", "peak RSS"):
        table.add_column(col, justify="right")
    for size, r in rows:
        table.add_row(f"{size / 1e9:.2f} GB", f"{r['docs']:,}", f"{r['tokens']:,}", f"{r['seconds']:.0f}",
                      f"{size / 1e6 / r['seconds']:.1f}", f"{r['peak_rss'] / 2**20:.0f} MB")
    Console(width=100).print(table)


if __name__ == "__main__":
    main()
