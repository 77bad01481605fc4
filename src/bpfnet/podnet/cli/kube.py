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


def apply(file: str = typer.Option(..., "-f", "--filename", "--file",
                                   help="YAML or JSON: one or several documents, or a List; '-' for stdin"),
          dry_run: bool = typer.Option(False, "--dry-run", help="check and say what would change; write nothing"),
          socket: Path = SocketOption) -> None:
    """Create or replace Nodes, Namespaces, Pods, Services, EndpointSlices and NetworkPolicies from
    Kubernetes YAML: every document is checked first, then all are written at once (one bad object
    changes nothing).

    Example: bpfnet apply -f shop.yaml"""
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
        return state if dry_run else new
    change_state(socket, change)
    for line in lines:
        typer.echo(line + (" (dry run)" if dry_run else ""))


def get(kind: str = typer.Argument(..., help="nodes, namespaces, pods, services, endpointslices or "
                                   "networkpolicies (or no, ns, po, svc, netpol)"),
        name: str | None = typer.Argument(None, help="one object by name"),
        namespace: str | None = typer.Option(None, "-n", "--namespace", help="only this namespace"),
        output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """The objects of a kind as Kubernetes manifests (`-o yaml` is a List that `bpfnet apply -f`
    takes back) or a table.

    Example: bpfnet get pods -n shop -o yaml"""
    try:
        resource = kind_name(kind)
    except KubeError as err:
        fail(str(err))
    listed = get_objects(read_state(socket), resource)
    items = [i for i in listed["items"]
             if (namespace is None or i["metadata"].get("namespace") == namespace)
             and (name is None or i["metadata"]["name"] == name)]
    if name is not None and not items:
        fail(f'{resource} "{name}" not found')
    render(items[0] if name is not None and len(items) == 1 else {**listed, "items": items}, output,
           lambda: plain_table(["NAMESPACE", "NAME", "LABELS"],
                               [(i["metadata"].get("namespace") or "", i["metadata"]["name"],
                                 ",".join(f"{k}={v}" for k, v in (i["metadata"].get("labels") or {}).items()))
                                for i in items], title=resource))
