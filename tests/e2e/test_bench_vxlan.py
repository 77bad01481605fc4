"""`bpfnet bench vxlan` (part of `bench services`): one very short round per peer moves bytes
through the path it names (plain kernel VXLAN: its VXLAN device; bpfnet: its tc programs, the
tunnel and the receiving node's conntrack for that server pod; the guarded pods' ingress policy,
which really holds its rules and drops what they do not allow), and
everything it built is gone afterwards.

Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_bench_vxlan.py
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from bpfnet.bench.harness import run_scenarios
from bpfnet.bench.vxlan import IPERF_PORT, NAMESPACE, POLICY_RULES, RR_PORT, VxlanBench, scenarios
from bpfnet.ebpf import pins
from bpfnet.netns import Topology, inside, list_netns, run
from bpfnet.podnet.dataplane import Outcome
from bpfnet.podnet.policy import Direction

pytestmark = pytest.mark.root
PREFIX = "vx7t"


def mtu(ns: str, ifname: str) -> int:
    return json.loads(run(ns, ["ip", "-json", "link", "show", ifname]).stdout)[0]["mtu"]


def counter(dataplane, outcome: Outcome, direction: Direction) -> int:
    return dataplane.counters().get((outcome, direction), (0, 0))[0]


def test_every_peer_moves_bytes_through_its_own_path_and_nothing_is_left():
    with Topology(PREFIX) as topology:
        bench = VxlanBench(topology)
        servers = list(bench.servers)
        try:
            controller = bench.podnet.controller
            n1, n2 = controller.dataplanes["n1"], controller.dataplanes["n2"]
            arrived = {path.name: path.arrived() for path in bench.paths}
            tunneled = counter(n1, Outcome.TUNNELED, Direction.EGRESS)

            # the same MTUs on both rigs: full-size pod packets plus VXLAN fit the underlay
            plain, podnet = bench.plain, bench.podnet
            assert mtu(plain.pods["client"], "eth0") == mtu(podnet.client_ns, "eth0") == 1500
            assert mtu(plain.nodes[1], "underlay0") == mtu(f"{PREFIX}pod-n1", "underlay0") == 9000

            results = run_scenarios(scenarios(bench, seconds=1), rounds=1)

            assert all(r.median > 0 for r in results), [(r.name, r.median) for r in results]
            assert len(results) == 2 * len(bench.paths) == 2 * (2 + len(POLICY_RULES))
            # each peer's packets arrived where its path delivers them: the plain node's VXLAN
            # device, or n2's conntrack entries for that very server pod
            moved = {path.name: path.arrived() - arrived[path.name] for path in bench.paths}
            assert all(count > 0 for count in moved.values()), moved
            assert counter(n1, Outcome.TUNNELED, Direction.EGRESS) > tunneled

            # the tc programs reported each server's flows, arriving at n2 from the client pod by
            # its identity, and the aggregated trace events all fit the ring
            client = controller.compiled.identities[f"{NAMESPACE}/client"]
            arrivals = {flow.destination.pod for flow in controller.recent_flows()
                        if flow.node == "n2" and flow.direction == "ingress" and not flow.is_reply
                        and flow.source.identity == client and flow.verdict == "FORWARDED"}
            assert arrivals == {"server", *(f"guarded-{n}" for n in POLICY_RULES)}
            assert controller.lost_flow_events() == 0

            state = controller.state
            hits = n2.policy_hits()
            for rules in POLICY_RULES:
                address = state.pod(f"{NAMESPACE}/guarded-{rules}").address
                entries = {key: count for key, count in hits.items() if key.endpoint == address}
                assert len(entries) == rules + 1  # the client on two ports and the other rules
                used = {key.port: count for key, count in entries.items() if key.identity == client}
                assert used.keys() == {IPERF_PORT, RR_PORT} and all(used.values()), used

            # the policy is enforced on this path: a port no rule allows is dropped at n2
            guarded = str(state.pod(f"{NAMESPACE}/guarded-{POLICY_RULES[0]}").address)
            denied = counter(n2, Outcome.DROP_POLICY_DENIED, Direction.INGRESS)
            with inside(bench.podnet.client_ns):
                probe = socket.socket()
            with probe, pytest.raises(TimeoutError):
                probe.settimeout(0.5)
                probe.connect((guarded, RR_PORT + 1))
            assert counter(n2, Outcome.DROP_POLICY_DENIED, Direction.INGRESS) > denied
        finally:
            bench.close()
    assert all(server.poll() is not None for server in servers)
    assert not [ns for ns in list_netns() if ns.startswith(PREFIX)]
    assert not (pins.PIN_ROOT / f"bench-{PREFIX}pod").exists()


def test_the_cli_measures_both_tables_and_fails_cleanly_when_iperf3_is_missing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bpfnet.cli", "bench", "vxlan", "--rounds", "1",
                          "--seconds", "1", "--no-write"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "TCP plain VXLAN" in out.stdout and "RR bpfnet" in out.stdout
    assert not [ns for ns in list_netns() if ns.startswith("bv")]

    missing = subprocess.run([sys.executable, "-m", "bpfnet.cli", "bench", "vxlan", "--rounds", "1",
                              "--no-write"], capture_output=True, text=True, timeout=60,
                             env={"PATH": str(tmp_path), "PYTHONPATH": ":".join(sys.path)})
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: bench vxlan: iperf3 is not installed (run scripts/setup.sh)"
