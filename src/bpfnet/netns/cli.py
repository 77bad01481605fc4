"""`bpfnet netns list|cleanup`: see and remove what bpfnet topologies created."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from bpfnet.cliutil import add_plain_row
from bpfnet.cliutil import fail as _fail
from bpfnet.netns.runtime import list_netns, namespace_pids
from bpfnet.netns.topology import (
    check_prefix,
    cleanup,
    namespace_owner,
    owned_root_links,
)

app = typer.Typer(help="Network namespaces and links made by bpfnet topologies.", no_args_is_help=True)


@app.command("list")
def list_command(output: str = typer.Option("table", "-o", "--output", help="table or json")) -> None:
    """Every network namespace (with the bpfnet prefix that owns it) and bpfnet's root links."""
    namespaces: list[dict[str, Any]] = [{"name": ns, "owner": namespace_owner(ns), "pids": namespace_pids(ns)}
                                        for ns in list_netns()]
    links = [{"name": name, "owner": owner} for name, owner in sorted(owned_root_links().items())]
    if output == "json":
        typer.echo(json.dumps({"namespaces": namespaces, "root_links": links}, indent=2))
        return
    if output != "table":
        _fail(f"unknown output format {output!r}: use table or json")
    table = Table("kind", "name", "owner prefix", "processes")
    for ns in namespaces:
        add_plain_row(table, "netns", ns["name"], ns["owner"] or "-", len(ns["pids"]))
    for link in links:
        add_plain_row(table, "root link", link["name"], link["owner"], "")
    Console().print(table)


@app.command("cleanup")
def cleanup_command(
    prefix: str | None = typer.Option(None, "--prefix", help="only this topology prefix (default: all bpfnet ones)"),
) -> None:
    """Remove namespaces and root links left behind by crashed runs."""
    if prefix is not None:
        try:
            check_prefix(prefix)
        except ValueError as err:
            _fail(str(err))
    removed = cleanup(prefix)
    for item in removed:
        typer.echo(f"removed {item}")
    if not removed:
        typer.echo("nothing to clean up")
