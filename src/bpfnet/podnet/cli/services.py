"""`bpfnet service add|del|list`: Kubernetes-style services served by socket-level load balancing.

    bpfnet service add shop/db --vip 10.96.0.10:80/tcp --selector app=db --target-port 80
    bpfnet service add shop/api --vip 10.96.0.11:8080/tcp --backend shop/api-1:8080 --backend shop/api-2:8080
    bpfnet service list
"""

from __future__ import annotations

import re
from pathlib import Path

import typer

from bpfnet.app.cli import Output, OutputOption, SocketOption, call_agent, plain_table, render
from bpfnet.cliutil import fail
from bpfnet.podnet.cli.common import APP, Refused, change_state, labels_argument, pod_key
from bpfnet.podnet.config import PodnetState, Service, ServiceBackend

service_app = typer.Typer(help="Services: a virtual address whose connections go to backend pods, chosen at "
                               "connect()/sendmsg() by cgroup hooks (no per-packet NAT).", no_args_is_help=True)
_VIP = re.compile(r"^(\d+\.\d+\.\d+\.\d+):(\d+)(?:/(tcp|udp))?$", re.IGNORECASE)


def _vip(text: str) -> tuple[str, int, str]:
    match = _VIP.match(text.strip())
    if not match:
        fail(f"--vip {text!r}: use ADDRESS:PORT/PROTO, e.g. 10.96.0.10:80/tcp")
    return match[1], int(match[2]), (match[3] or "tcp").upper()


def _backend(text: str, namespace: str) -> ServiceBackend:
    pod, colon, port = text.rpartition(":")
    pod_namespace, slash, name = pod.partition("/")
    if not colon or not slash or not name or not port:
        fail(f"--backend {text!r}: use NAMESPACE/POD:PORT")
    if pod_namespace != namespace:
        fail(f"--backend {text!r}: backends live in the service's namespace {namespace!r}")
    return ServiceBackend(pod=name, port=int(port) if port.isdigit() else port)


@service_app.command("add")
def add(service: str = typer.Argument(..., help="NAMESPACE/NAME"),
        vip: str = typer.Option(..., "--vip", help="ADDRESS:PORT/PROTO the pods connect to"),
        backend: list[str] | None = typer.Option(None, "--backend", help="NAMESPACE/POD:PORT, repeatable"),
        selector: str | None = typer.Option(None, "--selector", help="k=v,... pods of the namespace"),
        target_port: str | None = typer.Option(None, "--target-port", help="with --selector: port or name"),
        affinity: str = typer.Option("none", "--affinity", help="none or client-ip"),
        socket: Path = SocketOption) -> None:
    """Add (or replace) a service."""
    namespace, name = pod_key(service)
    address, port, protocol = _vip(vip)
    if affinity not in ("none", "client-ip"):
        fail(f"--affinity {affinity!r}: use none or client-ip")
    if bool(backend) == bool(selector):
        fail("give --backend (one or more) or --selector with --target-port")
    target = int(target_port) if target_port and target_port.isdigit() else target_port
    new = dict(namespace=namespace, name=name, address=address, port=port, protocol=protocol,
               backends=[_backend(b, namespace) for b in backend or []],
               selector=labels_argument(selector) if selector else None, target_port=target,
               affinity=affinity)

    def change(state: PodnetState) -> PodnetState:
        svc = Service.model_validate(new)
        others = [s for s in state.services if s.key != svc.key]
        return state.model_copy(update={"services": others + [svc]})

    change_state(socket, change)
    typer.echo(f"service {namespace}/{name} at {address}:{port}/{protocol.lower()}")


@service_app.command("del")
def delete(service: str = typer.Argument(..., help="NAMESPACE/NAME"), socket: Path = SocketOption) -> None:
    """Delete a service; its address stops answering at once."""
    key = "/".join(pod_key(service))

    def change(state: PodnetState) -> PodnetState:
        if not any(s.key == key for s in state.services):
            raise Refused(f"service {key!r} does not exist")
        return state.model_copy(update={"services": [s for s in state.services if s.key != key]})

    change_state(socket, change)
    typer.echo(f"service {key} deleted")


@service_app.command("list")
def list_(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Services with their current backends and connection counts."""
    rows = call_agent(socket, lambda client: client.query(APP, "services"))
    # Socket LB: connects, datagrams, refused; tc fallback: flows and packets it translated.
    render(rows, output, lambda: plain_table(
        ["SERVICE", "VIP", "BACKENDS", "AFFINITY", "CONNECTS", "DATAGRAMS", "REFUSED", "TC FLOWS", "TC PACKETS"],
        [(f"{r['namespace']}/{r['name']}", r["vip"], " ".join(r["backends"]) or "-", r["affinity"], r["connects"],
          r["datagrams"], r["refused"], r["fallback_flows"], r["fallback_packets"]) for r in rows],
        title="services"))
