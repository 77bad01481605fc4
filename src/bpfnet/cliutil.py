"""Small pieces every `bpfnet <app>` command shares: how a command fails, and pydantic's errors as
the one line it prints."""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit 1 (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def validation_message(err: ValidationError) -> str:
    """pydantic's messages with where they apply, e.g. `rules.2.rate: ...`, on one line."""
    parts = []
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
