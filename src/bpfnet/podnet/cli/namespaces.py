"""`bpfnet podnet namespace add|label|del|list`: namespaces and their labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from bpfnet.app.cli import Output, OutputOption, SocketOption, plain_table, render
from bpfnet.podnet.cli.common import (
    LabelsOption,
    Refused,
    change_state,
    format_labels,
    labels_argument,
    read_state,
    refused,
    replace,
)
from bpfnet.podnet.config import Namespace, PodnetState

namespace_app = typer.Typer(help="Namespaces and their labels.", no_args_is_help=True)


def _namespace(name: str, labels: dict[str, str]) -> Namespace:
    try:
        return Namespace(name=name, labels=labels)
    except ValidationError as err:
        raise refused(err, "namespace") from None


@namespace_app.command("add")
def namespace_add(name: str, labels: str = LabelsOption, socket: Path = SocketOption) -> None:
    """Add a namespace (it also carries kubernetes.io/metadata.name=NAME)."""
    parsed = labels_argument(labels)

    def change(state: PodnetState) -> PodnetState:
        if any(n.name == name for n in state.namespaces):
            raise Refused(f"namespace {name!r} already exists")
        return state.model_copy(update={"namespaces": [*state.namespaces, _namespace(name, parsed)]})
    change_state(socket, change)
    typer.echo(f"namespace {name} added")


@namespace_app.command("label")
def namespace_label(name: str, labels: str = typer.Argument(..., help="k=v,k2=v2 (replaces all)"),
                    socket: Path = SocketOption) -> None:
    """Replace a namespace's labels."""
    parsed = labels_argument(labels)

    def change(state: PodnetState) -> PodnetState:
        state.namespace(name)
        return state.model_copy(update={"namespaces": replace(
            state.namespaces, lambda n: n.name, name, _namespace(name, parsed))})
    change_state(socket, change)
    typer.echo(f"namespace {name} labelled {format_labels(parsed)}")


@namespace_app.command("del")
def namespace_del(name: str, socket: Path = SocketOption) -> None:
    """Remove a namespace with its pods and policies, as Kubernetes does."""
    def change(state: PodnetState) -> PodnetState:
        state.namespace(name)
        return state.model_copy(update={
            "namespaces": [n for n in state.namespaces if n.name != name],
            "pods": [p for p in state.pods if p.namespace != name],
            "policies": [p for p in state.policies if p.namespace != name]})
    change_state(socket, change)
    typer.echo(f"namespace {name} removed")


@namespace_app.command("list")
def namespace_list(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Namespaces with their labels and numbers of pods and policies."""
    state = read_state(socket)
    rows: list[dict[str, Any]] = [
        {"name": n.name, "labels": n.effective_labels,
         "pods": sum(p.namespace == n.name for p in state.pods),
         "policies": sum(p.namespace == n.name for p in state.policies)} for n in state.namespaces]
    render(rows, output, lambda: plain_table(
        ["NAME", "LABELS", "PODS", "POLICIES"],
        [(r["name"], format_labels(r["labels"]), r["pods"], r["policies"]) for r in rows], title="namespaces"))
