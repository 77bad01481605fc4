"""The pod's server, like the Kubernetes tests' agnhost: accepts TCP connections and echoes UDP.

    python -m bpfnet.podnet.serve --name x/a --serve 80/tcp,81/tcp,80/udp,81/udp

A TCP client gets the pod's name and the connection is closed; a UDP datagram is answered with
the pod's name. Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, reply: bytes):
        self.reply = reply
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if self.transport is not None:  # set by connection_made, which comes first
            self.transport.sendto(self.reply, addr)


async def serve(name: str, ports: list[tuple[int, str]]) -> None:
    reply = name.encode() + b"\n"
    loop = asyncio.get_running_loop()

    async def answer(reader, writer):
        writer.write(reply)
        try:
            await writer.drain()
        finally:
            writer.close()

    servers: list[asyncio.Server | asyncio.DatagramTransport] = []
    for port, proto in ports:
        if proto == "tcp":
            servers.append(await asyncio.start_server(answer, "0.0.0.0", port, reuse_address=True,
                                                      backlog=512))
        else:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Echo(reply), local_addr=("0.0.0.0", port), family=socket.AF_INET)
            servers.append(transport)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def parse_ports(text: str) -> list[tuple[int, str]]:
    ports = []
    for item in text.split(","):
        number, _, proto = item.strip().partition("/")
        if proto not in ("tcp", "udp") or not 0 < int(number) < 65536:
            raise argparse.ArgumentTypeError(f"{item!r} is not PORT/tcp or PORT/udp")
        ports.append((int(number), proto))
    return ports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=socket.gethostname())
    parser.add_argument("--serve", type=parse_ports, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.name, args.serve))


if __name__ == "__main__":
    main()
