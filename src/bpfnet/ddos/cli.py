"""`bpfnet ddos ...`: rules (through the agent), stats, top, `test` against a pcap, `capture`."""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import typer
import yaml
from pydantic import ValidationError

from bpfnet.app.cli import Output, OutputOption, SocketOption, call_agent, change_state, plain_table, render, validated
from bpfnet.app.client import AgentClient, AgentRequestError
from bpfnet.app.paths import DEFAULT_PIN_ROOT
from bpfnet.app.validation import validation_message as _validation_message
from bpfnet.cliutil import fail as _fail
from bpfnet.configfile import ConfigFileError, load_config_file
from bpfnet.ddos.config import DdosState, Rule, parse_duration

app = typer.Typer(help="DDoS rules: tcpdump expressions compiled to eBPF and enforced in XDP.",
                  no_args_is_help=True)
rule_app = typer.Typer(help="Add, delete and list rules.", no_args_is_help=True)
app.add_typer(rule_app, name="rule")
CAPTURE_LEASE_S = 3.0  # the agent clears the capture flag this long after the last renewal
auto_app = typer.Typer(help="Automatic attack signatures: the detector deploys and removes drop rules.",
                       no_args_is_help=True)
app.add_typer(auto_app, name="auto")


def _validated(state: dict) -> dict:
    return validated(DdosState, state)


def _change(socket: Path, change: Callable[[dict], dict]) -> dict:
    return change_state(socket, "ddos", DdosState, change)


def _parse_action(action: str) -> tuple[str, int | None]:
    if action in ("drop", "pass", "syncookie"):
        return action, None
    if action.startswith("limit="):
        try:
            return "limit", int(action.removeprefix("limit="))
        except ValueError:
            pass
    _fail(f"action {action!r}: use drop, pass, syncookie or limit=PACKETS_PER_SECOND")


# --- rules ------------------------------------------------------------------------------------

@rule_app.command("add")
def rule_add(
    expr: str = typer.Argument(..., help="tcpdump expression, e.g. 'udp and src port 53'"),
    action: str = typer.Option("drop", "--action", "-a",
                               help="drop, pass, limit=N (packets/s) or syncookie (TCP only: SYNs answered "
                               "with cookies, the handshake handed to the host's SYNPROXY)"),
    per_source: bool = typer.Option(False, "--per-source", help="limit each source address separately"),
    burst: int | None = typer.Option(None, "--burst", help="limit: bucket size in packets"),
    expires: str | None = typer.Option(None, "--expires", help="remove after this long: 90s, 10m, 2h"),
    comment: str = typer.Option("", "--comment"),
    position: int | None = typer.Option(None, "--position", help="insert at this index (default: last)"),
    socket: Path = SocketOption,
) -> None:
    """Add a rule (rules are evaluated in order; the first match decides)."""
    kind, rate = _parse_action(action)
    rule: dict = {"expr": expr, "action": kind, "comment": comment}
    if kind == "limit":
        rule.update(rate=rate, burst=burst, per_source=per_source)
    elif per_source or burst is not None:
        _fail("--per-source and --burst only apply to --action limit=N")
    if expires is not None:
        try:
            rule["expires"] = time.time() + parse_duration(expires)
        except ValueError as err:
            _fail(str(err))
    try:
        Rule.model_validate(rule)  # refuse a bad rule before talking to the agent
    except ValidationError as err:
        _fail(_validation_message(err))
    added = call_agent(socket, lambda c: c.create_object("ddos", "rules", rule, position=position))
    typer.echo(f"rule {added['key']} added")


@rule_app.command("del")
def rule_del(rule_id: int = typer.Argument(..., help="rule id (see `rule list`)"),
             socket: Path = SocketOption) -> None:
    """Delete a rule by id."""
    def delete(client: AgentClient) -> None:
        try:
            client.delete_object("ddos", "rules", str(rule_id))
        except AgentRequestError as err:
            if err.status == 404:
                _fail(f"no rule {rule_id}")
            raise

    call_agent(socket, delete)
    typer.echo(f"rule {rule_id} deleted")


