"""`bpfnet lb ...`: VIPs and reals (through the agent), `apply -f lb.yaml`, stats, `flow`, `ring`, `health`.

Every change reads the state from the agent, edits it, validates it locally (a clear error before any
request) and writes it back; the agent's store stays the one source of truth.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from pathlib import Path

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bpfnet.app.client import AgentClient, AgentRequestError
from bpfnet.app.paths import DEFAULT_SOCKET
from bpfnet.cliutil import fail as _fail
from bpfnet.cliutil import validation_message as _validation_message
from bpfnet.configfile import ConfigFileError, load_config_file
from bpfnet.lb.config import FLAG_BITS, LbState, parse_vip_name, vip_name

app = typer.Typer(help="L4 load balancer: VIPs, reals, Maglev rings, XDP encapsulation to the reals.",
                  no_args_is_help=True)
vip_app = typer.Typer(help="Add, delete and list VIPs.", no_args_is_help=True)
real_app = typer.Typer(help="Add, delete, re-weight, drain and list the reals of a VIP.", no_args_is_help=True)
app.add_typer(vip_app, name="vip")
app.add_typer(real_app, name="real")

SocketOption = typer.Option(DEFAULT_SOCKET, "--socket", help="the agent's unix socket")
FLAG_HELP = f"one of {', '.join(FLAG_BITS)} (repeatable)"
OutputOption = typer.Option("table", "-o", "--output", help="table or json")


def _validated(state: dict) -> dict:
    try:
        return LbState.model_validate(state).model_dump(mode="json")
    except ValidationError as err:
        _fail(_validation_message(err))


def _client(socket: Path) -> AgentClient:
    return AgentClient(socket)


def _change(socket: Path, change: Callable[[dict], dict]) -> dict:
    try:
        with _client(socket) as client:
            return client.update_state("lb", lambda state: _validated(change(state)))
    except AgentRequestError as err:
        _fail(str(err))


def _ask(socket: Path, call: Callable[[AgentClient], object]):
    try:
        with _client(socket) as client:
            return call(client)
    except AgentRequestError as err:
        _fail(str(err))


def _vip_key(text: str) -> str:
    """Canonical VIP name ('10.0.0.1:80/tcp'), or a one-line error."""
    try:
        return vip_name(*parse_vip_name(text))
    except ValueError as err:
        _fail(str(err))


def _find_vip(state: dict, name: str) -> dict:
    for vip in state.get("vips", []):
        if vip_name(ipaddress.ip_address(vip["address"]), vip["port"], vip.get("protocol", "tcp")) == name:
            return vip
    names = [vip_name(ipaddress.ip_address(v["address"]), v["port"], v.get("protocol", "tcp"))
             for v in state.get("vips", [])]
    _fail(f"no VIP {name} (VIPs: {', '.join(names) or 'none'})")


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        _fail(f"{text!r} is not an IP address")


def _add_row(table: Table, *cells: str) -> None:
    """A row of plain text: '[fc00::1]:80/tcp' is a VIP, not rich markup."""
    table.add_row(*(escape(cell) for cell in cells))


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


# --- VIPs ----------------------------------------------------------------------------------------

@vip_app.command("add")
def vip_add(
    vip: str = typer.Argument(
        ..., help="ADDRESS:PORT/PROTO, e.g. 10.200.0.1:80/tcp, [fc00::1]:443/udp; port 0 = every port"),
    flag: list[str] = typer.Option([], "--flag", help=FLAG_HELP),
    maglev: str = typer.Option("v2", "--maglev", help="v2 (shares follow weights) or v1 (Katran's default)"),
    health: str | None = typer.Option(None, "--health", help="health check: tcp, http or udp"),
    health_path: str = typer.Option("/", "--health-path", help="http health check path"),
    health_port: int | None = typer.Option(None, "--health-port", help="probe this port (default: the VIP's)"),
    socket: Path = SocketOption,
) -> None:
    """Add a VIP (without reals: traffic to it is dropped until reals are added)."""
    name = _vip_key(vip)
    address, port, protocol = parse_vip_name(name)
    entry: dict = {"address": str(address), "port": port, "protocol": protocol, "flags": flag,
                   "maglev": maglev, "reals": []}
    if health:
        entry["health_check"] = {"kind": health, "path": health_path, "port": health_port}

    def change(state: dict) -> dict:
        if any(vip_name(ipaddress.ip_address(v["address"]), v["port"], v.get("protocol", "tcp")) == name
               for v in state.get("vips", [])):
            _fail(f"VIP {name} exists already")
        state.setdefault("vips", []).append(entry)
        return state

    _change(socket, change)
    typer.echo(f"added VIP {name}")


@vip_app.command("del")
def vip_del(vip: str = typer.Argument(...), socket: Path = SocketOption) -> None:
    """Delete a VIP and its ring."""
    name = _vip_key(vip)

    def change(state: dict) -> dict:
        target = _find_vip(state, name)
        state["vips"] = [v for v in state["vips"] if v is not target]
        return state

    _change(socket, change)
    typer.echo(f"deleted VIP {name}")


@vip_app.command("list")
def vip_list(output: str = OutputOption, socket: Path = SocketOption) -> None:
    """VIPs with their reals, flags and traffic."""
    state = LbState.model_validate(_ask(socket, lambda c: c.get_state("lb")))
    stats = _ask(socket, lambda c: c.stats("lb")) if state.vips else {}
    rows = [{"vip": v.name, "flags": v.flags, "maglev": v.maglev, "reals": len(v.reals),
             "weights": {str(r.address): r.weight for r in v.reals},
             "health_check": v.health_check.kind if v.health_check else None,
             "packets": stats.get("vip_packets", {}).get(v.name, 0),
             "bytes": stats.get("vip_bytes", {}).get(v.name, 0)} for v in state.vips]
    if output == "json":
        _print_json(rows)
        return
    table = Table("VIP", "flags", "maglev", "reals", "health", "packets", "bytes")
    for row in rows:
        _add_row(table, row["vip"], ",".join(row["flags"]) or "-", row["maglev"], str(row["reals"]),
                      row["health_check"] or "-", str(row["packets"]), str(row["bytes"]))
    Console().print(table)


# --- reals ---------------------------------------------------------------------------------------

def _set_weight(socket: Path, vip: str, address: str, weight: int, verb: str) -> None:
    name, address = _vip_key(vip), _address(address)

    def change(state: dict) -> dict:
        target = _find_vip(state, name)
        for real in target["reals"]:
            if str(ipaddress.ip_address(real["address"])) == address:
                real["weight"] = weight
                return state
        _fail(f"VIP {name} has no real {address}")

    _change(socket, change)
    typer.echo(f"{verb} real {address} of VIP {name}")


@real_app.command("add")
def real_add(vip: str = typer.Argument(...), address: str = typer.Argument(...),
             weight: int = typer.Option(1, "--weight", "-w", help="share of new flows (0 = drained)"),
             socket: Path = SocketOption) -> None:
    """Add a real to a VIP."""
    name, address = _vip_key(vip), _address(address)

    def change(state: dict) -> dict:
        target = _find_vip(state, name)
        if any(str(ipaddress.ip_address(r["address"])) == address for r in target["reals"]):
            _fail(f"VIP {name} has real {address} already (use `bpfnet lb real weight`)")
        target["reals"].append({"address": address, "weight": weight})
        return state

    _change(socket, change)
    typer.echo(f"added real {address} (weight {weight}) to VIP {name}")


@real_app.command("del")
def real_del(vip: str = typer.Argument(...), address: str = typer.Argument(...),
             socket: Path = SocketOption) -> None:
    """Remove a real from a VIP: its flows move to the other reals."""
    name, address = _vip_key(vip), _address(address)

    def change(state: dict) -> dict:
        target = _find_vip(state, name)
        kept = [r for r in target["reals"] if str(ipaddress.ip_address(r["address"])) != address]
        if len(kept) == len(target["reals"]):
            _fail(f"VIP {name} has no real {address}")
        target["reals"] = kept
        return state

    _change(socket, change)
    typer.echo(f"deleted real {address} from VIP {name}")


@real_app.command("weight")
def real_weight(vip: str = typer.Argument(...), address: str = typer.Argument(...),
                weight: int = typer.Argument(..., help="new weight (0 = drained)"),
                socket: Path = SocketOption) -> None:
    """Change a real's weight."""
    _set_weight(socket, vip, address, weight, f"weight {weight} for")


