"""`bpfnet podnet ...`: nodes, namespaces, pods, NetworkPolicies, endpoints and probes.

Verbs that change state read the podnet state from the agent, change it and put it back (the
agent's store is the one source of truth); `probe` runs real connections from this machine.
The sub-apps are also exported one by one so they can be mounted at the top level as the issue
spells them (`bpfnet namespace add`, `bpfnet pod add`, `bpfnet policy apply`, `bpfnet probe`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bpfnet.app.client import AgentClient, AgentRequestError
from bpfnet.app.paths import DEFAULT_SOCKET
from bpfnet.cliutil import add_plain_row
from bpfnet.cliutil import fail as _fail
from bpfnet.configfile import ConfigFileError, read_config_text
from bpfnet.errors import BpfnetError
from bpfnet.podnet.config import (
    ConfigError,
    Namespace,
    Node,
    Pod,
    PodnetState,
    describe_validation_error,
    load_policies,
    parse_labels,
    parse_serve,
)
from bpfnet.podnet.controller import endpoint_rows
from bpfnet.podnet.flows import Endpoint, Flow, compact, parse_filters
from bpfnet.podnet.policy import compile_policy

APP = "podnet"
DEFAULT_NODE = Node(name="node1", pod_cidr="10.244.1.0/24", netns="bpfnet-node1")

app = typer.Typer(help="Pods, identities and Kubernetes NetworkPolicy enforced in eBPF.",
                  no_args_is_help=True)
node_app = typer.Typer(help="Nodes: network namespaces standing for hosts, each with a pod CIDR.",
                       no_args_is_help=True)
namespace_app = typer.Typer(help="Namespaces and their labels.", no_args_is_help=True)
pod_app = typer.Typer(help="Pods: network namespaces on a node, optionally serving ports.",
                      no_args_is_help=True)
policy_app = typer.Typer(help="Kubernetes NetworkPolicies (networking.k8s.io/v1).",
                         no_args_is_help=True)
endpoint_app = typer.Typer(help="Endpoints as the data plane sees them.", no_args_is_help=True)
app.add_typer(node_app, name="node")
app.add_typer(namespace_app, name="namespace")
app.add_typer(pod_app, name="pod")
app.add_typer(policy_app, name="policy")
app.add_typer(endpoint_app, name="endpoint")

SocketOption = typer.Option(DEFAULT_SOCKET, "--socket", help="the agent's unix socket")
OutputOption = typer.Option("table", "-o", "--output", help="table or json")
LabelsOption = typer.Option("", "--labels", "-l", help="labels: k=v,k2=v2")


class _Refused(BpfnetError):
    """A change that cannot be made; carries the one-line message for the user."""


def _parse_state(raw: dict) -> PodnetState:
    try:
        return PodnetState.model_validate(raw)
    except ValidationError as err:
        raise _Refused(describe_validation_error(err)) from None


def dump_state(state: PodnetState) -> dict:
    return state.model_dump(mode="json", by_alias=True, exclude_none=True)


def _change(socket: Path, change: Callable[[PodnetState], PodnetState]) -> PodnetState:
    """Read-modify-write the agent's podnet state; the result is validated before it is sent."""
    result: list[PodnetState] = []

    def apply(raw: dict) -> dict:
        try:
            new = change(_parse_state(raw))
            new = PodnetState.model_validate(dump_state(new)).with_addresses()
            compile_policy(new)
        except ValidationError as err:
            raise _Refused(describe_validation_error(err)) from None
        except ConfigError as err:
            raise _Refused(str(err)) from None
        result[:] = [new]
        return dump_state(new)

    try:
        with AgentClient(socket) as client:
            client.update_state(APP, apply)
    except _Refused as err:
        _fail(str(err))
    except AgentRequestError as err:
        _fail(str(err))
    return result[0]


