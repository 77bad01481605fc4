"""An identity server for the lab and the tests: answers on TCP (a line, or HTTP) and UDP with
its name, so a client can tell which real or pod it reached. A TCP client that starts with "ECHO"
gets a long-lived connection that echoes each line after the server's name.

UDP replies leave from the address the datagram was sent to (IP_PKTINFO), so a real that owns a
VIP on its loopback answers from the VIP, as direct server return needs.

    python -m bpfnet.lab.server NAME PORT/PROTO [PORT/PROTO ...]
"""

from __future__ import annotations

import select
import socket
import sys
import threading

IP_PKTINFO = 8


def tcp_listener(port: int, family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    sock.listen(512)
    return sock


def udp_socket(port: int, family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        sock.bind(("::", port))
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind(("0.0.0.0", port))
    return sock


def answer_tcp(conn: socket.socket, name: bytes) -> None:
    conn.settimeout(0.05)  # HTTP clients send at once; line clients send nothing
    try:
        first = conn.recv(1024)
    except (TimeoutError, OSError):
        first = b""
    if first.startswith(b"ECHO"):  # a long-lived connection: echo every line, prefixed by our name
        pending = first.partition(b"\n")[2]  # whatever followed the ECHO line
        threading.Thread(target=echo, args=(conn, name, pending), daemon=True).start()
        return
    if first.startswith((b"GET ", b"HEAD ")):
        body = name + b"\n"
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s"
                     % (len(body), body))
    else:
        conn.sendall(name + b"\n")
    conn.close()


def echo(conn: socket.socket, name: bytes, pending: bytes) -> None:
    conn.settimeout(None)
    with conn:
        data = pending
        while True:
            while b"\n" in data:
                line, data = data.split(b"\n", 1)
                conn.sendall(name + b" " + line + b"\n")
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk


def answer_udp(sock: socket.socket, name: bytes) -> None:
    data, ancillary, _flags, peer = sock.recvmsg(2048, socket.CMSG_SPACE(64))
    # reply with the received packet-info so the source is the address the client used
    pktinfo = [(level, kind, value) for level, kind, value in ancillary
               if (level, kind) in ((socket.IPPROTO_IP, IP_PKTINFO),
                                    (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO))]
    if sock.family == socket.AF_INET and pktinfo:
        # struct in_pktinfo {ifindex; spec_dst; addr}: send from addr (the destination we got)
        value = pktinfo[0][2]
        pktinfo = [(socket.IPPROTO_IP, IP_PKTINFO, b"\0" * 4 + value[8:12] + b"\0" * 4)]
    sock.sendmsg([name + b"\n"], pktinfo, 0, peer)


def serve(name: str, endpoints: list[tuple[int, str]]) -> None:
    tcp: list[socket.socket] = []
    udp: list[socket.socket] = []
    for port, proto in endpoints:
        for family in (socket.AF_INET, socket.AF_INET6):
            (tcp if proto == "tcp" else udp).append(
                tcp_listener(port, family) if proto == "tcp" else udp_socket(port, family))
    encoded = name.encode()
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select(tcp + udp, [], [])
        for sock in readable:
            try:
                if sock in tcp:
                    conn, _ = sock.accept()
                    answer_tcp(conn, encoded)
                else:
                    answer_udp(sock, encoded)
            except OSError:
                pass  # a client that went away, a source we cannot route back to (a flood's)


def parse_endpoints(specs: list[str]) -> list[tuple[int, str]]:
    endpoints = []
    for spec in specs:
        port, _, proto = spec.partition("/")
        proto = proto or "tcp"
        if not port.isdigit() or not 0 < int(port) < 65536 or proto not in ("tcp", "udp"):
            raise SystemExit(f"bad endpoint {spec!r}: use PORT/tcp or PORT/udp")
        endpoints.append((int(port), proto))
    return endpoints


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    serve(sys.argv[1], parse_endpoints(sys.argv[2:]))
