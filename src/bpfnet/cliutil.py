"""Small pieces every `bpfnet <app>` command shares: how a command fails, pydantic's errors as
the one line it prints, and table rows of plain text."""

from __future__ import annotations

import re
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit 1 (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def _key(part: object) -> str:
    """One step of a location as printed: field names and indexes as they are; any other key (an
    unknown key read from a file that is not a config, e.g. a line of /etc/shadow) is not echoed."""
    text = str(part)
    return text if isinstance(part, int) or _KEY.fullmatch(text) else f"<a key of {len(text)} characters>"


def validation_message(err: ValidationError) -> str:
    """pydantic's messages with where they apply, e.g. `rules.2.rate: ...`, on one line."""
    parts = []
    for e in err.errors():
        where = ".".join(_key(part) for part in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def add_plain_row(table: Table, *cells: object) -> None:
    """A table row whose cells are shown as they are: a stored rule comment `[/red] oops` or an
    expression `tcp[tcpflags] & tcp-syn != 0` is text, not rich markup."""
    table.add_row(*(escape(str(cell)) for cell in cells))
