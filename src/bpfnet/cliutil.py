"""Small pieces every `bpfnet <app>` command shares: how a command fails, pydantic's errors as
the one line it prints, and table rows of plain text."""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table


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


def add_plain_row(table: Table, *cells: object) -> None:
    """A table row whose cells are shown as they are: a stored rule comment `[/red] oops` or an
    expression `tcp[tcpflags] & tcp-syn != 0` is text, not rich markup."""
    table.add_row(*(escape(str(cell)) for cell in cells))
