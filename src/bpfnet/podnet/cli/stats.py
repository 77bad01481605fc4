"""`bpfnet podnet stats`: the podnet counters."""

from __future__ import annotations

from pathlib import Path

from bpfnet.app.cli import Output, OutputOption, SocketOption, call_agent, plain_table, render
from bpfnet.podnet.cli.common import APP


def stats(output: Output = OutputOption, socket: Path = SocketOption) -> None:
    """Counters: pods, identities, policy entries, packets per outcome and drop reason."""
    values = call_agent(socket, lambda client: client.stats(APP))
    render(values, output, lambda: plain_table(["COUNTER", "VALUE"], _counter_rows(values), title="podnet"))


def _counter_rows(values: dict) -> list[tuple[str, object]]:
    """Plain counters first, then packets by outcome, then every other group flattened."""
    plain = [(k, v) for k, v in values.items() if k != "packets" and not isinstance(v, dict)]
    packets = [(f"packets {k}", v) for k, v in sorted(values.get("packets", {}).items())]
    nested = [(f"{group} {k}", v) for group, inner in values.items() if group != "packets" and isinstance(inner, dict)
              for k, v in _flatten(inner)]
    return plain + packets + nested


def _flatten(value: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        rows.extend(_flatten(item, name + " ") if isinstance(item, dict) else [(name, item)])
    return rows
