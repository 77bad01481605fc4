"""Socket-level service load balancing with real sockets: connect()/sendmsg() rewritten by cgroup
hooks, replies shown from the service address, empty services refused at once, affinity."""

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from bpfnet.ebpf import cgroup2_root
from bpfnet.netns import Topology
from bpfnet.podnet.servicelb import Backend, ServiceEntry, SocketLoadBalancer

pytestmark = pytest.mark.root

SERVER = textwrap.dedent("""
    import socket, sys, threading
    address, port = sys.argv[1], int(sys.argv[2])
    tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, port)); tcp.listen(128)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind((address, port))
    def serve_udp():
        while True:
            data, peer = udp.recvfrom(100)
            udp.sendto(address.encode(), peer)
    threading.Thread(target=serve_udp, daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = tcp.accept(); conn.sendall(address.encode()); conn.close()
""")

CLIENT = str(Path(__file__).with_name("socket_client.py"))




@pytest.fixture
def site():
    group = cgroup2_root() / f"bpfnet-test-slb-{uuid.uuid4().hex[:6]}"
    group.mkdir()
    lb = SocketLoadBalancer.load()
    try:
        with Topology("slb") as topology:
            ns = topology.netns("pod")
            for address in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                server = topology.popen(ns, [sys.executable, "-c", SERVER, address, "8080"],
                                        stdout=subprocess.PIPE, text=True)
                assert server.stdout.readline().strip() == "ready"
            lb.attach(group)
            yield topology, ns, group, lb
    finally:
        lb.close()
        group.rmdir()


def client(ns, group, vip, port, count, protocol="tcp"):
    def enter_cgroup():
        (group / "cgroup.procs").write_text(str(os.getpid()))

    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, CLIENT, vip, str(port), str(count), protocol],
                         capture_output=True, text=True, timeout=60, preexec_fn=enter_cgroup)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_connect_and_sendmsg_reach_every_backend_and_show_the_service(site):
    _, ns, group, lb = site
    backends = tuple(Backend(a, 8080) for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4"))
    lb.apply([ServiceEntry(7, "10.96.0.10", 80, "tcp", backends),
              ServiceEntry(8, "10.96.0.10", 80, "udp", backends)])
    tcp = client(ns, group, "10.96.0.10", 80, 60, "tcp")
    udp = client(ns, group, "10.96.0.10", 80, 60, "udp")
    assert {answer for answer, _ in tcp} == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    assert {peer for _, peer in tcp} == {"10.96.0.10"}  # getpeername shows the service
    assert {answer for answer, _ in udp} == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    assert {peer for _, peer in udp} == {"10.96.0.10"}  # recvmsg shows the service
    assert lb.counters(7) == {"connects": 60, "datagrams": 0, "refused": 0}
    assert lb.counters(8)["datagrams"] == 60


def test_a_service_without_backends_refuses_at_once_and_changes_apply(site):
    _, ns, group, lb = site
    lb.apply([ServiceEntry(1, "10.96.0.11", 80, "tcp", ())])
    assert client(ns, group, "10.96.0.11", 80, 3) == ["refused"] * 3
    assert lb.counters(1)["refused"] == 3
    lb.apply([ServiceEntry(1, "10.96.0.11", 80, "tcp", (Backend("127.0.0.3", 8080),))])
    assert {a for a, _ in client(ns, group, "10.96.0.11", 80, 5)} == {"127.0.0.3"}
    lb.apply([])
    assert list(lb.services.keys()) == [] and list(lb.backends.keys()) == []


def test_affinity_keeps_a_client_namespace_on_one_backend(site):
    _, ns, group, lb = site
    backends = tuple(Backend(a, 8080) for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4"))
    lb.apply([ServiceEntry(3, "10.96.0.12", 80, "tcp", backends, affinity=True)])
    answers = {a for a, _ in client(ns, group, "10.96.0.12", 80, 30)}
    assert len(answers) == 1


def test_processes_outside_the_cgroup_are_not_translated(site):
    topology, ns, group, lb = site
    lb.apply([ServiceEntry(4, "127.0.0.9", 8080, "tcp", (Backend("127.0.0.2", 8080),))])
    out = topology.run(ns, [sys.executable, CLIENT, "127.0.0.9", "8080", "1", "tcp"])
    assert json.loads(out.stdout) == ["error 111"]  # nobody listens on 127.0.0.9: ECONNREFUSED
    assert client(ns, group, "127.0.0.9", 8080, 1) == [["127.0.0.2", "127.0.0.9"]]
