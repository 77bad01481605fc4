"""`bpfnet probe`: real connections between pods, run from this machine."""

from __future__ import annotations

from pathlib import Path

import typer

from bpfnet.app.cli import Output, OutputOption, SocketOption, render
from bpfnet.cliutil import fail
from bpfnet.podnet.cli.common import read_state
from bpfnet.podnet.config import ConfigError


def probe(source: str | None = typer.Argument(None, help="NAMESPACE/NAME (default: every pod)"),
          destination: str | None = typer.Argument(None, help="NAMESPACE/NAME (default: every pod)"),
          port: int = typer.Option(80, "--port"),
          protocol: str = typer.Option("tcp", "--protocol", help="tcp or udp"),
          timeout: float = typer.Option(1.0, "--timeout", help="seconds per probe"),
          output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Real connections between pods, in parallel: '.' reachable, 'X' blocked."""
    from bpfnet.podnet.pods import pod_netns
    from bpfnet.podnet.probe import Probe, format_matrix, run_probes

    if protocol.lower() not in ("tcp", "udp"):
        fail(f"protocol {protocol!r}: use tcp or udp")
    state = read_state(socket)
    try:
        sources = [state.pod(source)] if source else state.pods
        targets = [state.pod(destination)] if destination else state.pods
    except ConfigError as err:
        fail(str(err))
    pairs = [(a, b) for a in sources for b in targets]
    probes = [Probe(pod_netns(state.node(a.node), a), b.ip, port, protocol.upper()) for a, b in pairs]
    results = run_probes(probes, timeout)
    matrix: dict[str, dict[str, bool | None]] = {a.key: {} for a in sources}
    for (a, b), ok in zip(pairs, results, strict=False):
        matrix[a.key][b.key] = ok
    if output is not Output.table:
        return render(matrix, output)
    if source and destination:
        return typer.echo(f"{source} -> {destination} {port}/{protocol.lower()}: "
                          f"{'reachable' if results[0] else 'blocked'}")
    typer.echo(format_matrix(matrix) if not (source or destination) else
               "\n".join(f"{a} -> {b}: {'.' if ok else 'X'}" for a, row in matrix.items()
                         for b, ok in row.items()))
