"""`bpfnet lab run|up|down|status`."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(help="The lab: every bpfnet app working in network namespaces on this machine.",
                  no_args_is_help=True)
console = Console(emoji=False, width=None if Console().is_terminal else 110)


@app.command()
def run(generator: str = typer.Option(
        "auto", "--generator", metavar="auto|live|packet",
        help="how the DDoS floods are sent: live = XDP live frames where the kernel allows them, "
             "packet = AF_PACKET sendmmsg() batches; auto picks live where allowed, else packet")) -> None:
    """Build the site, start its agent, drive traffic through each app, print a summary, tear down."""
    from bpfnet.bench.trafficgen import choose_backend
    from bpfnet.lab.runner import run as run_lab

    try:
        backend = choose_backend(generator)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--generator") from None
    if not run_lab(console, generator=backend):
        raise typer.Exit(1)


@app.command()
def down() -> None:
    """Remove whatever a lab left behind (agent, namespaces, pins)."""
    from bpfnet.lab.runner import teardown

    for name in teardown():
        console.print(f"removed {name}")
