"""MT-Bench throughput: answer generation batched vs one question at a time, and judging through the
client against a served judge.

    python bench/mtbench_throughput.py [--size tiny] [--questions 80] [--max-new-tokens 64]

The model is a fabrika preset with random weights and a tokenizer trained on the shipped corpus (what
it says does not matter; how fast it is said does). The judge is the same model behind `fabrika serve`
(batching server) on loopback, asked FastChat's real single-answer prompts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_throughput import make_model  # noqa: E402

from fabrika.evaluate import judge as J  # noqa: E402
from fabrika.evaluate import mtbench as M  # noqa: E402
from fabrika.infer.backends import load_generator  # noqa: E402
from fabrika.infer.local import serve_in_background  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    questions = M.load_questions("mt_bench")[0][: args.questions]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(work, args.size)
        gen = load_generator(f"hf:{model}")
        timings = {}
        for batch in (1, args.batch):
            t = time.perf_counter()
            answers = M.generate_answers(gen, questions, work / f"answers-{batch}.jsonl", "tiny", args.max_new_tokens,
                                         batch=batch)
            timings[batch] = time.perf_counter() - t
        n_turns = sum(len(a["choices"][0]["turns"]) for a in answers)
        for batch in (1, args.batch):
            rows.append((f"answers, batch {batch}", f"{n_turns} turns", f"{timings[batch]:.1f} s",
                         f"{n_turns / timings[batch]:.2f} turns/s", f"{timings[1] / timings[batch]:.1f}×"))

        matches = M.judge_matches(questions, answers, {}, "judge", J.load_prompts("fastchat"), set())
        with serve_in_background(f"hf:{model}", name="judge") as server:
            judge_times = {}
            for conc in (1, args.concurrency):
                subset = matches if conc > 1 else matches[: max(8, len(matches) // 8)]
                t = time.perf_counter()
                M.run_judging(subset, f"openai:judge@{server.url}", work / f"judgments-{conc}.jsonl", "tiny",
                              {"concurrency": conc}, retries=0, quiet=True, max_tokens=args.max_new_tokens)
                judge_times[conc] = len(subset) / (time.perf_counter() - t)
        for conc in (1, args.concurrency):
            rows.append((f"judging, concurrency {conc}", "", "", f"{judge_times[conc]:.2f} judgments/s",
                         f"{judge_times[conc] / judge_times[1]:.1f}×"))

    table = Table(title=f"MT-Bench on llama-{args.size}: {len(questions)} questions, "
                        f"{args.max_new_tokens} new tokens per turn")
    for col in ("step", "work", "time", "rate", "ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*r)
    Console(width=110).print(table)


if __name__ == "__main__":
    main()
