"""`bpfnet apply -f FILE` and `bpfnet get KIND`: the pod network as Kubernetes objects."""

from __future__ import annotations

from pathlib import Path

import typer

from bpfnet.app.cli import Output, OutputOption, SocketOption, plain_table, render
from bpfnet.cliutil import fail
from bpfnet.configfile import ConfigFileError, read_config_text
from bpfnet.podnet.cli.common import Refused, change_state, read_state
from bpfnet.podnet.config import PodnetState
from bpfnet.podnet.kube import RESOURCES, KubeError, as_list, load_objects, merge, to_objects


def apply(file: str = typer.Option(..., "-f", "--filename", "--file",
                                   help="YAML or JSON: one or several documents, or a List; '-' for stdin"),
          dry_run: bool = typer.Option(False, "--dry-run", help="validate and say what would change; write nothing"),
          socket: Path = SocketOption) -> None:
    """Create or replace Kubernetes objects in the pod network: Node, Namespace, Pod, Service,
    EndpointSlice, NetworkPolicy. All of the file or nothing: one bad object changes nothing.

    Example: bpfnet apply -f shop.yaml"""
    try:
        objects = load_objects(read_config_text(file), file)
    except (ConfigFileError, KubeError) as err:
        fail(str(err))
    if not objects:
        fail(f"{file}: no objects")
    changes: list[str] = []

    def change(state: PodnetState) -> PodnetState:
        try:
            new, done = merge(state, objects)
        except KubeError as err:
            raise Refused(str(err)) from None
        changes[:] = done
        return state if dry_run else new

    change_state(socket, change)
    for line in changes:
        typer.echo(line + (" (dry run)" if dry_run else ""))


def get(resource: str = typer.Argument(..., help="nodes, namespaces, pods, services, networkpolicies "
                                        "(or no, ns, po, svc, netpol)"),
        name: str | None = typer.Argument(None, help="one object by name"),
        namespace: str | None = typer.Option(None, "-n", "--namespace", help="only this namespace"),
        output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Show the pod network's objects as Kubernetes would: `-o yaml` gives a List that
    `bpfnet apply -f` takes back.

    Example: bpfnet get pods -n shop -o yaml"""
    kind = RESOURCES.get(resource.lower())
    if kind is None:
        fail(f"the server doesn't have a resource type {resource!r} (types: {', '.join(sorted(set(RESOURCES)))})")
    try:
        items = to_objects(read_state(socket), kind)
    except KubeError as err:
        fail(str(err))
    items = [o for o in items
             if (namespace is None or o["metadata"].get("namespace") == namespace)
             and (name is None or o["metadata"]["name"] == name)]
    if name is not None and not any(o["kind"] == kind for o in items):
        fail(f'{kind.lower()}s "{name}" not found')
    shown = [o for o in items if o["kind"] == kind]
    render(as_list(items) if name is None else items[0] if len(items) == 1 else as_list(items), output,
           lambda: plain_table(["namespace", "name", "detail"],
                               [(o["metadata"].get("namespace", ""), o["metadata"]["name"], _detail(o))
                                for o in shown]))


def _detail(obj: dict) -> str:
    kind = obj["kind"]
    if kind == "Pod":
        return f"node {obj['spec']['nodeName']}, ip {obj.get('status', {}).get('podIP', '-')}"
    if kind == "Service":
        ports = ",".join(f"{p['port']}/{p['protocol']}" for p in obj["spec"]["ports"])
        return f"{obj['spec']['clusterIP']} {ports}"
    if kind == "Node":
        return f"podCIDR {obj['spec']['podCIDR']}"
    labels = obj["metadata"].get("labels", {})
    return ",".join(f"{k}={v}" for k, v in labels.items()) if kind == "Namespace" else ""
