"""`bpfnet apply -f FILE` and `bpfnet get KIND`: the podnet state as Kubernetes objects."""

from __future__ import annotations

from pathlib import Path

import typer

from bpfnet.app.cli import Output, OutputOption, SocketOption, plain_table, render
from bpfnet.cliutil import fail
from bpfnet.configfile import ConfigFileError, read_config_text
from bpfnet.podnet.cli.common import Refused, change_state, read_state
from bpfnet.podnet.config import PodnetState
from bpfnet.podnet.kube import KubeError, apply_objects, get_objects, kind_name, load_objects


def apply(file: str = typer.Option(..., "-f", "--filename", help="YAML or JSON, '-' for stdin"),
          socket: Path = SocketOption) -> None:
    """Create or replace Nodes, Namespaces, Pods, Services, EndpointSlices and NetworkPolicies from
    Kubernetes YAML: every document is checked first, then all are written at once."""
    try:
        objects = load_objects(read_config_text(file), file)
    except (ConfigFileError, KubeError) as err:
        fail(str(err))
    lines: list[str] = []

    def change(state: PodnetState) -> PodnetState:
        try:
            new, done = apply_objects(state, objects)
        except KubeError as err:
            raise Refused(f"{file}: {err}") from None
        lines[:] = done
        return new
    change_state(socket, change)
    for line in lines:
        typer.echo(line)


def get(kind: str = typer.Argument(..., help="nodes, namespaces, pods, services or networkpolicies"),
        output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """The objects of a kind as Kubernetes manifests (`-o yaml` can be applied back) or a table."""
    try:
        name = kind_name(kind)
    except KubeError as err:
        fail(str(err))
    listed = get_objects(read_state(socket), name)
    render(listed, output, lambda: plain_table(
        ["NAMESPACE", "NAME", "LABELS"],
        [(i["metadata"].get("namespace"), i["metadata"]["name"],
          ",".join(f"{k}={v}" for k, v in (i["metadata"].get("labels") or {}).items()))
         for i in listed["items"]], title=name))
