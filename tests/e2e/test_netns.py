"""bpfnet.netns against the kernel: two namespaces joined by a veth, real ICMP and TCP between
them, and nothing left behind after an exception or a crashed process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

from bpfnet.netns import Topology, TopologyError, cleanup, inside, list_netns, owned_root_links, ping, run

pytestmark = pytest.mark.root

PREFIX = "agt"


def leftovers(prefix: str) -> tuple[list[str], list[str]]:
    namespaces = [ns for ns in list_netns() if ns.startswith(f"{prefix}-")]
    links = [name for name, owner in owned_root_links().items() if owner == prefix]
    return namespaces, links


@pytest.fixture(autouse=True)
def clean_slate():
    cleanup(PREFIX)
    yield
    cleanup(PREFIX)


def two_hosts(topo: Topology) -> tuple[str, str]:
    a, b = topo.netns("a"), topo.netns("b")
    topo.veth("eth0", "eth0", ns=a, peer_ns=b)
    topo.addr("eth0", "10.99.0.1/24", ns=a)
    topo.addr("eth0", "10.99.0.2/24", ns=b)
    topo.addr("eth0", "fd99::1/64", ns=a)
    topo.addr("eth0", "fd99::2/64", ns=b)
    return a, b


def test_ping_and_tcp_between_two_namespaces():
    with Topology(PREFIX) as topo:
        a, b = two_hosts(topo)
        assert ping(a, "10.99.0.2")
        assert ping(b, "fd99::1")
        assert not ping(a, "10.99.0.77", timeout=0.5)  # nobody there: no reply

        with inside(b):
            server = socket.create_server(("10.99.0.2", 7000))
        with server, inside(a), socket.create_connection(("10.99.0.2", 7000), timeout=5) as client:
            conn, (peer_ip, _) = server.accept()
            with conn:
                client.sendall(b"hello across namespaces")
                assert conn.recv(100) == b"hello across namespaces"
                assert peer_ip == "10.99.0.1"
        # the namespaces really are separate: the root namespace has no such address
        assert "10.99.0.1" not in run(None, ["ip", "-o", "addr"]).stdout


def test_routes_neighbours_sysctls_features_and_a_root_side_veth():
    with Topology(PREFIX) as topo:
        a, b = two_hosts(topo)
        router = topo.netns("r")
        topo.veth("agtr0", "eth0", peer_ns=router)  # root end marked with the owner alias
        topo.addr("agtr0", "10.98.0.1/24")
        topo.addr("eth0", "10.98.0.2/24", ns=router)
        topo.route("10.97.0.0/16", ns=router, via="10.98.0.1")
        topo.route("default", ns=b, dev="eth0")
        topo.neigh("eth0", "10.99.0.50", "02:00:00:00:00:50", ns=a)
        topo.forwarding(ns=router)
        topo.rp_filter(2, ns=router)
        topo.features("eth0", ns=a, tx_checksum=False, gro=True)
        topo.sysctl("net.ipv4.conf.agtr0.proxy_arp", 1)  # root sysctls are restored on close

        assert ping(None, "10.98.0.2")
        assert owned_root_links().get("agtr0") == PREFIX
        assert "10.97.0.0/16 via 10.98.0.1 dev eth0" in run(router, ["ip", "route"]).stdout
        assert "default dev eth0" in run(b, ["ip", "route"]).stdout
        assert "10.99.0.50 dev eth0 lladdr 02:00:00:00:00:50 PERMANENT" in run(a, ["ip", "neigh"]).stdout
        assert topo.get_sysctl("net.ipv4.ip_forward", ns=router) == "1"
        assert topo.get_sysctl("net.ipv4.ip_forward", ns=a) == "0"
        assert topo.get_sysctl("net.ipv4.conf.all.rp_filter", ns=router) == "2"
        assert topo.get_sysctl("net.ipv4.conf.agtr0.proxy_arp") == "1"
        with inside(a):  # root-namespace calls mean the root namespace, whatever thread state
            assert topo.get_sysctl("net.ipv4.conf.agtr0.proxy_arp") == "1"
            assert topo.ifindex("agtr0") > 0
        features = topo.get_features("eth0", ns=a)
        assert features["tx-checksumming"] is False
        assert features["generic-receive-offload"] is True

        topo.bridge("br0", ns=b)
        topo.down("eth0", ns=b)
        topo.set_master("eth0", "br0", ns=b)
        assert "master br0" in run(b, ["ip", "-o", "link", "show", "eth0"]).stdout
    assert leftovers(PREFIX) == ([], [])
    assert "agtr0" not in run(None, ["ip", "-o", "link"]).stdout


def test_bad_names_are_rejected_before_touching_the_kernel():
    with Topology(PREFIX) as topo:
        a = topo.netns("a")
        with pytest.raises(ValueError, match="bad interface name 'a-very-long-name0'"):
            topo.veth("a-very-long-name0", "eth1", ns=a)
        with pytest.raises(TopologyError, match="no interface nope in agt-a"):
            topo.addr("nope", "10.0.0.1/24", ns=a)
        with pytest.raises(TopologyError, match="already exists"):
            topo.netns("a")
    with pytest.raises(ValueError, match="bad topology prefix"):
        Topology("Bad-Prefix")


def test_exception_inside_topology_leaves_nothing():
    with pytest.raises(RuntimeError, match="boom"):
        with Topology(PREFIX) as topo:
            a, _ = two_hosts(topo)
            topo.veth("agtx0", "eth9", peer_ns=a)
            topo.popen(a, ["sleep", "60"])
            assert leftovers(PREFIX) == (["agt-a", "agt-b"], ["agtx0"])
            raise RuntimeError("boom")
    assert leftovers(PREFIX) == ([], [])


def test_cleanup_removes_leftovers_of_a_crashed_process():
    crash = textwrap.dedent(f"""
        import os, subprocess
        from bpfnet.netns import Topology, popen
        topo = Topology({PREFIX!r})
        a = topo.netns("a")
        topo.veth("agtc0", "eth0", peer_ns=a)
        popen(a, ["sleep", "60"], start_new_session=True)
        os._exit(3)  # no cleanup: as if the process was killed
    """)
    assert subprocess.run([sys.executable, "-c", crash]).returncode == 3
    assert leftovers(PREFIX) == (["agt-a"], ["agtc0"])

    removed = cleanup(PREFIX)

    assert sorted(removed) == ["link agtc0", "netns agt-a"]
    assert leftovers(PREFIX) == ([], [])
    assert "agtc0" not in run(None, ["ip", "-o", "link"]).stdout


def test_cli_list_and_cleanup():
    from typer.testing import CliRunner

    from bpfnet.netns.cli import app

    topo = Topology(PREFIX)
    try:
        topo.netns("a")
        listed = CliRunner().invoke(app, ["list", "-o", "json"])
        assert listed.exit_code == 0
        assert {"name": "agt-a", "owner": PREFIX, "pids": []} in json.loads(listed.stdout)["namespaces"]
        result = CliRunner().invoke(app, ["cleanup", "--prefix", PREFIX])
        assert result.exit_code == 0
        assert "removed netns agt-a" in result.stdout
        assert leftovers(PREFIX) == ([], [])
        bad = CliRunner().invoke(app, ["cleanup", "--prefix", "NO!"])
        assert bad.exit_code == 1
    finally:
        topo.close()
