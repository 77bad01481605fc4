"""Reachability probes with real sockets, as the Kubernetes netpol tests run `agnhost connect`.

A TCP probe connects; a UDP probe sends a datagram and waits for the answer. Each socket is opened
inside the source pod's network namespace, then all probes run concurrently on one event loop, so
a 9x9 matrix of blocked cells costs one timeout, not 81.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address

from bpfnet.netns import inside


@dataclass(frozen=True)
class Probe:
    source_netns: str | None  # None: the caller's namespace
    address: IPv4Address
    port: int
    protocol: str   # "TCP" or "UDP"


async def _tcp(sock: socket.socket, probe: Probe) -> bool:
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (str(probe.address), probe.port))
    return True


async def _udp(sock: socket.socket, probe: Probe, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    sock.connect((str(probe.address), probe.port))
    # Resend now and then: the first datagram may wait for ARP of the gateway.
    for _ in range(3):
        sock.send(b"probe\n")
        try:
            return bool(await asyncio.wait_for(loop.sock_recv(sock, 512), timeout / 3))
        except TimeoutError:
            continue
    return False


async def _one(probe: Probe, timeout: float) -> bool:
    kind = socket.SOCK_STREAM if probe.protocol == "TCP" else socket.SOCK_DGRAM
    with inside(probe.source_netns):
        sock = socket.socket(socket.AF_INET, kind)
    sock.setblocking(False)
    try:
        if probe.protocol == "TCP":
            return await asyncio.wait_for(_tcp(sock, probe), timeout)
        return await _udp(sock, probe, timeout)
    except (TimeoutError, OSError):
        return False  # timed out, refused, unreachable
    finally:
        sock.close()


def run_probes(probes: list[Probe], timeout: float = 1.0) -> list[bool]:
    """Run every probe concurrently; True where the connection or exchange succeeded."""
    async def main():
        return await asyncio.gather(*(_one(p, timeout) for p in probes))
    return list(asyncio.run(main())) if probes else []


def format_matrix(matrix: dict[str, dict[str, bool | None]]) -> str:
    """The Kubernetes netpol table: '.' reachable, 'X' blocked, '?' not probed."""
    names = list(matrix)
    lines = ["-\t" + "\t".join(names)]
    for src in names:
        cells = ["?" if matrix[src].get(dst) is None else "." if matrix[src][dst] else "X"
                 for dst in names]
        lines.append(src + "\t" + "\t".join(cells))
    return "\n".join(lines)
