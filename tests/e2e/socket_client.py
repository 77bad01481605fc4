"""Connect (TCP) or exchange a datagram (UDP) COUNT times with ADDRESS:PORT and print, as JSON, one
outcome per try: [answer, peer address as getpeername/recvfrom show it], "refused" (EPERM: a socket
hook said no), "timeout", or "error <errno>". Run inside a namespace by the socket-LB tests.

    python socket_client.py ADDRESS PORT COUNT tcp|udp
"""

import json
import socket
import sys

address, port, count, protocol = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
outcomes = []
for _ in range(count):
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(1)
        try:
            if protocol == "tcp":
                sock.connect((address, port))
                outcomes.append([sock.recv(100).decode().strip(), sock.getpeername()[0]])
            else:
                sock.sendto(b"hi", (address, port))
                data, peer = sock.recvfrom(100)
                outcomes.append([data.decode().strip(), peer[0]])
        except PermissionError:
            outcomes.append("refused")
        except TimeoutError:
            outcomes.append("timeout")
        except OSError as error:
            outcomes.append(f"error {error.errno}")
print(json.dumps(outcomes))
