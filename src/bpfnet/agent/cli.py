"""`bpfnet agent`: run the agent (foreground or --background), `status`, `stop`, `audit`."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from bpfnet.app.cli import Output, OutputOption, SocketOption, call_agent, plain_table, render
from bpfnet.app.client import AgentClient, AgentNotRunning, AgentRequestError
from bpfnet.app.paths import DEFAULT_PIN_ROOT, DEFAULT_STATE_DB
from bpfnet.cliutil import fail as _fail

app = typer.Typer(help="The bpfnet agent: owns the data plane, serves the API on a unix socket.")

START_TIMEOUT = 30.0


def pidfile_for(socket_path: Path) -> Path:
    return socket_path.with_suffix(".pid")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _read_pidfile(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


@app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    socket: Path = SocketOption,
    state_db: Path = typer.Option(DEFAULT_STATE_DB, "--state-db", help="SQLite file with desired state and audit log"),
    apps: str | None = typer.Option(None, "--apps", help="comma-separated apps, e.g. lb,ddos, or "
                                       "module:Class (default: every installed app)"),
    pin_root: Path = typer.Option(DEFAULT_PIN_ROOT, "--pin-root", help="where apps pin programs and maps"),
    background: bool = typer.Option(False, "--background", help="detach, wait until the API answers, exit"),
    listen: str | None = typer.Option(None, "--listen", help="also serve HTTPS on HOST:PORT (needs --token, --tls-*)"),
    token: str | None = typer.Option(None, "--token", envvar="BPFNET_AGENT_TOKEN",
                                        help="bearer token for --listen (better: env BPFNET_AGENT_TOKEN)"),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", exists=True, dir_okay=False),
    tls_key: Path | None = typer.Option(None, "--tls-key", exists=True, dir_okay=False),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error"),
) -> None:
    """Start the agent (in the foreground unless --background)."""
    if ctx.invoked_subcommand is not None:
        return
    tcp = None
    if listen is not None:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            _fail(f"--listen wants HOST:PORT, not {listen!r}")
        if not (token and tls_cert and tls_key):
            _fail("--listen needs --token (or BPFNET_AGENT_TOKEN) and --tls-cert and --tls-key")
        tcp = (host.strip("[]"), int(port))
    pid = _read_pidfile(pidfile_for(socket))
    if pid is not None:
        _fail(f"an agent already runs (pid {pid}, socket {socket}); `bpfnet agent stop` first")
    if background:
        argv = [sys.executable, "-m", "bpfnet.agent", "--socket", str(socket), "--state-db", str(state_db),
                "--pin-root", str(pin_root), "--log-level", log_level]
        if apps is not None:
            argv += ["--apps", apps]
        if listen is not None:
            argv += ["--listen", listen, "--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
        _start_background(argv, socket, token)
        return
    _run_foreground(socket, state_db, apps, pin_root, tcp, token, tls_cert, tls_key, log_level)


def _run_foreground(socket: Path, state_db: Path, apps: str | None, pin_root: Path, tcp, token,
                    tls_cert, tls_key, log_level: str) -> None:
    from bpfnet.agent.core import Agent, AgentStartError
    from bpfnet.agent.server import ServeError, serve
    from bpfnet.agent.store import SQLiteStore
    from bpfnet.app.controller import UnknownAppError, available_apps

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [a.strip() for a in apps.split(",") if a.strip()] if apps is not None else available_apps()
    try:
        store = SQLiteStore(state_db)
    except Exception as err:  # sqlite3.Error, OSError
        _fail(f"cannot open state store {state_db}: {err}")
    pidfile = pidfile_for(socket)
    try:
        agent = Agent(store, names, pin_root=pin_root)
        socket.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        pidfile.write_text(f"{os.getpid()}\n")
        logging.getLogger("bpfnet.agent").info("agent pid %d, apps %s, socket %s", os.getpid(),
                                               ",".join(names) or "none", socket)
        serve(agent, socket, tcp=tcp, token=token, tls_cert=tls_cert, tls_key=tls_key,
              log_level="warning" if log_level == "info" else log_level)
    except (UnknownAppError, AgentStartError, ServeError) as err:
        _fail(str(err))
    finally:
        store.close()
        if _read_pidfile(pidfile) == os.getpid():
            pidfile.unlink()


def _start_background(argv: list[str], socket: Path, token: str | None) -> None:
    log_path = socket.with_suffix(".log")
    socket.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    env = dict(os.environ)
    if token:
        env["BPFNET_AGENT_TOKEN"] = token  # not in argv, where `ps` shows it
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT
    with AgentClient(socket) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                _fail(f"agent exited with code {proc.returncode}: " + (" / ".join(tail) or f"see {log_path}"))
            try:
                health = client.health()
            except AgentNotRunning:
                time.sleep(0.05)
                continue
            if health["pid"] == proc.pid:
                typer.echo(f"agent started (pid {proc.pid}, socket {socket}, log {log_path})")
                return
            time.sleep(0.05)
    proc.terminate()
    _fail(f"agent did not answer on {socket} within {START_TIMEOUT:.0f} s; see {log_path}")


@app.command()
def status(socket: Path = SocketOption, output: Output = OutputOption) -> None:
    """Is the agent up, which apps does it run, at which state revision."""
    health = call_agent(socket, lambda client: client.health())
    if output is Output.table:
        Console().print(f"agent [green]{escape(str(health['status']))}[/]: pid {health['pid']}, "
                        f"version {escape(str(health['version']))}, up {health['uptime_s']:.0f} s, "
                        f"{health['ticks']} ticks, socket {escape(str(socket))}")
    render(health, output, lambda: plain_table(
        ["app", "revision", "tick errors", "last tick error"],
        [(name, info["revision"], info["tick_errors"], info["last_tick_error"] or "")
         for name, info in health["apps"].items()]))


@app.command()
def stop(socket: Path = SocketOption,
         detach: bool = typer.Option(False, "--detach", help="also remove the apps' programs and pins"),
         timeout: float = typer.Option(30.0, "--timeout", help="seconds to wait for the agent to exit")) -> None:
    """Stop the agent; pinned programs keep forwarding until the next start unless --detach."""
    try:
        with AgentClient(socket) as client:
            pid = client.health()["pid"]
            client.shutdown(detach=detach)
    except AgentNotRunning as err:
        # not answering (wedged, or still starting): fall back to the pidfile and SIGTERM
        pid = _read_pidfile(pidfile_for(socket))
        if pid is None:
            _fail(str(err))
        if detach:
            _fail(f"agent (pid {pid}) does not answer on {socket}; stop it without --detach")
        os.kill(pid, signal.SIGTERM)
    except AgentRequestError as err:
        _fail(str(err))
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            _fail(f"agent (pid {pid}) did not exit within {timeout:.0f} s")
        time.sleep(0.05)
    typer.echo(f"agent stopped (pid {pid})")


@app.command()
def audit(socket: Path = SocketOption, limit: int = typer.Option(20, "-n", "--limit"),
          app_name: str | None = typer.Option(None, "--app"), output: Output = OutputOption) -> None:
    """Who changed which app's state, when, and what changed (newest first)."""
    entries = call_agent(socket, lambda client: client.audit(limit=limit, app=app_name))
    render(entries, output, lambda: plain_table(
        ["time (UTC)", "who", "app", "outcome", "revision", "change"],
        [(datetime.datetime.fromtimestamp(e["time"], datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"), e["who"],
          e["app"], e["outcome"], e["revision"] or "", e["summary"]) for e in entries]))
