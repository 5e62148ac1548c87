"""API client throughput against the latency bound.

    python bench/client_throughput.py [--requests 500] [--latency 0.2]

A trivial OpenAI-compatible echo server answers instantly; the fault-injecting proxy of the tests
(tests/fault_proxy.py) in front of it adds a fixed latency to every request. Both run in a child
process, so the client does not share the interpreter with them. The bound at concurrency c is
c / latency requests/s; the table shows how close fabrika's client gets, and the sequential loop a
one-off script would run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from fabrika.infer.generation import GenerationParams
from fabrika.infer.client import ClientConfig, run_requests


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        text = body["messages"][-1]["content"]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}

    return app


def start_echo():
    import threading

    server = uvicorn.Server(uvicorn.Config(echo_app(), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def start_teacher_process(latency: float):
    """The echo server and the latency proxy in a child process, so that the client measured here
    does not share a Python interpreter (and its GIL) with them. Returns (process, proxy url)."""
    import subprocess
    import sys

    here = Path(__file__).parent
    code = ("import sys, time; sys.path[:0] = sys.argv[1:3]; from client_throughput import start_echo; "
            "from fault_proxy import FaultProxy; p = FaultProxy(start_echo(), latency_s=float(sys.argv[3]))."
            "__enter__(); print(p.url, flush=True); time.sleep(1e6)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(here), str(here.parent / "tests"), str(latency)],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", default="1,8,32,64")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    params = GenerationParams(max_new_tokens=8)
    rows = []
    teacher, url = start_teacher_process(args.latency)
    try:
        import openai

        plain = openai.OpenAI(base_url=url, api_key="x")
        n_seq = min(args.requests, 25)
        t = time.perf_counter()
        for i in range(n_seq):  # what a one-off script does: one request after another
            plain.chat.completions.create(model="echo", messages=[{"role": "user", "content": f"s{i}"}], max_tokens=8)
        sequential = n_seq / (time.perf_counter() - t)
        for c in map(int, args.concurrency.split(",")):
            n = args.requests if c > 1 else n_seq
            convs = [[{"role": "user", "content": f"c{c}-{i}"}] for i in range(n)]
            t = time.perf_counter()
            run_requests(ClientConfig(base_url=url, concurrency=c), "echo", convs, params, quiet=True)
            rps = n / (time.perf_counter() - t)
            bound = c / args.latency
            rows.append((c, n, rps, bound, rps / bound, rps / sequential))
    finally:
        teacher.kill()
    table = Table(title=f"client throughput, {args.latency * 1000:.0f} ms added latency per request",
                  caption=f"sequential loop (openai client, one request at a time): {sequential:.2f} req/s")
    for col in ("concurrency", "requests", "req/s", "bound", "of bound", "× sequential"):
        table.add_column(col, justify="right")
    for c, n, rps, bound, frac, ratio in rows:
        table.add_row(str(c), str(n), f"{rps:.1f}", f"{bound:.1f}", f"{frac:.0%}", f"{ratio:.1f}×")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