@rule_app.command("list")
def rule_list(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Rules in order with their counters."""
    rows = call_agent(socket, lambda c: c.query("ddos", "rules"))
    render(rows, output, lambda: plain_table(
        ["id", "expression", "action", "packets", "bytes", "last match", "expires", "comment"],
        [(r["id"], r["expr"], _action_text(r), r["packets"], r["bytes"], _last_match_text(r), _expires_text(r),
          r["comment"]) for r in rows],
        title="ddos rules (first match decides)"))


def _action_text(row: dict) -> str:
    if row["action"] != "limit":
        return row["action"]
    return f"limit={row['rate']}" + ("/source" if row["per_source"] else "")


def _expires_text(row: dict) -> str:
    if row["expires"] is None:
        return "-"
    return "expired" if not row["in_force"] else f"in {max(0, row['expires'] - time.time()):.0f}s"


def _last_match_text(row: dict) -> str:
    return "-" if row["last_match_s_ago"] is None else f"{row['last_match_s_ago']:.1f}s ago"


@app.command("apply")
def apply(file: Path = typer.Option(..., "-f", "--file", help="YAML: a list of rules, or a state "
                                    "{rules: [...], sample_every: N, interfaces: [...]}"),
          socket: Path = SocketOption) -> None:
    """Replace the whole rule set from a file, all or nothing. Rules without an id keep the id of
    an identical rule already in force (so their counters continue)."""
    try:
        loaded = load_config_file(file)
    except ConfigFileError as err:
        _fail(str(err))
    if not isinstance(loaded, (list, dict)) and loaded is not None:
        _fail(f"{file}: expected a list of rules or a mapping with `rules`")

    def change(state: dict) -> dict:
        new = dict(state)
        if isinstance(loaded, dict):
            new.update(loaded)
        else:
            new["rules"] = loaded or []
        new["rules"] = _keep_ids(state.get("rules", []), new.get("rules") or [])
        return new

    result = _change(socket, change)
    typer.echo(f"applied revision {result['revision']}: {result['summary']}")


def _keep_ids(current: list[dict], wanted: list[dict]) -> list[dict]:
    """Give rules without an id the id of an identical current rule (each id used once)."""
    try:
        by_content = collections.defaultdict(list)
        for rule in current:
            by_content[Rule.model_validate(rule).content_key()].append(rule["id"])
        taken = {r["id"] for r in wanted if isinstance(r, dict) and r.get("id") is not None}
        out = []
        for rule in wanted:
            if isinstance(rule, dict) and rule.get("id") is None:
                candidates = [i for i in by_content.get(Rule.model_validate(rule).content_key(), [])
                              if i not in taken]
                if candidates:
                    rule = {**rule, "id": candidates[0]}
                    taken.add(candidates[0])
            out.append(rule)
        return out
    except ValidationError as err:
        _fail(_validation_message(err))


# --- observing --------------------------------------------------------------------------------

@app.command("stats")
def stats(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Totals per outcome and per rule."""
    data = call_agent(socket, lambda c: c.stats("ddos"))
    proxy = data.get("synproxy", {"state": "off"})

    def tables() -> list:
        shown = [plain_table(
            ["outcome", "packets", "bytes"],
            [(name, packets, data["bytes"][name]) for name, packets in data["packets"].items()],
            title=f"ddos totals (rule set generation {data['generation']}, {data['rules_in_force']} rules in force)")]
        if proxy["state"] == "on":
            ports = proxy["ports"] if proxy["ports"] == "all" else ", ".join(map(str, proxy["ports"]))
            # adopted: connections open before the table, entered into conntrack
            shown.append(plain_table(
                ["interface", "SYN-ACK MSS (IPv4)", "(IPv6)", "window scale"],
                [(said["interface"], said["mss4"], said["mss6"], said["wscale"]) for said in proxy["interfaces"]],
                title=f"SYNPROXY on TCP ports {ports} ({proxy['adopted']} open connections adopted)"))
        return shown

    if proxy["state"] == "draining":
        typer.echo(f"SYNPROXY draining: removed in {proxy['seconds_left']} s", err=True)
    if proxy.get("ports_without_server"):
        typer.echo("warning: no server in the agent's namespace listens on TCP port(s) "
                   f"{', '.join(map(str, proxy['ports_without_server']))}: syncookie rules hand connections "
                   "to local servers only, so those handshakes end in a reset", err=True)
    render(data, output, tables)


@app.command("top")
def top(limit: int = typer.Option(2000, "--samples", help="recent samples to summarise"),
        rows: int = typer.Option(10, "-n", help="entries per list"),
        output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Top sources, destinations, protocols and ports in the recent samples."""
    samples = call_agent(socket, lambda c: c.query("ddos", "samples", limit=limit))
    summary = {key: collections.Counter(str(s.get(key)) for s in samples if s.get(key) is not None).most_common(rows)
               for key in ("src", "dst", "protocol", "dst_port", "src_port", "verdict")}
    if output is Output.table:
        typer.echo(f"{len(samples)} samples")
    data = {"samples": len(samples), **{key: [list(pair) for pair in counts] for key, counts in summary.items()}}
    render(data, output, lambda: [plain_table([key, "samples"], counts, title=f"top {key}")
                                  for key, counts in summary.items()])


@app.command("test")
def test(expr: str = typer.Argument(..., help="tcpdump expression"),
         read: Path = typer.Option(..., "-r", help="pcap file (Ethernet)"),
         output: Output = OutputOption) -> None:
    """Run EXPR, compiled to eBPF, on every packet of a capture in the kernel and show which match
    (the same packets `tcpdump -r FILE EXPR` prints)."""
    from bpfnet.ddos.compiler import compile_standalone
    from bpfnet.ddos.pcap import PcapError, compile_filter, read_pcap
    from bpfnet.ebpf import BpfError, Program, ProgType

    try:
        code = compile_standalone(compile_filter(expr))
        records = read_pcap(read)
    except (PcapError, ValueError, OSError) as err:
        _fail(str(err))
    matched, too_short = [], []
    try:
        with Program.load_raw(ProgType.XDP, code, name="ddos_test") as program:
            for number, record in enumerate(records, start=1):
                if len(record.data) < 14:  # XDP never sees frames shorter than Ethernet's header
                    too_short.append(number)
                elif program.test_run(record.data).retval == 1:
                    matched.append(number)
    except BpfError as err:
        _fail(str(err))
    if output is not Output.table:
        render({"expr": expr, "packets": len(records), "matched": matched, "too_short": too_short}, output)
        return
    for number in matched:
        record = records[number - 1]
        print(f"{number}\t{record.ts_ns / 1e9:.6f}\t{len(record.data)} bytes\t{record.data[:34].hex()}")
    print(f"{len(matched)} of {len(records)} packets match {expr!r}"
          + (f" ({len(too_short)} shorter than 14 bytes skipped)" if too_short else ""), file=sys.stderr)


@app.command("capture")
def capture(
    write: Path = typer.Option(..., "-w", help="pcap file to write"),
    verdict: str = typer.Option("drop", "--verdict", help="drop, pass or all"),
    count: int | None = typer.Option(None, "-c", "--count", help="stop after N packets"),
    seconds: float | None = typer.Option(None, "--seconds", help="stop after this long"),
    filter_expr: str | None = typer.Argument(None, metavar="[FILTER]", help="tcpdump expression"),
    pin_root: Path = typer.Option(DEFAULT_PIN_ROOT, "--pin-root", help="where the agent pins its maps"),
    socket: Path = SocketOption,
) -> None:
    """Write what the XDP stage dropped (or passed) to a pcap file, as xdpcap does. The agent turns
    capturing on for a lease this command renews; if the command dies, the agent turns it off."""
    from bpfnet.ddos.pcap import CompiledFilter, PcapError, PcapWriter
    from bpfnet.ddos.samples import SampleReader
    from bpfnet.ebpf import BpfError, Map

    if verdict not in ("drop", "pass", "all"):
        _fail(f"--verdict {verdict!r}: use drop, pass or all")
    try:
        matcher = CompiledFilter.from_expr(filter_expr) if filter_expr else None
    except PcapError as err:
        _fail(f"filter {filter_expr!r}: {err}")
    try:
        ring = Map.from_pin(pin_root / "ddos" / "ddos_captures")
    except BpfError:
        _fail(f"no ddos stage pinned under {pin_root}: is the agent running with the ddos app?")
    stop: list[bool] = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    deadline = None if seconds is None else time.monotonic() + seconds

    def leased(client: AgentClient) -> int:
        """Capture under a lease renewed every third of its length; the lease ends with the capture."""
        lease = client.action("ddos", "capture", verdict=verdict, lease_s=CAPTURE_LEASE_S)["lease"]
        written = 0
        renew_at = time.monotonic() + CAPTURE_LEASE_S / 3
        try:
            with open(write, "wb") as f, SampleReader(ring) as reader:
                writer = PcapWriter(f)
                realtime_offset = time.time_ns() - time.monotonic_ns()
                while not stop and (count is None or written < count) and (
                        deadline is None or time.monotonic() < deadline):
                    if time.monotonic() >= renew_at:
                        client.action("ddos", "capture", verdict=verdict, lease_s=CAPTURE_LEASE_S, lease=lease)
                        renew_at = time.monotonic() + CAPTURE_LEASE_S / 3
                    for record in reader.read(timeout_ms=200):
                        if matcher is not None and not matcher.matches(record.frame, record.pkt_len):
                            continue
                        writer.write(record.frame, record.ts_ns + realtime_offset, record.pkt_len)
                        written += 1
                        if count is not None and written >= count:
                            break
                    writer.flush()
        except AgentRequestError as err:
            _fail(f"capture lease lost: {err}")
        finally:
            with contextlib.suppress(AgentRequestError):
                client.action("ddos", "capture", verdict="off", lease=lease)
        return written

    written = call_agent(socket, leased)
    typer.echo(f"{written} packets written to {write}", err=True)


# --- the detector -----------------------------------------------------------------------------

@auto_app.command("on")
def auto_on(
    dry_run: bool = typer.Option(False, "--dry-run", help="report the rules it would deploy, deploy nothing"),
    factor: float | None = typer.Option(None, "--factor", help="attack when rate > factor x baseline"),
    floor: float | None = typer.Option(None, "--floor-pps", help="... and rate > this many packets/s"),
    allow: list[str] | None = typer.Option(None, "--allow", help="source prefix never matched (repeat)"),
    max_rules: int | None = typer.Option(None, "--max-rules", help="rules the detector may own at once"),
    max_collateral: float | None = typer.Option(None, "--max-collateral",
                                                   help="max share of normal traffic a rule may match"),
    hold: str | None = typer.Option(None, "--hold", help="attack over after this long below: 5s, 1m"),
    socket: Path = SocketOption,
) -> None:
    """Switch the detector on (options not given keep their current or default value)."""
    options: dict = {"dry_run": dry_run}
    for key, value in (("attack_factor", factor), ("attack_floor_pps", floor), ("max_rules", max_rules),
                       ("max_collateral", max_collateral)):
        if value is not None:
            options[key] = value
    if allow:
        options["allow_list"] = allow
    if hold is not None:
        try:
            options["hold_time"] = parse_duration(hold)
        except ValueError as err:
            _fail(str(err))

    def change(state: dict) -> dict:
        new = {**state, "detector": {**(state.get("detector") or {}), **options}}
        if not new.get("sample_every"):
            new["sample_every"] = 100  # the detector lives on samples
        return _validated(new)

    _change(socket, change)
    typer.echo("detector on" + (" (dry run: nothing is deployed)" if dry_run else ""))


@auto_app.command("off")
def auto_off(socket: Path = SocketOption) -> None:
    """Switch the detector off; the rules it deployed are removed."""
    _change(socket, lambda state: _validated({**state, "detector": None}))
    typer.echo("detector off")


@auto_app.command("status")
def auto_status(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Attacks in progress, the detector's rules and its counters."""
    status = call_agent(socket, lambda c: c.query("ddos", "detector"))
    if output is not Output.table:
        render(status, output)
        return
    if not status["enabled"]:
        typer.echo("detector off (bpfnet ddos auto on)")
        return
    typer.echo(f"detector on{' (dry run)' if status['dry_run'] else ''}: {status['destinations']} "
               f"destinations, {status['counters']['samples']} samples, {status['events']} events")
    render(status, output, lambda: [
        plain_table(["destination", "since", "baseline pps", "threshold pps", "rules"],
                    [(a["destination"], f"{a['since']:.1f}", a["baseline_pps"], a["threshold_pps"],
                      ", ".join(a["rules"])) for a in status["attacks"]], title="attacks in progress"),
        plain_table(["name", "expression", "destination"],
                    [(r["name"], r["expression"], r["destination"]) for r in status["rules"]],
                    title="detector rules" + (" (proposed only)" if status["dry_run"] else ""))])


@app.command("events")
def events(follow: bool = typer.Option(False, "-f", "--follow", help="keep printing new events"),
           output: Output = OutputOption, limit: int = typer.Option(50, "-n", help="last N events"),
           socket: Path = SocketOption) -> None:
    """The detector's decisions with their evidence (-o json: one JSON object per line; -o yaml: one
    list item per event, so a followed stream is still one YAML list)."""
    from bpfnet.ddos.autopilot import describe

    def shown(event: dict) -> str:
        if output is Output.json:
            return json.dumps(event)
        if output is Output.yaml:
            return yaml.safe_dump([event], sort_keys=False).rstrip()
        return describe(event)

    def print_events(client: AgentClient) -> None:
        since = 0
        batch = client.query("ddos", "events", limit=limit)
        while True:
            for event in batch:
                print(shown(event), flush=True)
                since = event["seq"]
            if not follow:
                return
            time.sleep(0.5)
            batch = client.query("ddos", "events", since=since)

    with contextlib.suppress(KeyboardInterrupt):
        call_agent(socket, print_events)
