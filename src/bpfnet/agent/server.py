"""Serving the agent's API: uvicorn on a root-only unix socket, optionally TLS on TCP with a token.

The unix socket is bound here (not by uvicorn, which would leave it 0666 for a moment) and every
connection learns its peer's uid/pid from SO_PEERCRED, which the audit log records as "who".
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from bpfnet.agent.api import PEER_SCOPE_KEY, create_api
from bpfnet.agent.core import Agent
from bpfnet.app.paths import DEFAULT_SOCKET, socket_path_problem
from bpfnet.errors import BpfnetError

log = logging.getLogger(__name__)



class ServeError(BpfnetError, RuntimeError):
    """The agent cannot listen where it was asked to."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process on the other end of a unix socket."""
    if sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


class PeerCredProtocol(H11Protocol):
    """h11 with the connection's peer identity added to every request's ASGI scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        creds = peer_credentials(sock) if sock is not None else None
        if creds is not None:
            pid, uid, _ = creds
            app = self.app
            peer = f"uid={uid} pid={pid}"

            async def with_peer(scope, receive, send):
                await app({**scope, PEER_SCOPE_KEY: peer}, receive, send)

            self.app = with_peer


def require_token(app: Callable, token: str) -> Callable:
    """ASGI wrapper for the TCP listener: `Authorization: Bearer <token>` or 401."""
    expected = f"Bearer {token}".encode()

    async def checked(scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                body = b'{"message":"missing or wrong bearer token"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
            client = scope.get("client") or ("unknown", 0)
            scope = {**scope, PEER_SCOPE_KEY: f"token@{client[0]}"}
        await app(scope, receive, send)

    return checked


def socket_answers(path: Path, timeout: float = 1.0) -> bool:
    """True when something accepts connections on unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def bind_unix_socket(path: Path) -> socket.socket:
    """A listening unix socket at `path`, mode 0600 from the start; a stale socket is replaced, any
    other file (a regular file, a symlink, a directory) is left alone and refused."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    problem = socket_path_problem(path)
    if problem is not None:
        raise ServeError(problem)
    if path.is_socket():
        if socket_answers(path):
            raise ServeError(f"an agent already answers at {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def bind_tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(128)
    return sock


class _QuietServer(uvicorn.Server):
    """A second server that leaves signals to the first one."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def serve(agent: Agent, socket_path: Path = DEFAULT_SOCKET, *, tcp: tuple[str, int] | None = None,
          token: str | None = None, tls_cert: Path | None = None, tls_key: Path | None = None,
          log_level: str = "warning") -> None:
    """Start the agent and serve until SIGTERM/SIGINT or POST /v1/shutdown, then stop it; the
    data plane stays up unless the shutdown request asked to detach."""
    if tcp is not None and not (token and tls_cert and tls_key):
        raise ServeError("a TCP listener needs --token and --tls-cert/--tls-key")
    api = create_api(agent)
    servers = [uvicorn.Server(uvicorn.Config(api, http=PeerCredProtocol, log_level=log_level,
                                             lifespan="off", access_log=False))]
    if tcp is not None:
        servers.append(_QuietServer(uvicorn.Config(
            require_token(api, token or ""), log_level=log_level, lifespan="off", access_log=False,
            ssl_certfile=str(tls_cert), ssl_keyfile=str(tls_key))))
    sockets = [bind_unix_socket(socket_path)]
    try:
        if tcp is not None:
            sockets.append(bind_tcp_socket(*tcp))
    except ServeError:
        sockets[0].close()
        socket_path.unlink()
        raise

    def request_exit(*_) -> None:
        for server in servers:
            server.should_exit = True

    # A signal while the controllers start must not be lost, and uvicorn re-raises the signal it
    # caught once it has shut down: our handler turns both into "exit", so the agent still stops
    # its controllers and removes its socket.
    previous = {sig: signal.signal(sig, request_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    agent.on_shutdown_request = request_exit
    try:
        agent.start()

        async def run_all() -> None:
            tasks = [asyncio.create_task(server.serve(sockets=[sock]))
                     for server, sock in zip(servers, sockets, strict=False)]
            await tasks[0]
            request_exit()
            await asyncio.gather(*tasks[1:])

        try:
            asyncio.run(run_all())
        finally:
            agent.stop(detach=agent.detach_on_exit)
            log.info("agent stopped (%s)", "data plane removed" if agent.detach_on_exit else "data plane left running")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