@real_app.command("drain")
def real_drain(vip: str = typer.Argument(...), address: str = typer.Argument(...),
               socket: Path = SocketOption) -> None:
    """Weight 0: no new flows; established flows stay on the real (connection table)."""
    _set_weight(socket, vip, address, 0, "drained")


@real_app.command("list")
def real_list(vip: str = typer.Argument(...), output: str = OutputOption, socket: Path = SocketOption) -> None:
    """The reals of a VIP: weight, health, ring share and traffic."""
    name = _vip_key(vip)
    rows = _ask(socket, lambda c: c.query("lb", "ring", vip=name))
    stats = _ask(socket, lambda c: c.stats("lb"))
    for row in rows:
        row["packets"] = stats.get("real_packets", {}).get(row["real"], 0)
        row["bytes"] = stats.get("real_bytes", {}).get(row["real"], 0)
    if output == "json":
        _print_json(rows)
        return
    table = Table("real", "weight", "healthy", "ring slots", "share", "packets", "bytes", title=name)
    for row in rows:
        _add_row(table, row["real"], str(row["weight"]), "yes" if row["healthy"] else "NO", str(row["slots"]),
                      f"{row['share']:.2%}", str(row["packets"]), str(row["bytes"]))
    Console().print(table)


# --- whole state, stats, questions ---------------------------------------------------------------

