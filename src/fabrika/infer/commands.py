"""CLI commands of the inference layer (serve, chat, compare), registered on the main app.
Heavy modules are imported inside the commands, so `fabrika --help` stays instant."""

from __future__ import annotations

import os
from typing import Optional

import typer

ENGINE_HELP = ("Engine of a local Hugging Face model: auto, transformers or vllm (default: FABRIKA_ENGINE, else auto: "
               "vLLM when installed and a CUDA GPU is present).")


def _engine(value: Optional[str]) -> Optional[str]:
    """--engine checked before any model loads (an API or GGUF model would never ask for it)."""
    from fabrika.infer.vllm_engine import check_engine

    return check_engine(value, "--engine") if value is not None else None


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: str = typer.Argument(..., help="hf:DIR_OR_ID or gguf:FILE (or a bare directory / .gguf path)."),
        host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
        port: int = typer.Option(8000, help="Port (0 picks a free one)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FABRIKA_API_KEY",
                                              help="Demand this bearer token (or set FABRIKA_API_KEY)."),
        name: Optional[str] = typer.Option(None, help="Model id reported by the API."),
        max_body_mb: float = typer.Option(4.0, "--max-body-mb", min=0.001,
                                          help="Largest request body; bigger ones get 413."),
        max_queue: int = typer.Option(256, "--max-queue", min=1,
                                      help="Requests generating or waiting at once; more get 429 (retry later)."),
        engine: Optional[str] = typer.Option(None, "--engine", callback=_engine, help=ENGINE_HELP),
    ) -> None:
        """Serve a model over an OpenAI-compatible HTTP API (prints its URL once it is ready)."""
        from fabrika.infer.serve import serve_forever

        serve_forever(model, host, port, api_key, name, max_body_mb=max_body_mb, max_queue=max_queue, engine=engine)

    @app.command()
    def chat(
        model: str = typer.Argument(..., help="hf:DIR, an adapter dir, gguf:FILE or openai:MODEL@URL."),
        query: Optional[str] = typer.Option(None, "--query", help="Answer this one message and exit."),
        system: Optional[str] = typer.Option(None, help="System prompt."),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        max_tokens: int = typer.Option(512, help="Longest answer."),
        engine: Optional[str] = typer.Option(None, "--engine", callback=_engine, help=ENGINE_HELP),
    ) -> None:
        """Chat with a model in the terminal (/reset, /system TEXT, /save FILE, /exit)."""
        from fabrika.infer.generation import GenerationParams
        from fabrika.infer.chat import interactive
        from fabrika.infer.chat import query as one_query

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        params = GenerationParams(temperature=temperature, max_new_tokens=max_tokens)
        if query is not None:
            print(one_query(model, query, params, system, engine=engine))
        else:
            interactive(model, params, system, engine=engine)

    @app.command()
    def compare(
        model_a: str = typer.Argument(..., help="First model reference."),
        model_b: str = typer.Argument(..., help="Second model reference."),
        prompts: str = typer.Option(..., "--prompts", help="A .txt (one prompt a line) or .jsonl file."),
        out: str = typer.Option("compare.md", "--out", help="Output .md or .html."),
        max_tokens: int = typer.Option(256, help="Longest answer."),
        engine: Optional[str] = typer.Option(None, "--engine", callback=_engine, help=ENGINE_HELP),
    ) -> None:
        """Answer the same prompts with two models and write a side-by-side table."""
        from fabrika.infer.generation import GenerationParams
        from fabrika.infer.chat import compare as run_compare

        path = run_compare(model_a, model_b, prompts, out, GenerationParams(max_new_tokens=max_tokens), engine=engine)
        print(f"wrote {path}")
