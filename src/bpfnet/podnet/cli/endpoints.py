"""`bpfnet podnet endpoint show`: an endpoint as the data plane sees it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from bpfnet.app.cli import Output, OutputOption, SocketOption, call_agent, plain_table, render
from bpfnet.podnet.cli.common import APP, format_labels, pod_key

endpoint_app = typer.Typer(help="Endpoints as the data plane sees them.", no_args_is_help=True)


@endpoint_app.command("show")
def endpoint_show(pod: str = typer.Argument(..., help="NAMESPACE/NAME"), output: Output = OutputOption,
                  socket: Path = SocketOption) -> None:
    """Identity, selecting policies and the compiled policy map entries (with hits) of a pod."""
    pod_key(pod)
    shown = call_agent(socket, lambda client: client.query(APP, "endpoint", pod=pod))
    if output is Output.table:
        console = Console()
        console.print(f"[bold]{escape(shown['pod'])}[/] on {escape(shown['node'])}, address {shown['address']}, "
                      f"identity {shown['identity']} ({escape(format_labels(shown['labels']))})")
        for direction in ("Ingress", "Egress"):
            isolated = shown[f"{direction.lower()}_isolated"]
            by = ", ".join(shown["selected_by"][direction]) or "-"
            console.print(escape(f"{direction}: {'isolated by ' + by if isolated else 'not isolated (allow all)'}"))
    render(shown, output, lambda: plain_table(
        ["DIRECTION", "IDENTITY", "REMOTE", "PORTS", "PREFIX", "HITS"],
        [(e["direction"], e["identity"], e["remote"], e["ports"], e["prefixlen"], e["hits"]) for e in shown["entries"]],
        title="policy map entries"))
