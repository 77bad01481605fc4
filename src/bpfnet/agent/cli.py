"""`bpfnet agent`: run the agent (foreground or --background), `status`, `stop`, `audit`."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from bpfnet.app.cli import Output, OutputOption, SocketOption, call_agent, plain_table, render
from bpfnet.app.client import AgentClient, AgentNotRunning, AgentRequestError
from bpfnet.app.paths import DEFAULT_PIN_ROOT, DEFAULT_SOCKET, DEFAULT_STATE_DB, socket_path_problem
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


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_agent_process(pid: int, socket: Path) -> bool:
    """Whether `pid` runs a bpfnet agent serving `socket`: `python -m bpfnet.agent ...` (what
    --background starts) or `bpfnet agent ...`, with that --socket (or none given, the default)."""
    argv = _cmdline(pid)
    for i, arg in enumerate(argv):
        if arg == "bpfnet.agent" and i > 0 and argv[i - 1] == "-m":
            rest = argv[i + 1:]
            break
        if Path(arg).name == "bpfnet" and argv[i + 1:i + 2] == ["agent"]:
            rest = argv[i + 2:]
            break
    else:
        return False
    if rest and not rest[0].startswith("-"):
        return False  # a subcommand (status, stop, audit), not the agent itself
    given = next((rest[j + 1] for j, arg in enumerate(rest[:-1]) if arg == "--socket"), None)
    given = given or next((arg.split("=", 1)[1] for arg in rest if arg.startswith("--socket=")), None)
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        cwd = Path("/")
    served = Path(given) if given else DEFAULT_SOCKET
    return os.path.abspath(cwd / served) == os.path.abspath(socket)


def _read_pidfile(path: Path, socket: Path) -> int | None:
    """The pid in the pid file if that process is still the agent of `socket`; a pid reused by
    another process since (a crash left the file behind) counts as no agent."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and is_agent_process(pid, socket) else None


def _write_pidfile(path: Path, pid: int) -> None:
    """Write the pid file, replacing a stale regular file but never following a symlink."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        _fail(f"pid file {path} exists and is not a regular file: refusing to replace it")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as out:
        out.write(f"{pid}\n")


@app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    socket: Path = SocketOption,
    state_db: Path = typer.Option(DEFAULT_STATE_DB, "--state-db", help="SQLite file with desired state and audit log"),
    store: str | None = typer.Option(None, "--store", help="where desired state and audit log live: "
                                        "sqlite:///PATH or a PATH (SQLite), or etcd://HOST:PORT[,HOST:PORT][/PREFIX] "
                                        "(default: the --state-db file)"),
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
    adopt_empty: bool = typer.Option(False, "--adopt-empty",
                                     help="let an app with no stored state take over pinned objects an "
                                          "earlier agent left, replacing what they hold with the default "
                                          "state (refused without this flag)"),
    node: str | None = typer.Option(None, "--node", help="this host's name in a fleet sharing the store: "
                                    "podnet programs only this node, and the host registers as a member "
                                    "with a lease (default: one agent drives every node)"),
    lease_ttl: float = typer.Option(10.0, "--lease-ttl", min=2, max=3600,
                                    help="with --node: seconds the host stays a member without reaching the "
                                         "store; then the others stop routing to its pods"),
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
    if store is not None and state_db != DEFAULT_STATE_DB:
        _fail("give --store or --state-db, not both (--store sqlite:///PATH is --state-db PATH)")
    store_url = store if store is not None else str(state_db)
    if pidfile_for(socket) == socket:
        _fail(f"--socket {socket} ends in .pid: the pid file would be the socket; choose another name")
    pid = _read_pidfile(pidfile_for(socket), socket)
    if pid is not None:
        _fail(f"an agent already runs (pid {pid}, socket {socket}); `bpfnet agent stop` first")
    problem = socket_path_problem(socket)
    if problem is not None:
        _fail(problem)
    if background:
        argv = [sys.executable, "-m", "bpfnet.agent", "--socket", str(socket), "--store", store_url,
                "--pin-root", str(pin_root), "--log-level", log_level]
        if apps is not None:
            argv += ["--apps", apps]
        if listen is not None:
            argv += ["--listen", listen, "--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
        if adopt_empty:
            argv.append("--adopt-empty")
        if node is not None:
            argv += ["--node", node, "--lease-ttl", str(lease_ttl)]
        _start_background(argv, socket, token)
        return
    _run_foreground(socket, store_url, apps, pin_root, tcp, token, tls_cert, tls_key, log_level, adopt_empty,
                    node, lease_ttl)


def _run_foreground(socket: Path, store_url: str, apps: str | None, pin_root: Path, tcp, token,
                    tls_cert, tls_key, log_level: str, adopt_empty: bool, node: str | None,
                    lease_ttl: float) -> None:
    from bpfnet.agent.core import Agent, AgentStartError
    from bpfnet.agent.server import ServeError, serve
    from bpfnet.agent.store import open_store
    from bpfnet.app.controller import UnknownAppError, available_apps

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per store request would drown the log
    names = [a.strip() for a in apps.split(",") if a.strip()] if apps is not None else available_apps()
    try:
        state_store = open_store(store_url)
    except Exception as err:  # StoreError (a bad URL), sqlite3.Error, OSError
        _fail(f"cannot open state store {store_url}: {err}")
    pidfile = pidfile_for(socket)
    try:
        options = {"podnet": {"nodes": [node]}} if node is not None else {}
        agent = Agent(state_store, names, pin_root=pin_root, adopt_empty=adopt_empty, app_options=options,
                      member=node, member_ttl=lease_ttl)
        socket.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        _write_pidfile(pidfile, os.getpid())
        logging.getLogger("bpfnet.agent").info("agent pid %d, apps %s, socket %s, store %s", os.getpid(),
                                               ",".join(names) or "none", socket, state_store.url)
        serve(agent, socket, tcp=tcp, token=token, tls_cert=tls_cert, tls_key=tls_key,
              log_level="warning" if log_level == "info" else log_level)
    except (UnknownAppError, AgentStartError, ServeError) as err:
        _fail(str(err))
    finally:
        state_store.close()
        with contextlib.suppress(OSError, ValueError):
            if int(pidfile.read_text().strip()) == os.getpid():
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
                        f"{health['ticks']} ticks, socket {escape(str(socket))}"
                        + (f", store {escape(str(health['store']))}" if health.get("store") else ""))
        fleet = health.get("fleet")
        if fleet:
            Console().print(f"fleet: member {escape(str(fleet['member']))} of {escape(', '.join(fleet['members']))}"
                            + (f" [red]({escape(str(fleet['error']))})[/]" if fleet.get("error") else ""))
    render(health, output, lambda: plain_table(
        ["app", "revision", "tick errors", "last tick error", "store"],
        [(name, info["revision"], info["tick_errors"], info["last_tick_error"] or "",
          info.get("store_error") or info.get("watch_error") or "")
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
        # not answering (wedged, or still starting): fall back to the pidfile and SIGTERM, but only
        # a process that is this socket's agent (a pid file can outlive its process and the pid be reused)
        pidfile = pidfile_for(socket)
        pid = _read_pidfile(pidfile, socket)
        if pid is None:
            try:
                stale = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                _fail(str(err))
            _fail(f"{err}; pid file {pidfile} names pid {stale}, which is not a bpfnet agent of {socket} "
                  "(stale file): nothing signalled")
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
