"""`bpfnet observe`: flow events, Hubble-like, with filters (`bpfnet.podnet.flows`)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import typer
from rich.console import Console

from bpfnet.app.cli import SocketOption, call_agent, plain_table
from bpfnet.app.client import AgentClient
from bpfnet.cliutil import fail
from bpfnet.podnet.cli.common import APP
from bpfnet.podnet.flows import Endpoint, Flow, compact, parse_filters

OBSERVE_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
FOLLOW_POLL_SECONDS = 0.5
FLOW_OUTPUTS = ("compact", "table", "json")


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
        Console().print(plain_table(
            ["TIME", "NODE", "SOURCE", "DESTINATION", "PROTOCOL", "FLAGS", "DIRECTION", "VERDICT", "REASON"],
            [(time.strftime("%H:%M:%S", time.localtime(f.time)), f.node, f"{f.source.name}:{f.source.port}",
              f"{f.destination.name}:{f.destination.port}", f.protocol, ",".join(f.tcp_flags),
              f.direction + (" reply" if f.is_reply else ""), f.verdict, f.drop_reason) for f in flows],
            title="flows"))
    else:
        for flow in flows:
            typer.echo(compact(flow))


def _warn_lost(lost: int, shown: int) -> int:
    """Tell (on stderr) how many flow events the kernel could not record, when that grew."""
    if lost > shown:
        typer.echo(f"warning: {lost} flow events lost in the data plane (ring buffer full)", err=True)
    return lost


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
    if output not in FLOW_OUTPUTS:
        fail(f"--output {output!r}: use compact, table or json")
    try:
        parse_filters(tokens)
    except ValueError as err:
        fail(str(err))
    filters = json.dumps(tokens)

    def show(client: AgentClient) -> None:
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

    with contextlib.suppress(KeyboardInterrupt):
        call_agent(socket, show)
