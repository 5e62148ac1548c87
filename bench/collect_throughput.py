"""collect throughput against the latency bound, and the per-row overhead of journal and filters.

    python bench/collect_throughput.py [--prompts 2000] [--latency 0.2] [--concurrency 64]

The teacher is an instant OpenAI-compatible echo server behind the fault-injecting proxy, which adds a
fixed latency to every request (as a remote API would), both in a child process. The whole stage runs: sampling, requests,
journal, filters (lingua language detection included), dataset, Parquet, ShareGPT and card. The bound
is concurrency / latency prompts/s; the sequential loop is what a one-off script does.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from client_throughput import start_teacher_process  # noqa: E402

from fabrika.artifacts import Journal, RunContext  # noqa: E402
from fabrika.data import collect  # noqa: E402
from fabrika.data import filters as F  # noqa: E402

PROMPTS = {"en": "Explain in a few sentences why the sky looks blue on a clear day, question {i}.",
           "ru": "Объясните в нескольких предложениях, почему небо голубое в ясный день, вопрос {i}.",
           "zh": "请用几句话解释为什么晴天的天空是蓝色的，第{i}个问题。"}
LETTERS = {"en": "abcdefghijklmnopqrstuvwxyz", "ru": "абвгдежзиклмнопрстуфхцчшэюя", "zh": "天地人山水火木金土日月风云"}


def spelled(i: int, lang: str) -> str:
    """The number in the language's letters: near-duplicate detection ignores digits."""
    letters, out = LETTERS[lang], ""
    while True:
        i, r = divmod(i, len(letters))
        out += letters[r]
        if not i:
            return out


def write_prompts(path: Path, n: int) -> None:
    langs = list(PROMPTS)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            lang = langs[i % 3]
            f.write(json.dumps({"id": f"p{i}", "prompt": PROMPTS[lang].format(i=spelled(i, lang)), "language": lang},
                               ensure_ascii=False) + "\n")


def overhead_per_row(n: int, work: Path) -> float:
    """Seconds per answer spent on what collect adds to a request: filters and the journal line."""
    answers = [(PROMPTS[lang].format(i=i), lang) for i in range(n) for lang in [random.choice(list(PROMPTS))]]
    codes = tuple(sorted(PROMPTS))
    F.drop_reason("warm-up text for the detector", "stop", "en", list(F.FILTERS), codes)
    t = time.perf_counter()
    with Journal(work / "overhead.jsonl") as log:
        for i, (text, lang) in enumerate(answers):
            reason = F.drop_reason(text, "stop", lang, list(F.FILTERS), codes)
            log.append({"id": i, "kind": "answer", "answers": [{"text": text, "drop": reason}]})
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    import openai
    from rich.console import Console
    from rich.table import Table

    teacher, url = start_teacher_process(args.latency)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "prompts.jsonl"
        write_prompts(src, args.prompts)
        per = args.prompts // 3
        cfg = collect.CONFIG(source=str(src), format="prompt", quota={"en": per, "ru": per, "zh": per},
                             teacher=f"openai:echo@{url}", max_tokens=64,
                             client={"concurrency": args.concurrency})
        n = 3 * per
        t = time.perf_counter()
        collect.run(cfg, RunContext(stage="collect", kind="collect", stage_dir=work / "out", quiet=True))
        stage_s = time.perf_counter() - t
        t = time.perf_counter()  # the same again: all answers journaled, so only the fixed costs remain
        collect.run(cfg, RunContext(stage="collect", kind="collect", stage_dir=work / "out", quiet=True))
        fixed_s = time.perf_counter() - t

        plain = openai.OpenAI(base_url=url, api_key="x")
        n_seq = 25
        t = time.perf_counter()
        for i in range(n_seq):
            plain.chat.completions.create(model="echo", messages=[{"role": "user", "content": PROMPTS["en"].format(i=i)}],
                                          max_tokens=64)
        sequential = n_seq / (time.perf_counter() - t)
        overhead = overhead_per_row(n, work)
    teacher.kill()

    bound = args.concurrency / args.latency
    rate = n / (stage_s - fixed_s)
    table = Table(title=f"collect: {n} prompts, {args.latency * 1000:.0f} ms added latency, "
                        f"concurrency {args.concurrency}")
    for col in ("measure", "value"):
        table.add_column(col, justify="right")
    table.add_row("whole stage", f"{stage_s:.1f} s")
    table.add_row("fixed part (sampling, dataset files; a rerun)", f"{fixed_s:.1f} s")
    table.add_row("whole stage prompts/s", f"{n / stage_s:.1f}")
    table.add_row("request phase prompts/s", f"{rate:.1f}")
    table.add_row("bound (concurrency / latency)", f"{bound:.1f}")
    table.add_row("request phase of bound", f"{rate / bound:.0%}")
    table.add_row("sequential loop prompts/s", f"{sequential:.2f}")
    table.add_row("request phase × sequential", f"{rate / sequential:.1f}×")
    table.add_row("journal + filters per row", f"{overhead * 1000:.2f} ms")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
