"""The app kit for command lines: the options every `bpfnet <app>` command shares, the output formats
with renderers that print text as text (never as Rich markup: a VIP `[fc00::1]:80/tcp` or a tcpdump
`tcp[13] & 2 != 0` stays what it is), and one way to call the agent that turns its errors into
the one-line `error: ...` every command fails with."""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bpfnet.app.client import AgentClient, AgentRequestError
from bpfnet.app.paths import DEFAULT_SOCKET
from bpfnet.app.validation import validation_message
from bpfnet.cliutil import fail

T = TypeVar("T")


class Output(str, enum.Enum):
    """What a command prints: a table for people, JSON or YAML for programs."""

    table = "table"
    json = "json"
    yaml = "yaml"


SocketOption: Any = typer.Option(DEFAULT_SOCKET, "--socket", help="the agent's unix socket")


def output_option(default: Output = Output.table) -> Any:
    """The `-o/--output` option (table, json or yaml)."""
    return typer.Option(default, "-o", "--output", help="table, json or yaml", case_sensitive=False)


OutputOption: Any = output_option()
YamlOutputOption: Any = output_option(Output.yaml)  # for commands that print a state (`show`)


def plain_table(columns: Sequence[str], rows: Iterable[Sequence[object]], title: str | None = None) -> Table:
    """A Rich table whose cells (and title) are plain text: every value is str()-ed and escaped."""
    table = Table(*(escape(c) for c in columns), title=escape(title) if title is not None else None)
    for row in rows:
        table.add_row(*(escape("-" if cell is None else str(cell)) for cell in row))
    return table


def render(data: Any, output: Output, tables: Callable[[], Table | Sequence[Table]] | None = None) -> None:
    """Print `data` as JSON or YAML, or as the tables `tables` builds (YAML when there are none)."""
    if output is Output.json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
    elif output is Output.yaml or tables is None:
        typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())
    else:
        built = tables()
        console = Console()
        for table in [built] if isinstance(built, Table) else built:
            console.print(table)


def call_agent(socket: Path, call: Callable[[AgentClient], T]) -> T:
    """`call(client)` against the agent on `socket`; its refusal or absence ends the command with
    `error: <the agent's message>`."""
    try:
        with AgentClient(socket) as client:
            return call(client)
    except AgentRequestError as err:
        fail(str(err))


def validated(model: type[BaseModel], state: dict) -> dict:
    """`state` as the agent will store it (`model`'s JSON dump: defaults filled, ids assigned), or
    `error: <what is wrong>` before any request."""
    try:
        return model.model_validate(state).model_dump(mode="json")
    except ValidationError as err:
        fail(validation_message(err))


def change_state(socket: Path, app: str, model: type[BaseModel], change: Callable[[dict], dict]) -> dict:
    """Read `app`'s state from the agent, `change` it, validate it here, write it back (the agent
    validates again; a write in between makes it start over). Returns the agent's answer."""
    return call_agent(socket, lambda client: client.update_state(app, lambda state: validated(model, change(state))))