def _read(socket: Path) -> PodnetState:
    try:
        with AgentClient(socket) as client:
            return _parse_state(client.get_state(APP))
    except (AgentRequestError, _Refused) as err:
        _fail(str(err))


def _pod_key(text: str) -> tuple[str, str]:
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name:
        _fail(f"pod {text!r}: use NAMESPACE/NAME")
    return namespace, name


def _labels(text: str) -> dict[str, str]:
    try:
        return parse_labels(text)
    except ConfigError as err:
        _fail(str(err))


def _print_table(title: str, columns: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        add_plain_row(table, *row)
    Console().print(table)


def _format_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _replace(items: list, key: Callable, wanted: str, new) -> list:
    return [new if key(item) == wanted else item for item in items]


# --- nodes ---------------------------------------------------------------------------------------

def _free_pod_cidr(state: PodnetState) -> str:
    """The first 10.244.N.0/24 no node uses (as Kubernetes' default cluster CIDR hands them out)."""
    for n in range(1, 256):
        cidr = Node(name="free", pod_cidr=f"10.244.{n}.0/24").pod_cidr
        if not any(node.pod_cidr.overlaps(cidr) for node in state.nodes):
            return str(cidr)
    raise _Refused("no free pod CIDR left in 10.244.0.0/16: give one with --pod-cidr")


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
            raise _Refused(f"node {name!r} already exists")
        try:
            node = Node(name=name, pod_cidr=pod_cidr or _free_pod_cidr(state),
                        netns=None if root else (netns or f"bpfnet-{name}"))
        except ValidationError as err:
            raise _Refused(describe_validation_error(err, "node")) from None
        return state.model_copy(update={"nodes": [*state.nodes, node]})
    node = _change(socket, change).node(name)
    typer.echo(f"node {name} added with pod CIDR {node.pod_cidr} and underlay address "
               f"{node.underlay_address}")


@node_app.command("del")
def node_del(name: str, socket: Path = SocketOption) -> None:
    """Remove a node that has no pods."""
    def change(state: PodnetState) -> PodnetState:
        state.node(name)
        on = [p.key for p in state.pods if p.node == name]
        if on:
            raise _Refused(f"node {name} still has pods: {', '.join(on)}")
        return state.model_copy(update={"nodes": [n for n in state.nodes if n.name != name]})
    _change(socket, change)
    typer.echo(f"node {name} removed")


@node_app.command("list")
def node_list(output: str = OutputOption, socket: Path = SocketOption) -> None:
    state = _read(socket)
    rows = [{"name": n.name, "pod_cidr": str(n.pod_cidr), "netns": n.netns,
             "router": str(n.router_address), "underlay": str(n.underlay_address),
             "pods": sum(p.node == n.name for p in state.pods)}
            for n in state.nodes]
    if output == "json":
        return _print_json(rows)
    _print_table("nodes", ["NAME", "POD CIDR", "NETNS", "ROUTER", "UNDERLAY", "PODS"],
                 [[r["name"], r["pod_cidr"], r["netns"] or "(root)", r["router"], r["underlay"],
                   r["pods"]] for r in rows])


# --- namespaces ----------------------------------------------------------------------------------

def _namespace(name: str, labels: dict[str, str]) -> Namespace:
    try:
        return Namespace(name=name, labels=labels)
    except ValidationError as err:
        raise _Refused(describe_validation_error(err, "namespace")) from None


@namespace_app.command("add")
def namespace_add(name: str, labels: str = LabelsOption, socket: Path = SocketOption) -> None:
    """Add a namespace (it also carries kubernetes.io/metadata.name=NAME)."""
    parsed = _labels(labels)

    def change(state: PodnetState) -> PodnetState:
        if any(n.name == name for n in state.namespaces):
            raise _Refused(f"namespace {name!r} already exists")
        return state.model_copy(update={"namespaces": [*state.namespaces, _namespace(name, parsed)]})
    _change(socket, change)
    typer.echo(f"namespace {name} added")


@namespace_app.command("label")
def namespace_label(name: str, labels: str = typer.Argument(..., help="k=v,k2=v2 (replaces all)"),
                    socket: Path = SocketOption) -> None:
    """Replace a namespace's labels."""
    parsed = _labels(labels)

    def change(state: PodnetState) -> PodnetState:
        state.namespace(name)
        return state.model_copy(update={"namespaces": _replace(
            state.namespaces, lambda n: n.name, name, _namespace(name, parsed))})
    _change(socket, change)
    typer.echo(f"namespace {name} labelled {_format_labels(parsed)}")


@namespace_app.command("del")
def namespace_del(name: str, socket: Path = SocketOption) -> None:
    """Remove a namespace with its pods and policies, as Kubernetes does."""
    def change(state: PodnetState) -> PodnetState:
        state.namespace(name)
        return state.model_copy(update={
            "namespaces": [n for n in state.namespaces if n.name != name],
            "pods": [p for p in state.pods if p.namespace != name],
            "policies": [p for p in state.policies if p.namespace != name]})
    _change(socket, change)
    typer.echo(f"namespace {name} removed")


@namespace_app.command("list")
def namespace_list(output: str = OutputOption, socket: Path = SocketOption) -> None:
    state = _read(socket)
    rows: list[dict[str, Any]] = [
        {"name": n.name, "labels": n.effective_labels,
         "pods": sum(p.namespace == n.name for p in state.pods),
         "policies": sum(p.namespace == n.name for p in state.policies)} for n in state.namespaces]
    if output == "json":
        return _print_json(rows)
    _print_table("namespaces", ["NAME", "LABELS", "PODS", "POLICIES"],
                 [[r["name"], _format_labels(r["labels"]), r["pods"], r["policies"]] for r in rows])


# --- pods ----------------------------------------------------------------------------------------

@pod_app.command("add")
def pod_add(pod: str = typer.Argument(..., help="NAMESPACE/NAME"), labels: str = LabelsOption,
            node: str | None = typer.Option(None, "--node", help="default: the first node"),
            serve: str = typer.Option("", "--serve", help="ports to serve, e.g. 80/tcp,81/udp"),
            socket: Path = SocketOption) -> None:
    """Add a pod: a network namespace on a node with an address from the node's pod CIDR."""
    namespace, name = _pod_key(pod)
    parsed = _labels(labels)
    try:
        ports = parse_serve(serve)
    except ConfigError as err:
        _fail(str(err))

    def change(state: PodnetState) -> PodnetState:
        if any(p.key == pod for p in state.pods):
            raise _Refused(f"pod {pod!r} already exists")
        nodes = state.nodes or [DEFAULT_NODE]
        target = node or nodes[0].name
        try:
            new = Pod(namespace=namespace, name=name, labels=parsed, node=target, ports=ports)
        except ValidationError as err:
            raise _Refused(describe_validation_error(err, "pod")) from None
        return state.model_copy(update={"nodes": nodes, "pods": [*state.pods, new]})
    state = _change(socket, change)
    typer.echo(f"pod {pod} added on {state.pod(pod).node} with address {state.pod(pod).address}")


@pod_app.command("label")
def pod_label(pod: str = typer.Argument(..., help="NAMESPACE/NAME"),
              labels: str = typer.Argument(..., help="k=v,k2=v2 (replaces all)"),
              socket: Path = SocketOption) -> None:
    """Replace a pod's labels."""
    _pod_key(pod)
    parsed = _labels(labels)

    def change(state: PodnetState) -> PodnetState:
        current = state.pod(pod)
        return state.model_copy(update={"pods": _replace(
            state.pods, lambda p: p.key, pod, current.model_copy(update={"labels": parsed}))})
    _change(socket, change)
    typer.echo(f"pod {pod} labelled {_format_labels(parsed)}")


@pod_app.command("del")
def pod_del(pod: str = typer.Argument(..., help="NAMESPACE/NAME"), socket: Path = SocketOption) -> None:
    """Remove a pod."""
    _pod_key(pod)

    def change(state: PodnetState) -> PodnetState:
        state.pod(pod)
        return state.model_copy(update={"pods": [p for p in state.pods if p.key != pod]})
    _change(socket, change)
    typer.echo(f"pod {pod} removed")


@pod_app.command("list")
def pod_list(output: str = OutputOption, socket: Path = SocketOption) -> None:
    """Pods with their node, address and identity."""
    state = _read(socket)
    rows = endpoint_rows(state, compile_policy(state.with_addresses()))
    if output == "json":
        return _print_json(rows)
    _print_table("pods", ["NAMESPACE", "NAME", "LABELS", "NODE", "ADDRESS", "IDENTITY"],
                 [[r["namespace"], r["name"], _format_labels(r["labels"]), r["node"], r["address"],
                   r["identity"]] for r in rows])


# --- policies ------------------------------------------------------------------------------------

@policy_app.command("apply")
def policy_apply(file: str = typer.Option(..., "-f", "--file", help="YAML or JSON, '-' for stdin"),
                 socket: Path = SocketOption) -> None:
    """Create or replace NetworkPolicies (one or many documents)."""
    try:
        policies = load_policies(read_config_text(file), file)
    except (ConfigFileError, ConfigError) as err:
        _fail(str(err))
    outcome: dict[str, str] = {}

    def change(state: PodnetState) -> PodnetState:
        current = {p.key: p for p in state.policies}
        for policy in policies:
            outcome[policy.key] = ("unchanged" if current.get(policy.key) == policy else
                                   "configured" if policy.key in current else "created")
            current[policy.key] = policy
        return state.model_copy(update={"policies": list(current.values())})
    _change(socket, change)
    for key, what in outcome.items():
        typer.echo(f"networkpolicy {key} {what}")


@policy_app.command("delete")
def policy_delete(policy: str = typer.Argument(..., help="NAMESPACE/NAME"),
                  socket: Path = SocketOption) -> None:
    _pod_key(policy)

    def change(state: PodnetState) -> PodnetState:
        if not any(p.key == policy for p in state.policies):
            raise _Refused(f"policy {policy!r} does not exist")
        return state.model_copy(update={"policies": [p for p in state.policies if p.key != policy]})
    _change(socket, change)
    typer.echo(f"networkpolicy {policy} deleted")


@policy_app.command("list")
def policy_list(output: str = OutputOption, socket: Path = SocketOption) -> None:
    state = _read(socket)
    if output == "json":
        return _print_json([p.dump() for p in state.policies])
    if output == "yaml":
        return print(yaml.safe_dump_all([p.dump() for p in state.policies], sort_keys=False), end="")
    rows = []
    for p in state.policies:
        selector = p.spec.pod_selector.model_dump(by_alias=True, exclude_defaults=True)
        rows.append([p.namespace, p.metadata.name, json.dumps(selector) if selector else "{} (all)",
                     ",".join(sorted(p.spec.effective_policy_types)), len(p.spec.ingress),
                     len(p.spec.egress)])
    _print_table("networkpolicies", ["NAMESPACE", "NAME", "POD-SELECTOR", "TYPES", "INGRESS RULES",
                                     "EGRESS RULES"], rows)


# --- endpoints, probes, stats ----------------------------------------------------------------------

@endpoint_app.command("show")
def endpoint_show(pod: str = typer.Argument(..., help="NAMESPACE/NAME"), output: str = OutputOption,
                  socket: Path = SocketOption) -> None:
    """Identity, selecting policies and the compiled policy map entries (with hits) of a pod."""
    _pod_key(pod)
    try:
        with AgentClient(socket) as client:
            shown = client.query(APP, "endpoint", pod=pod)
    except AgentRequestError as err:
        _fail(str(err))
    if output == "json":
        return _print_json(shown)
    console = Console()
    console.print(f"[bold]{escape(shown['pod'])}[/] on {escape(shown['node'])}, address {shown['address']}, "
                  f"identity {shown['identity']} ({escape(_format_labels(shown['labels']))})")
    for direction in ("Ingress", "Egress"):
        isolated = shown[f"{direction.lower()}_isolated"]
        by = ", ".join(shown["selected_by"][direction]) or "-"
        console.print(escape(f"{direction}: {'isolated by ' + by if isolated else 'not isolated (allow all)'}"))
    _print_table("policy map entries", ["DIRECTION", "IDENTITY", "REMOTE", "PORTS", "PREFIX", "HITS"],
                 [[e["direction"], e["identity"], e["remote"], e["ports"], e["prefixlen"], e["hits"]]
                  for e in shown["entries"]])


@app.command("probe")
def probe(source: str | None = typer.Argument(None, help="NAMESPACE/NAME (default: every pod)"),
          destination: str | None = typer.Argument(None, help="NAMESPACE/NAME (default: every pod)"),
          port: int = typer.Option(80, "--port"),
          protocol: str = typer.Option("tcp", "--protocol", help="tcp or udp"),
          timeout: float = typer.Option(1.0, "--timeout", help="seconds per probe"),
          output: str = OutputOption, socket: Path = SocketOption) -> None:
    """Real connections between pods, in parallel: '.' reachable, 'X' blocked."""
    from bpfnet.podnet.pods import pod_netns
    from bpfnet.podnet.probe import Probe, format_matrix, run_probes

    if protocol.lower() not in ("tcp", "udp"):
        _fail(f"protocol {protocol!r}: use tcp or udp")
    state = _read(socket)
    try:
        sources = [state.pod(source)] if source else state.pods
        targets = [state.pod(destination)] if destination else state.pods
    except ConfigError as err:
        _fail(str(err))
    pairs = [(a, b) for a in sources for b in targets]
    probes = [Probe(pod_netns(state.node(a.node), a), b.ip, port, protocol.upper()) for a, b in pairs]
    results = run_probes(probes, timeout)
    matrix: dict[str, dict[str, bool | None]] = {a.key: {} for a in sources}
    for (a, b), ok in zip(pairs, results, strict=False):
        matrix[a.key][b.key] = ok
    if output == "json":
        return _print_json(matrix)
    if source and destination:
        return typer.echo(f"{source} -> {destination} {port}/{protocol.lower()}: "
                          f"{'reachable' if results[0] else 'blocked'}")
    typer.echo(format_matrix(matrix) if not (source or destination) else
               "\n".join(f"{a} -> {b}: {'.' if ok else 'X'}" for a, row in matrix.items()
                         for b, ok in row.items()))


# --- flows ---------------------------------------------------------------------------------------

OBSERVE_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
FOLLOW_POLL_SECONDS = 0.5


def _flow_from_dict(raw: dict) -> Flow:
    def endpoint(side: dict) -> Endpoint:
        return Endpoint(**{**side, "labels": tuple(side["labels"])})
    return Flow(**{**raw, "source": endpoint(raw["source"]), "destination": endpoint(raw["destination"]),
                   "tcp_flags": tuple(raw["tcp_flags"])})


def _print_flows(flows: list[Flow], output: str) -> None:
    if output == "json":
        for flow in flows:
            typer.echo(flow.to_json())
    elif output == "table":
        _print_table("flows", ["TIME", "NODE", "SOURCE", "DESTINATION", "PROTOCOL", "FLAGS", "DIRECTION",
                               "VERDICT", "REASON"],
                     [[time.strftime("%H:%M:%S", time.localtime(f.time)), f.node,
                       f"{f.source.name}:{f.source.port}", f"{f.destination.name}:{f.destination.port}",
                       f.protocol, ",".join(f.tcp_flags), f.direction + (" reply" if f.is_reply else ""),
                       f.verdict, f.drop_reason] for f in flows])
    else:
        for flow in flows:
            typer.echo(compact(flow))


def _warn_lost(lost: int, shown: int) -> int:
    """Tell (on stderr) how many flow events the kernel could not record, when that grew."""
    if lost > shown:
        typer.echo(f"warning: {lost} flow events lost in the data plane (ring buffer full)", err=True)
    return lost


@app.command("observe", context_settings=OBSERVE_CONTEXT)
def observe(ctx: typer.Context,
            last: int | None = typer.Option(None, "--last", min=1,
                                               help="the last N matching flows (default 20; with --follow: none)"),
            follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new flows until Ctrl-C"),
            output: str = typer.Option("compact", "-o", "--output", help="compact, table or json (JSON lines)"),
            socket: Path = SocketOption) -> None:
    """Flow events (Hubble-like). Filters: --from-pod, --to-pod, --pod NS/NAME; --namespace,
    --label k=v, --from-identity, --to-identity, --verdict forwarded|dropped, --drop-reason
    NAME, --port, --protocol, --tcp-flags SYN,ACK, --since 5m, and their --from-/--to- forms.
    Values of one flag are ORed, different flags ANDed; --not negates the next filter."""
    tokens = list(ctx.args)
    if output not in ("compact", "table", "json"):
        _fail(f"--output {output!r}: use compact, table or json")
    try:
        parse_filters(tokens)
    except ValueError as err:
        _fail(str(err))
    filters = json.dumps(tokens)
    try:
        with AgentClient(socket) as client:
            if follow and last is None:
                answer = client.query(APP, "flows", filters=filters, last=1)
                answer["flows"] = []
            else:
                answer = client.query(APP, "flows", filters=filters, last=last or 20)
            _print_flows([_flow_from_dict(f) for f in answer["flows"]], output)
            lost = _warn_lost(answer["lost_events"], 0)
            while follow:
                time.sleep(FOLLOW_POLL_SECONDS)
                answer = client.query(APP, "flows", filters=filters, since_seen=answer["seen"])
                _print_flows([_flow_from_dict(f) for f in answer["flows"]], output)
                lost = _warn_lost(answer["lost_events"], lost)
    except AgentRequestError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        pass


@app.command("stats")
def stats(output: str = OutputOption, socket: Path = SocketOption) -> None:
    """Counters: pods, identities, policy entries, packets per outcome and drop reason."""
    try:
        with AgentClient(socket) as client:
            values = client.stats(APP)
    except AgentRequestError as err:
        _fail(str(err))
    if output == "json":
        return _print_json(values)
    packets = values.pop("packets", {})
    nested = {k: values.pop(k) for k in [k for k, v in values.items() if isinstance(v, dict)]}
    _print_table("podnet", ["COUNTER", "VALUE"],
                 [[k, v] for k, v in values.items()] + [[f"packets {k}", v] for k, v in sorted(packets.items())]
                 + [[f"{group} {k}", v] for group, inner in nested.items() for k, v in _flatten(inner)])


def _flatten(value: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        rows.extend(_flatten(item, name + " ") if isinstance(item, dict) else [(name, item)])
    return rows


def mount(root: typer.Typer) -> None:
    """Mount podnet on the `bpfnet` command: `bpfnet podnet ...` and, as issue 6 spells them, the
    top-level verbs `bpfnet node|namespace|pod|policy|endpoint ...`, `bpfnet probe` and (issue 7)
    `bpfnet observe`."""
    root.add_typer(app, name="podnet")
    for name, sub in (("node", node_app), ("namespace", namespace_app), ("pod", pod_app),
                      ("policy", policy_app), ("endpoint", endpoint_app)):
        root.add_typer(sub, name=name)
    root.command("probe")(probe)
    root.command("observe", context_settings=OBSERVE_CONTEXT)(observe)
