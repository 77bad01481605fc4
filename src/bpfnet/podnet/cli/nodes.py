"""`bpfnet podnet node add|del|list`: network namespaces standing for hosts, each with a pod CIDR."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

from bpfnet.app.cli import Output, OutputOption, SocketOption, plain_table, render
from bpfnet.podnet.cli.common import Refused, change_state, read_state, refused
from bpfnet.podnet.config import Node, PodnetState

node_app = typer.Typer(help="Nodes: network namespaces standing for hosts, each with a pod CIDR.",
                       no_args_is_help=True)


def _free_pod_cidr(state: PodnetState) -> str:
    """The first 10.244.N.0/24 no node uses (as Kubernetes' default cluster CIDR hands them out)."""
    for n in range(1, 256):
        cidr = Node(name="free", pod_cidr=f"10.244.{n}.0/24").pod_cidr
        if not any(node.pod_cidr.overlaps(cidr) for node in state.nodes):
            return str(cidr)
    raise Refused("no free pod CIDR left in 10.244.0.0/16: give one with --pod-cidr")


@node_app.command("add")
def node_add(name: str = typer.Argument(...),
             pod_cidr: str | None = typer.Option(
                 None, "--pod-cidr", help="e.g. 10.244.2.0/24 (default: the next free /24 of 10.244.0.0/16)"),
             netns: str | None = typer.Option(None, "--netns",
                                                 help="namespace standing for the host (default bpfnet-NAME)"),
             root: bool = typer.Option(False, "--root", help="use the root namespace as this node"),
             socket: Path = SocketOption) -> None:
    """Add a node."""
    def change(state: PodnetState) -> PodnetState:
        if any(n.name == name for n in state.nodes):
            raise Refused(f"node {name!r} already exists")
        try:
            node = Node(name=name, pod_cidr=pod_cidr or _free_pod_cidr(state),
                        netns=None if root else (netns or f"bpfnet-{name}"))
        except ValidationError as err:
            raise refused(err, "node") from None
        return state.model_copy(update={"nodes": [*state.nodes, node]})
    node = change_state(socket, change).node(name)
    typer.echo(f"node {name} added with pod CIDR {node.pod_cidr} and underlay address "
               f"{node.underlay_address}")


@node_app.command("del")
def node_del(name: str, socket: Path = SocketOption) -> None:
    """Remove a node that has no pods."""
    def change(state: PodnetState) -> PodnetState:
        state.node(name)
        on = [p.key for p in state.pods if p.node == name]
        if on:
            raise Refused(f"node {name} still has pods: {', '.join(on)}")
        return state.model_copy(update={"nodes": [n for n in state.nodes if n.name != name]})
    change_state(socket, change)
    typer.echo(f"node {name} removed")


@node_app.command("list")
def node_list(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Nodes with their pod CIDR, namespace, addresses and number of pods."""
    state = read_state(socket)
    rows = [{"name": n.name, "pod_cidr": str(n.pod_cidr), "netns": n.netns,
             "router": str(n.router_address), "underlay": str(n.underlay_address),
             "pods": sum(p.node == n.name for p in state.pods)}
            for n in state.nodes]
    render(rows, output, lambda: plain_table(
        ["NAME", "POD CIDR", "NETNS", "ROUTER", "UNDERLAY", "PODS"],
        [(r["name"], r["pod_cidr"], r["netns"] or "(root)", r["router"], r["underlay"], r["pods"]) for r in rows],
        title="nodes"))
