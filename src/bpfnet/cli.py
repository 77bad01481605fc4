"""The `bpfnet` command: `bpfnet <app> <verb>`."""

from __future__ import annotations

from dataclasses import asdict

import typer
from rich.markup import escape
from rich.table import Table

from bpfnet import __version__
from bpfnet.agent.cli import app as agent_app
from bpfnet.app.cli import Output, OutputOption, render
from bpfnet.bench.cli import app as bench_app
from bpfnet.ddos.cli import app as ddos_app
from bpfnet.lab.cli import app as lab_app
from bpfnet.lb.cli import app as lb_app
from bpfnet.netns.cli import app as netns_app
from bpfnet.podnet import cli as podnet_cli

app = typer.Typer(help="bpfnet: eBPF load balancing, DDoS mitigation and pod networking, driven "
                       "from Python. Run `bpfnet doctor` first, then `bpfnet lab run` to see every app.",
                  no_args_is_help=True, rich_markup_mode="rich")
app.add_typer(agent_app, name="agent")
app.add_typer(bench_app, name="bench")
app.add_typer(netns_app, name="netns")
app.add_typer(lab_app, name="lab")
app.add_typer(lb_app, name="lb")
app.add_typer(ddos_app, name="ddos")
podnet_cli.mount(app)  # with `bpfnet service`


@app.command()
def version() -> None:
    """Print bpfnet's version."""
    print(__version__)


@app.command()
def doctor(output: Output = OutputOption) -> None:
    """Check with real probes that this machine can run bpfnet (kernel, maps, helpers, attach)."""
    from bpfnet.doctor import run_checks

    checks = run_checks()

    def checks_table() -> Table:
        table = Table(title="bpfnet doctor")
        for column in ("check", "status", "detail"):
            table.add_column(column)
        for c in checks:
            status = "[green]OK[/]" if c.ok else ("[red]FAIL[/]" if c.required else "[yellow]WARN[/]")
            table.add_row(escape(c.name), status, escape(c.detail))
        return table

    render([asdict(c) for c in checks], output, checks_table)
    if any(c.required and not c.ok for c in checks):
        raise typer.Exit(1)


def main() -> None:  # console script entry point
    app()


if __name__ == "__main__":
    main()
