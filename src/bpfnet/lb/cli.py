"""`bpfnet lb ...`: VIPs and reals (through the agent), `apply -f lb.yaml`, stats, `flow`, `ring`, `health`.

VIPs and reals are written one object at a time (`/v1/apps/lb/objects/vips/...`, `.../reals/...`), so
commands on different VIPs or reals never conflict; `apply -f` replaces the whole state. The agent
validates every write and its store stays the one source of truth.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from bpfnet.app.cli import (
    Output,
    OutputOption,
    SocketOption,
    YamlOutputOption,
    call_agent,
    change_state,
    plain_table,
    render,
    validated,
)
from bpfnet.app.client import AgentClient, AgentRequestError
from bpfnet.cliutil import fail as _fail
from bpfnet.configfile import ConfigFileError, load_config_file
from bpfnet.lb.config import FLAG_BITS, LbState, parse_vip_name, vip_name

app = typer.Typer(help="L4 load balancer: VIPs, reals, Maglev rings, XDP encapsulation to the reals.",
                  no_args_is_help=True)
vip_app = typer.Typer(help="Add, delete and list VIPs.", no_args_is_help=True)
real_app = typer.Typer(help="Add, delete, re-weight, drain and list the reals of a VIP.", no_args_is_help=True)
server_id_app = typer.Typer(help="Server ids (QUIC connection ids, UDP stable routing, TCP option) -> reals.",
                            no_args_is_help=True)
app.add_typer(vip_app, name="vip")
app.add_typer(real_app, name="real")
app.add_typer(server_id_app, name="server-id")
src_route_app = typer.Typer(help="Client networks -> reals, for VIPs with the src_routing flag.", no_args_is_help=True)
app.add_typer(src_route_app, name="src-route")

FLAG_HELP = f"one of {', '.join(FLAG_BITS)} (repeatable)"


def _validated(state: dict) -> dict:
    return validated(LbState, state)


def _change(socket: Path, change: Callable[[dict], dict]) -> dict:
    return change_state(socket, "lb", LbState, change)


def _vip_key(text: str) -> str:
    """Canonical VIP name ('10.0.0.1:80/tcp'), or a one-line error."""
    try:
        return vip_name(*parse_vip_name(text))
    except ValueError as err:
        _fail(str(err))


def _vip_names(client: AgentClient) -> str:
    return ", ".join(row["key"] for row in client.list_objects("lb", "vips")) or "none"


def _object_call(socket: Path, call: Callable[[AgentClient], Any], *, vip: str,
                 real: str | None = None, exists: str | None = None) -> Any:
    """One per-object call; the agent's 404 and 412 become messages in the CLI's words."""
    def run(client: AgentClient) -> Any:
        try:
            return call(client)
        except AgentRequestError as err:
            if err.status == 404:
                try:
                    client.get_object("lb", "vips", vip)
                except AgentRequestError:
                    _fail(f"no VIP {vip} (VIPs: {_vip_names(client)})")
                if real is not None:
                    _fail(f"VIP {vip} has no real {real}")
            if err.status == 412 and exists is not None:
                _fail(exists)
            raise
    return call_agent(socket, run)


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        _fail(f"{text!r} is not an IP address")


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
                   "maglev": maglev}
    if health:
        entry["health_check"] = {"kind": health, "path": health_path, "port": health_port}

    _object_call(socket, lambda c: c.put_object("lb", "vips", name, entry, create_only=True),
                 vip=name, exists=f"VIP {name} exists already")
    typer.echo(f"added VIP {name}")


@vip_app.command("del")
def vip_del(vip: str = typer.Argument(...), socket: Path = SocketOption) -> None:
    """Delete a VIP and its ring."""
    name = _vip_key(vip)
    _object_call(socket, lambda c: c.delete_object("lb", "vips", name), vip=name)
    typer.echo(f"deleted VIP {name}")


@vip_app.command("list")
def vip_list(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """VIPs with their reals, flags and traffic."""
    state = LbState.model_validate(call_agent(socket, lambda c: c.get_state("lb")))
    stats = call_agent(socket, lambda c: c.stats("lb")) if state.vips else {}
    rows = [{"vip": v.name, "flags": v.flags, "maglev": v.maglev, "reals": len(v.reals),
             "weights": {str(r.address): r.weight for r in v.reals},
             "health_check": v.health_check.kind if v.health_check else None,
             "packets": stats.get("vip_packets", {}).get(v.name, 0),
             "bytes": stats.get("vip_bytes", {}).get(v.name, 0)} for v in state.vips]
    render(rows, output, lambda: plain_table(
        ["VIP", "flags", "maglev", "reals", "health", "packets", "bytes"],
        [(r["vip"], ",".join(r["flags"]) or "-", r["maglev"], r["reals"], r["health_check"], r["packets"],
          r["bytes"]) for r in rows]))


# --- reals ---------------------------------------------------------------------------------------

def _set_weight(socket: Path, vip: str, address: str, weight: int, verb: str) -> None:
    name, address = _vip_key(vip), _address(address)
    _object_call(socket, lambda c: c.update_object("lb", "reals", f"{name}/{address}",
                                                   lambda real: {**real, "weight": weight}),
                 vip=name, real=address)
    typer.echo(f"{verb} real {address} of VIP {name}")


@real_app.command("add")
def real_add(vip: str = typer.Argument(...), address: str = typer.Argument(...),
             weight: int = typer.Option(1, "--weight", "-w", help="share of new flows (0 = drained)"),
             socket: Path = SocketOption) -> None:
    """Add a real to a VIP."""
    name, address = _vip_key(vip), _address(address)
    _object_call(socket, lambda c: c.put_object("lb", "reals", f"{name}/{address}",
                                                {"address": address, "weight": weight}, create_only=True),
                 vip=name, exists=f"VIP {name} has real {address} already (use `bpfnet lb real weight`)")
    typer.echo(f"added real {address} (weight {weight}) to VIP {name}")


@real_app.command("del")
def real_del(vip: str = typer.Argument(...), address: str = typer.Argument(...),
             socket: Path = SocketOption) -> None:
    """Remove a real from a VIP: its flows move to the other reals."""
    name, address = _vip_key(vip), _address(address)
    _object_call(socket, lambda c: c.delete_object("lb", "reals", f"{name}/{address}"), vip=name, real=address)
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


def _mark(socket: Path, vip: str, address: str, down: bool) -> None:
    name, address = _vip_key(vip), _address(address)

    def change(state: dict) -> dict:
        vip_obj = next((v for v in state.get("vips", []) if _vip_key(_name_of(v)) == name), None)
        if vip_obj is None:
            _fail(f"no VIP {name}")
        if all(str(ipaddress.ip_address(r["address"])) != address for r in vip_obj.get("reals", [])):
            _fail(f"VIP {name} has no real {address}")
        marks = [d for d in state.get("down_reals", [])
                 if not (_vip_key(d["vip"]) == name and str(ipaddress.ip_address(d["address"])) == address)]
        if down:
            marks.append({"vip": name, "address": address})
        return {**state, "down_reals": marks}

    _change(socket, change)
    typer.echo(f"marked real {address} of VIP {name} {'down' if down else 'up'}")


def _name_of(vip: dict) -> str:
    return vip_name(ipaddress.ip_address(vip["address"]), int(vip["port"]), vip.get("protocol", "tcp"))


@real_app.command("down")
def real_down(vip: str = typer.Argument(...), address: str = typer.Argument(...),
              socket: Path = SocketOption) -> None:
    """Mark a real down: out of the ring; UDP flows of a udp_flow_migration VIP move to other reals."""
    _mark(socket, vip, address, True)


@real_app.command("up")
def real_up(vip: str = typer.Argument(...), address: str = typer.Argument(...),
            socket: Path = SocketOption) -> None:
    """Undo `real down`."""
    _mark(socket, vip, address, False)


@real_app.command("list")
def real_list(vip: str = typer.Argument(...), output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """The reals of a VIP: weight, health, ring share and traffic."""
    name = _vip_key(vip)
    rows = call_agent(socket, lambda c: c.query("lb", "ring", vip=name))
    stats = call_agent(socket, lambda c: c.stats("lb"))
    for row in rows:
        row["packets"] = stats.get("real_packets", {}).get(row["real"], 0)
        row["bytes"] = stats.get("real_bytes", {}).get(row["real"], 0)
    render(rows, output, lambda: plain_table(
        ["real", "weight", "healthy", "ring slots", "share", "packets", "bytes"],
        [(r["real"], r["weight"], "yes" if r["healthy"] else "NO", r["slots"], f"{r['share']:.2%}", r["packets"],
          r["bytes"]) for r in rows], title=name))


# --- server ids ----------------------------------------------------------------------------------

@server_id_app.command("add")
def server_id_add(server_id: int = typer.Argument(..., help="1..4294967295"), address: str = typer.Argument(...),
                  socket: Path = SocketOption) -> None:
    """Map a server id to a real (replaces the id's current real)."""
    address = _address(address)
    if not 1 <= server_id <= 2**32 - 1:
        _fail(f"server id must be 1..4294967295, got {server_id}")
    _change(socket, lambda state: {**state, "server_ids": [
        *(s for s in state.get("server_ids", []) if s["id"] != server_id), {"id": server_id, "address": address}]})
    typer.echo(f"server id {server_id} -> {address}")


@server_id_app.command("del")
def server_id_del(server_id: int = typer.Argument(...), socket: Path = SocketOption) -> None:
    """Remove a server id: its packets are hashed again."""
    _remove_entry(socket, "server_ids", lambda s: s["id"] == server_id, f"no server id {server_id}")
    typer.echo(f"deleted server id {server_id}")


@server_id_app.command("list")
def server_id_list(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Server ids and their reals."""
    rows = LbState.model_validate(call_agent(socket, lambda c: c.get_state("lb"))).model_dump(mode="json")["server_ids"]
    render(rows, output, lambda: plain_table(["server id", "real"], [(r["id"], r["address"]) for r in rows]))


def _remove_entry(socket: Path, field: str, matches: Callable[[dict], bool], missing: str) -> None:
    """Remove the entries of the state's list `field` that match, or fail with `missing`."""
    def change(state: dict) -> dict:
        kept = [entry for entry in state.get(field, []) if not matches(entry)]
        if len(kept) == len(state.get(field, [])):
            _fail(missing)
        return {**state, field: kept}

    _change(socket, change)


# --- source routes -------------------------------------------------------------------------------

def _prefix(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text))
    except ValueError as err:
        _fail(f"{text!r} is not a network prefix: {err}")


@src_route_app.command("add")
def src_route_add(prefix: str = typer.Argument(..., help="client network, e.g. 192.168.0.0/16"),
                  address: str = typer.Argument(..., help="the real its clients go to"),
                  socket: Path = SocketOption) -> None:
    """Send clients of a network to a real (VIPs with src_routing; the longest prefix wins)."""
    prefix, address = _prefix(prefix), _address(address)
    _change(socket, lambda state: {**state, "source_routes": [
        *(r for r in state.get("source_routes", []) if _prefix(r["prefix"]) != prefix),
        {"prefix": prefix, "address": address}]})
    typer.echo(f"source route {prefix} -> {address}")


@src_route_app.command("del")
def src_route_del(prefix: str = typer.Argument(...), socket: Path = SocketOption) -> None:
    """Remove a source route: its clients are hashed again (established flows stay)."""
    prefix = _prefix(prefix)
    _remove_entry(socket, "source_routes", lambda r: _prefix(r["prefix"]) == prefix, f"no source route {prefix}")
    typer.echo(f"deleted source route {prefix}")


@src_route_app.command("list")
def src_route_list(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Source routes and their reals."""
    state = LbState.model_validate(call_agent(socket, lambda c: c.get_state("lb")))
    rows = state.model_dump(mode="json")["source_routes"]
    render(rows, output, lambda: plain_table(["client prefix", "real"], [(r["prefix"], r["address"]) for r in rows]))


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
    result = call_agent(socket, lambda c: c.put_state("lb", state))
    typer.echo(f"applied {file} ({len(state['vips'])} VIPs, revision {result.get('revision')})")


@app.command("show")
def show(output: Output = YamlOutputOption, socket: Path = SocketOption) -> None:
    """The lb state held by the agent (the input `apply -f` takes); a table is its YAML."""
    render(call_agent(socket, lambda c: c.get_state("lb")), output)


@app.command("stats")
def stats(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Counters: verdicts, connection table, drops by reason, per VIP and per real."""
    data = call_agent(socket, lambda c: c.stats("lb"))
    render(data, output, lambda: [
        plain_table(["counter", "packets", "bytes"],
                    [(name, packets, data["bytes"][name]) for name, packets in data["packets"].items()],
                    title="load balancer"),
        *(plain_table([kind, "packets", "bytes"],
                      [(name, packets, data[f"{kind}_bytes"][name])
                       for name, packets in data[f"{kind}_packets"].items()])
          for kind in ("vip", "real")),
        *([plain_table(["connection table", "map memory"],
                       [(f"{data['conn_table_size']:,} flows", f"{data['map_bytes'] / 2**20:,.0f} MiB")])]
          if "map_bytes" in data else [])])


@app.command("flow")
def flow(source: str = typer.Argument(..., help="client ADDRESS:PORT, e.g. 192.168.1.1:31337 or [fc00::9]:4000"),
         vip: str = typer.Argument(..., help="VIP ADDRESS:PORT/PROTO"),
         output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Which real the data plane sends this flow to (run through the loaded program)."""
    try:
        client, sport, _ = parse_vip_name(source)
        address, dport, protocol = parse_vip_name(vip)
    except ValueError as err:
        _fail(str(err))
    result = call_agent(socket, lambda c: c.query("lb", "flow", src=str(client), sport=sport, dst=str(address),
                                                  dport=dport, protocol=protocol))
    if output is not Output.table:
        render(result, output)
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
def ring(vip: str = typer.Argument(...), output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Share of the VIP's Maglev ring slots per real."""
    name = _vip_key(vip)
    rows = call_agent(socket, lambda c: c.query("lb", "ring", vip=name))
    render(rows, output, lambda: plain_table(
        ["real", "weight", "healthy", "slots", "share"],
        [(r["real"], r["weight"], "yes" if r["healthy"] else "NO", r["slots"], f"{r['share']:.2%}") for r in rows],
        title=name))


@app.command("health")
def health(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Health-check state of every checked real."""
    rows = call_agent(socket, lambda c: c.query("lb", "health"))
    render(rows, output, lambda: plain_table(
        ["VIP", "real", "check", "up", "changes", "last error"],
        [(r["vip"], r["real"], f"{r['kind']}:{r['port']}", "yes" if r["up"] else "NO", r["changes"], r["last_error"])
         for r in rows], title="health checks"))