@app.command("apply")
def apply(file: Path = typer.Option(..., "-f", "--file", help="YAML (or JSON) with settings and vips"),
          socket: Path = SocketOption) -> None:
    """Replace the whole lb state with a file's. Invalid -> nothing changes, the error names the field."""
    try:
        data = load_config_file(file) or {}
    except ConfigFileError as err:
        _fail(str(err))
    if not isinstance(data, dict):
        _fail(f"{file}: expected a mapping with 'settings' and 'vips'")
    state = _validated(data)
    result = _ask(socket, lambda c: c.put_state("lb", state))
    typer.echo(f"applied {file} ({len(state['vips'])} VIPs, revision {result.get('revision')})")


@app.command("show")
def show(output: str = typer.Option("yaml", "-o", "--output", help="yaml or json"),
         socket: Path = SocketOption) -> None:
    """The lb state held by the agent (the input `apply -f` takes)."""
    state = _ask(socket, lambda c: c.get_state("lb"))
    if output == "json":
        _print_json(state)
    else:
        typer.echo(yaml.safe_dump(state, sort_keys=False).rstrip())


@app.command("stats")
def stats(output: str = OutputOption, socket: Path = SocketOption) -> None:
    """Counters: verdicts, connection table, drops by reason, per VIP and per real."""
    data = _ask(socket, lambda c: c.stats("lb"))
    if output == "json":
        _print_json(data)
        return
    console = Console()
    table = Table("counter", "packets", "bytes", title="load balancer")
    for name, packets in data["packets"].items():
        _add_row(table, name, str(packets), str(data["bytes"][name]))
    console.print(table)
    for kind in ("vip", "real"):
        table = Table(kind, "packets", "bytes")
        for name, packets in data[f"{kind}_packets"].items():
            _add_row(table, name, str(packets), str(data[f"{kind}_bytes"][name]))
        console.print(table)


@app.command("flow")
def flow(source: str = typer.Argument(..., help="client ADDRESS:PORT, e.g. 192.168.1.1:31337 or [fc00::9]:4000"),
         vip: str = typer.Argument(..., help="VIP ADDRESS:PORT/PROTO"),
         output: str = OutputOption, socket: Path = SocketOption) -> None:
    """Which real the data plane sends this flow to (run through the loaded program)."""
    try:
        client, sport, _ = parse_vip_name(source)
        address, dport, protocol = parse_vip_name(vip)
    except ValueError as err:
        _fail(str(err))
    result = _ask(socket, lambda c: c.query("lb", "flow", src=str(client), sport=sport, dst=str(address),
                                            dport=dport, protocol=protocol))
    if output == "json":
        _print_json(result)
        return
    if result["verdict"] == "tx":
        line = f"{source} -> {vip_name(address, dport, protocol)}: real {result['real']}"
        if result["established_real"] and result["established_real"] != result["real"]:
            line += f" (established flow pinned to {result['established_real']})"
    elif result["verdict"] == "drop":
        line = f"{source} -> {vip}: dropped ({result['drop_reason']})"
    else:
        line = f"{source} -> {vip}: not a VIP, passed to the kernel"
    typer.echo(line)


@app.command("ring")
def ring(vip: str = typer.Argument(...), output: str = OutputOption, socket: Path = SocketOption) -> None:
    """Share of the VIP's Maglev ring slots per real."""
    name = _vip_key(vip)
    rows = _ask(socket, lambda c: c.query("lb", "ring", vip=name))
    if output == "json":
        _print_json(rows)
        return
    table = Table("real", "weight", "healthy", "slots", "share", title=name)
    for row in rows:
        _add_row(table, row["real"], str(row["weight"]), "yes" if row["healthy"] else "NO", str(row["slots"]),
                      f"{row['share']:.2%}")
    Console().print(table)


@app.command("health")
def health(output: str = OutputOption, socket: Path = SocketOption) -> None:
    """Health-check state of every checked real."""
    rows = _ask(socket, lambda c: c.query("lb", "health"))
    if output == "json":
        _print_json(rows)
        return
    table = Table("VIP", "real", "check", "up", "changes", "last error", title="health checks")
    for row in rows:
        _add_row(table, row["vip"], row["real"], f"{row['kind']}:{row['port']}", "yes" if row["up"] else "NO",
                      str(row["changes"]), row["last_error"] or "-")
    Console().print(table)
