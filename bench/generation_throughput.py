"""Generation throughput of the two engines for local models: MT-Bench answers (80 questions, both
turns) on the same model with transformers and with vLLM, side by side in one run.

    python bench/generation_throughput.py [--model DIR] [--questions 80] [--max-new-tokens 128]

Without --model, a tiny Llama with random weights and a tokenizer trained on the shipped corpus is
built (what it says does not matter; how fast it is said does). vLLM comes from .venv-vllm (`make
vllm`); its start-up is timed apart from the answers. New tokens are those each engine reports.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_reference import SHAPES, make_model, make_tokenizer  # noqa: E402

from fabrika.evaluate import mtbench as M  # noqa: E402
from fabrika.infer.backends import load_generator  # noqa: E402


class Counting:
    """A generator that adds up the new tokens its engine reports (completion tokens)."""

    def __init__(self, gen) -> None:
        self.gen, self.tokens = gen, 0

    def generate(self, conversations, params):
        out = self.gen.generate(conversations, params)
        self.tokens += sum(c.completion_tokens for choices in out for c in choices)
        return out


def answer_all(ref: str, engine: str, questions: list[dict], out: Path, max_new_tokens: int) -> dict:
    t = time.perf_counter()
    gen = load_generator(ref, engine=engine)
    started = time.perf_counter() - t
    counting = Counting(gen)
    t = time.perf_counter()
    answers = M.generate_answers(counting, questions, out, engine, max_new_tokens, batch=len(questions))
    seconds = time.perf_counter() - t
    if hasattr(gen, "close"):
        gen.close()
    turns = sum(len(a["choices"][0]["turns"]) for a in answers)
    return {"start": started, "seconds": seconds, "turns": turns, "tokens": counting.tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face model directory (default: a tiny random Llama)")
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU build reserves 4 otherwise
    from rich.console import Console
    from rich.table import Table

    questions = M.load_questions("mt_bench")[0][: args.questions]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else make_model(work, SHAPES["tiny"], make_tokenizer(work, 1024, 4096))
        results = {engine: answer_all(f"hf:{model}", engine, questions, work / f"{engine}.jsonl", args.max_new_tokens)
                   for engine in ("transformers", "vllm")}
    base = results["transformers"]["tokens"] / results["transformers"]["seconds"]
    table = Table(title=f"MT-Bench answers: {len(questions)} questions, both turns, up to {args.max_new_tokens} "
                        f"new tokens, {model.name if args.model else 'tiny random Llama'}")
    for col in ("engine", "start-up", "turns", "new tokens", "answers", "tokens/s", "ratio"):
        table.add_column(col, justify="right")
    for engine, r in results.items():
        rate = r["tokens"] / r["seconds"]
        table.add_row(engine, f"{r['start']:.0f} s", str(r["turns"]), f"{r['tokens']:,}", f"{r['seconds']:.1f} s",
                      f"{rate:,.0f}", f"{rate / base:.2f}×")
    Console(width=110).print(table)


if __name__ == "__main__":
    main()
