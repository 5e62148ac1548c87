"""CLI commands of the inference layer (serve, chat, compare), registered on the main app."""

import typer


def register(app: typer.Typer) -> None:
    pass
