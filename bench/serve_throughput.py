"""Tokens/s of `fabrika serve` for a tiny model at 1 and 8 concurrent clients (batched generation).

    python bench/serve_throughput.py [--requests 48] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_model(work: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from fabrika.artifacts import RunContext
    from fabrika.models import tokenizer
    from fabrika.models.presets import ModelSpec

    tok_art = tokenizer.run(tokenizer.CONFIG(paths=[str(REPO / "data" / "corpus" / "en")], vocab_size=2048),
                            RunContext(stage="t", kind="tokenizer", stage_dir=work / "tok", quiet=True))
    tok = AutoTokenizer.from_pretrained(tok_art.path)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ModelSpec(arch="llama", size="tiny").to_hf_config(vocab_size=len(tok)))
    out = work / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=[], pad_token_id=tok.pad_token_id).save_pretrained(out)  # never stop early
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    import openai
    from rich.console import Console
    from rich.table import Table

    from fabrika.infer.local import serve_in_background

    rows = []
    with tempfile.TemporaryDirectory() as tmp, serve_in_background(f"hf:{tiny_model(Path(tmp))}") as server:
        client = openai.OpenAI(base_url=server.url, api_key="x")

        def ask(i: int) -> int:
            r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"tell {i}"}],
                                               max_tokens=args.max_tokens, temperature=0)
            return r.usage.completion_tokens

        ask(0)  # warm-up
        for clients in (1, 8):
            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(ask, range(args.requests)))
            dt = time.perf_counter() - t
            rows.append((clients, args.requests, tokens, tokens / dt, args.requests / dt))
    table = Table(title="fabrika serve, tiny Llama on this machine")
    for col in ("clients", "requests", "tokens", "tokens/s", "req/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r[0]), str(r[1]), str(r[2]), f"{r[3]:,.0f}", f"{r[4]:.2f}")
    Console(width=100).print(table)


if __name__ == "__main__":
    main()
