"""SFT throughput: trained (non-padding) tokens/s and peak memory of fabrika's `sft` (assistant-only
loss; padding-free packing, and batches grouped by length, which `batching: auto` picks without flash
attention) against a plain transformers Trainer that pads each random batch to its longest
conversation, on the same model and the same chat data with a realistic length spread.

    python bench/sft_throughput.py [--size tiny] [--steps 30] [--rounds 2] [--variants baseline,grouped]

The two variants run alternately in fresh processes (this machine is noisy), and the table reports
the median of the rounds and the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, statistics
def peak_rss():  # VmHWM: this process's own high-water mark (ru_maxrss keeps the parent's over exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
a = json.loads(sys.argv[1])
if a["variant"] != "baseline":
    from fabrika.artifacts import RunContext, read_jsonl
    from fabrika.train import sft
    cfg = sft.CONFIG(model=a["model"], data=a["data"], method="full", max_length=a["seq"], eval_fraction=0,
                     batching=a["variant"],
                     train={"max_steps": a["steps"], "batch_size": a["batch"], "grad_accum": 1, "logging_steps": 1,
                            "eval_steps": None, "save_steps": 100000, "lr": 1e-4})
    sft.run(cfg, RunContext(stage="s", kind="sft", stage_dir=a["out"], quiet=True))
    rows = [r["tokens_per_s"] for r in read_jsonl(a["out"] + "/metrics.jsonl") if "tokens_per_s" in r][2:]
    tps = statistics.median(rows)
else:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, TrainerCallback
    tok = AutoTokenizer.from_pretrained(a["model"])
    from fabrika.models.templates import CHATML
    tok.chat_template = CHATML
    ds = load_dataset("json", data_files=a["data"], split="train")
    ds = ds.map(lambda r: {"input_ids": tok.apply_chat_template(r["messages"], return_dict=True)["input_ids"][: a["seq"]]},
                remove_columns=ds.column_names)
    ds = ds.map(lambda r: {"labels": r["input_ids"]})
    model = AutoModelForCausalLM.from_pretrained(a["model"])
    ends, toks = [], []
    class Meter(TrainerCallback):  # end to end, as fabrika's logs measure it: data loading included
        def on_step_end(self, args, state, control, **k): ends.append(time.perf_counter())
    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *rest, **kw):
            toks.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *rest, **kw)
    args = TrainingArguments(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch"],
                             learning_rate=1e-4, report_to="none", use_cpu=not torch.cuda.is_available(),
                             save_strategy="no", logging_steps=1000, disable_tqdm=True)
    CountingTrainer(model=model, args=args, train_dataset=ds, callbacks=[Meter()],
                    data_collator=DataCollatorForSeq2Seq(tok, padding="longest")).train()
    tps = statistics.median(t / (b - a) for t, a, b in list(zip(toks[1:], ends, ends[1:]))[2:])
print(json.dumps({"tps": tps, "peak_rss": peak_rss()}))
"""


def make_data(path: Path, n: int = 600, seed: int = 0) -> None:
    """Conversations whose lengths spread like real chat data (log-normal answers, short prompts)."""
    rng = random.Random(seed)
    words = (REPO / "data" / "corpus" / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8").split()
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(words) for _ in range(max(3, int(rng.lognormvariate(3.0, 0.6)))))
        a = " ".join(rng.choice(words) for _ in range(max(5, min(900, int(rng.lognormvariate(4.5, 0.9))))))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_model(work: Path, size: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fabrika.artifacts import RunContext
    from fabrika.models import tokenizer
    from fabrika.models.presets import ModelSpec

    tok_dir = tokenizer.run(tokenizer.CONFIG(paths=[str(REPO / "data" / "corpus")], vocab_size=8192),
                            RunContext(stage="t", kind="tokenizer", stage_dir=work / "tok", quiet=True)).path
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_config(ModelSpec(arch="llama", size=size).to_hf_config(vocab_size=len(tok)))
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    return work / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="baseline,packed,grouped",
                    help="which to run (packing is slow on CPU: leave it out for the larger models)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if not set(variants) <= {"baseline", "packed", "grouped"}:
        ap.error("--variants: baseline, packed, grouped")
    if "baseline" not in variants:
        ap.error("--variants must include baseline: the ratios are against it")
    from rich.console import Console
    from rich.table import Table

    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_data(work / "chat.jsonl")
        model = make_model(work, args.size)
        for r in range(args.rounds):
            for variant in variants:
                spec = {"variant": variant, "model": str(model), "data": str(work / "chat.jsonl"), "steps": args.steps,
                        "batch": args.batch, "seq": args.seq, "out": str(work / f"{variant}-{r}")}
                out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {v: statistics.median(x["tps"] for x in rs) for v, rs in results.items()}
    table = Table(title=f"SFT on llama-{args.size}: trained tokens/s (batch {args.batch}, up to {args.seq} tokens)",
                  caption=f"median of {args.rounds} interleaved rounds")
    for col in ("variant", "trained tokens/s", "peak RSS", "ratio"):
        table.add_column(col, justify="right")
    for v, label in (("baseline", "Trainer, pad to longest"), ("packed", "fabrika sft (packed)"),
                     ("grouped", "fabrika sft (length-grouped)")):
        if v not in results:
            continue
        rss = max(x["peak_rss"] for x in results[v]) / 2**20
        table.add_row(label, f"{med[v]:,.0f}", f"{rss:,.0f} MB", f"{med[v] / med['baseline']:.2f}×")
    Console(width=100).print(table)


if __name__ == "__main__":
    main()
