"""How every `bpfnet ...` command fails: one line on stderr, exit 1. (It sits under every layer:
`bpfnet netns` uses it too; the rest of the CLI kit is bpfnet.app.cli.)"""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit 1 (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)

