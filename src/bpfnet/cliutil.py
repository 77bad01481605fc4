"""How every `bpfnet ...` command fails (one line on stderr, exit 1) and table rows of plain text.
(It sits under every layer: `bpfnet netns` uses it too; the rest of the CLI kit is bpfnet.app.cli.)"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.markup import escape
from rich.table import Table


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit 1 (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def add_plain_row(table: Table, *cells: object) -> None:
    """A table row whose cells are shown as they are: a stored rule comment `[/red] oops` or an
    expression `tcp[tcpflags] & tcp-syn != 0` is text, not rich markup."""
    table.add_row(*(escape(str(cell)) for cell in cells))
