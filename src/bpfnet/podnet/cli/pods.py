"""`bpfnet podnet pod add|label|del|list`: network namespaces on a node, optionally serving ports."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

from bpfnet.app.cli import Output, OutputOption, SocketOption, plain_table, render
from bpfnet.cliutil import fail
from bpfnet.podnet.cli.common import (
    LabelsOption,
    Refused,
    change_state,
    format_labels,
    labels_argument,
    pod_key,
    read_state,
    refused,
    replace,
)
from bpfnet.podnet.config import ConfigError, Node, Pod, PodnetState, parse_serve
from bpfnet.podnet.controller import endpoint_rows
from bpfnet.podnet.policy import compile_policy

DEFAULT_NODE = Node(name="node1", pod_cidr="10.244.1.0/24", netns="bpfnet-node1")

pod_app = typer.Typer(help="Pods: network namespaces on a node, optionally serving ports.",
                      no_args_is_help=True)


@pod_app.command("add")
def pod_add(pod: str = typer.Argument(..., help="NAMESPACE/NAME"), labels: str = LabelsOption,
            node: str | None = typer.Option(None, "--node", help="default: the first node"),
            serve: str = typer.Option("", "--serve", help="ports to serve, e.g. 80/tcp,81/udp"),
            socket: Path = SocketOption) -> None:
    """Add a pod: a network namespace on a node with an address from the node's pod CIDR."""
    namespace, name = pod_key(pod)
    parsed = labels_argument(labels)
    try:
        ports = parse_serve(serve)
    except ConfigError as err:
        fail(str(err))

    def change(state: PodnetState) -> PodnetState:
        if any(p.key == pod for p in state.pods):
            raise Refused(f"pod {pod!r} already exists")
        nodes = state.nodes or [DEFAULT_NODE]
        target = node or nodes[0].name
        try:
            new = Pod(namespace=namespace, name=name, labels=parsed, node=target, ports=ports)
        except ValidationError as err:
            raise refused(err, "pod") from None
        return state.model_copy(update={"nodes": nodes, "pods": [*state.pods, new]})
    state = change_state(socket, change)
    typer.echo(f"pod {pod} added on {state.pod(pod).node} with address {state.pod(pod).address}")


@pod_app.command("label")
def pod_label(pod: str = typer.Argument(..., help="NAMESPACE/NAME"),
              labels: str = typer.Argument(..., help="k=v,k2=v2 (replaces all)"),
              socket: Path = SocketOption) -> None:
    """Replace a pod's labels."""
    pod_key(pod)
    parsed = labels_argument(labels)

    def change(state: PodnetState) -> PodnetState:
        current = state.pod(pod)
        return state.model_copy(update={"pods": replace(
            state.pods, lambda p: p.key, pod, current.model_copy(update={"labels": parsed}))})
    change_state(socket, change)
    typer.echo(f"pod {pod} labelled {format_labels(parsed)}")


@pod_app.command("del")
def pod_del(pod: str = typer.Argument(..., help="NAMESPACE/NAME"), socket: Path = SocketOption) -> None:
    """Remove a pod."""
    pod_key(pod)

    def change(state: PodnetState) -> PodnetState:
        state.pod(pod)
        return state.model_copy(update={"pods": [p for p in state.pods if p.key != pod]})
    change_state(socket, change)
    typer.echo(f"pod {pod} removed")


@pod_app.command("list")
def pod_list(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Pods with their node, address and identity."""
    state = read_state(socket)
    rows = endpoint_rows(state, compile_policy(state.with_addresses()))
    render(rows, output, lambda: plain_table(
        ["NAMESPACE", "NAME", "LABELS", "NODE", "ADDRESS", "IDENTITY"],
        [(r["namespace"], r["name"], format_labels(r["labels"]), r["node"], r["address"], r["identity"])
         for r in rows], title="pods"))
