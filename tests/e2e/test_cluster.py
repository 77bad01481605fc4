"""A fleet of three hosts on a three-member etcd: each host a network namespace with its own agent
process (own socket, pins, podnet node; `bpfnet.testing.fleet`), every object written once through
any host's API and enforced on all of them.

- the Kubernetes NetworkPolicy conformance cases with pods on the three hosts, with real sockets;
- a ddos rule added on one host drops traffic on all three; a VIP added once sends a flow to the
  same real through either of two LB hosts;
- faults: an etcd member killed (writes go on), every member stopped (data planes keep forwarding,
  writes say the store is unreachable, agents catch up when it returns without a restart), an agent
  killed with `kill -9` while others write (it catches up when started again), a host cut off longer
  than its lease (the others stop routing to its pods, it rejoins), two hosts racing for one VIP.

Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_cluster.py
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bpfnet.app.client import AgentRequestError
from bpfnet.bench.trafficgen import udp_frame
from bpfnet.netns import list_netns
from bpfnet.podnet import pods as podnet_pods
from bpfnet.podnet.config import Node, PodnetState, Underlay
from bpfnet.podnet.probe import Probe, run_probes
from bpfnet.testing.conformance import CASES, check_matrix, model_state
from bpfnet.testing.etcd import EtcdCluster
from bpfnet.testing.fleet import BPFNET, Fleet

pytestmark = pytest.mark.root

TAG = "cl" + secrets.token_hex(2)
LEASE_TTL = 3
UNDERLAY = Underlay(fabric_netns=f"{TAG}-fabric")  # model_state gives nodes addresses of the default cidr
VIP = "10.120.0.1:80/tcp"
REALS = ["10.121.0.1", "10.121.0.2", "10.121.0.3"]


def wait_for(predicate, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def revisions(fleet: Fleet, app: str) -> list[int]:
    out = []
    for host in fleet.hosts:
        with fleet.client(host) as client:
            out.append(client.health()["apps"][app]["revision"])
    return out


def converged(fleet: Fleet, app: str, revision: int, hosts=None) -> None:
    """Every (given) host's agent has applied `app` at `revision` or later."""
    def done() -> bool:
        for host in hosts or fleet.hosts:
            with fleet.client(host) as client:
                if client.health()["apps"][app]["revision"] < revision:
                    return False
        return True
    try:
        wait_for(done, what=f"{app} at revision {revision} on every host")
    except AssertionError as err:
        seen = {}
        for host in hosts or fleet.hosts:
            with fleet.client(host) as client:
                seen[host.name] = client.health()["apps"][app]
        raise AssertionError(f"{err}: {seen}") from None


@pytest.fixture(scope="module")
def cluster():
    fleet = Fleet(TAG, 3, net=98)
    etcd = None
    try:
        fleet.build()
        etcd = EtcdCluster(3, host=fleet.store_address).start()
        podnet_pods.ensure_fabric(UNDERLAY)  # the hosts' network for VXLAN, there before any agent
        for host in fleet.hosts:
            started = fleet.start_agent(host, etcd.url, "--lease-ttl", str(LEASE_TTL))
            assert started.returncode == 0, started.stdout + started.stderr
        nodes = [Node(name=h.name, pod_cidr=f"10.{110 + h.index}.0.0/24", netns=h.netns) for h in fleet.hosts]
        base = model_state(nodes).model_copy(update={"underlay": UNDERLAY})
        with fleet.client(fleet.hosts[0]) as client:
            answer = client.put_state("podnet", base.model_dump(mode="json", by_alias=True, exclude_none=True))
        converged(fleet, "podnet", answer["revision"])
        with fleet.client(fleet.hosts[1]) as client:
            state = PodnetState.model_validate(client.get_state("podnet"))
        wait_for(lambda: all(_reachable(state, a, b) for a, b in [("x/a", "y/b"), ("y/b", "z/c")]),
                 what="pods serving across hosts")
        yield fleet, etcd, state
    finally:
        try:
            fleet.close()
        finally:
            podnet_pods.remove_fabric(UNDERLAY)
            if etcd is not None:
                etcd.close()
        leftovers = [ns for ns in list_netns() if ns.startswith(TAG)]
        assert not leftovers, leftovers


def _reachable(state: PodnetState, a: str, b: str, port: int = 80, timeout: float = 1.0) -> bool:
    pod = state.pod(a)
    [ok] = run_probes([Probe(podnet_pods.pod_netns(state.node(pod.node), pod), state.pod(b).ip, port, "TCP")],
                      timeout)
    return ok


def put_podnet(fleet: Fleet, host_index: int, state: PodnetState) -> int:
    with fleet.client(fleet.hosts[host_index]) as client:
        return client.put_state("podnet", state.model_dump(mode="json", by_alias=True, exclude_none=True))["revision"]


def test_the_pods_are_on_three_hosts_each_programmed_by_its_own_agent(cluster):
    fleet, _, state = cluster
    assert {p.node for p in state.pods} == {"h0", "h1", "h2"}
    for host in fleet.hosts:
        with fleet.client(host) as client:
            health = client.health()
        assert health["store"].startswith("etcd://")
        assert health["fleet"]["members"] == ["h0", "h1", "h2"]
        assert {p.name for p in host.pin_root.joinpath("podnet").iterdir() if p.is_dir()} >= {host.name}
        assert not any(p.name in {h.name for h in fleet.hosts if h is not host}
                       for p in host.pin_root.joinpath("podnet").iterdir())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conformance_with_an_agent_per_host(cluster, case):
    """Each step written once, through a different host each time; probed once every agent has it."""
    fleet, _, base = cluster
    state = base
    for number, step in enumerate(case.steps):
        state = step.change(state)
        converged(fleet, "podnet", put_podnet(fleet, number % 3, state))
        for port, protocol in step.probes:
            check_matrix(state, port, protocol)
    converged(fleet, "podnet", put_podnet(fleet, 0, base))


def send_frames(fleet: Fleet, host, frames: list[bytes]) -> None:
    """Into the host's data0 from its peer in the root namespace."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((f"{fleet.prefix}d{host.index}", 0))
        for frame in frames:
            sock.send(frame)


def test_a_ddos_rule_written_on_one_host_drops_on_all_three(cluster):
    fleet, _, _ = cluster
    with fleet.client(fleet.hosts[1]) as client:
        settings, _ = client.get_settings("ddos")
        client.put_settings("ddos", {**settings, "interfaces": ["data0"]})
        added = client.create_object("ddos", "rules", {"expr": "udp dst port 7777", "comment": "fleet-wide"})
    converged(fleet, "ddos", added["revision"])
    frame = udp_frame(b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02", "10.130.0.1", "10.130.0.2",
                      4000, 7777)
    other = udp_frame(b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02", "10.130.0.1", "10.130.0.2",
                      4000, 7778)
    for host in fleet.hosts:
        send_frames(fleet, host, [frame] * 50 + [other] * 5)

    def dropped(host) -> int:
        with fleet.client(host) as client:
            rows = client.query("ddos", "rules")
        return sum(r["packets"] for r in rows if r["expr"] == "udp dst port 7777" and r["in_force"])
    wait_for(lambda: all(dropped(h) >= 50 for h in fleet.hosts), timeout=10, what="50 drops on every host")
    for host in fleet.hosts:
        assert dropped(host) == 50  # the other 5 frames did not match
    with fleet.client(fleet.hosts[2]) as client:
        gone = client.delete_object("ddos", "rules", added["key"])
    converged(fleet, "ddos", gone["revision"])


def capture(fleet: Fleet, host, count: int, timeout: float = 3.0) -> list[bytes]:
    """Frames the host's data0 sends back (XDP_TX) to its root-namespace peer."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as sock:
        sock.bind((f"{fleet.prefix}d{host.index}", 0))
        sock.settimeout(0.2)
        frames: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count and time.monotonic() < deadline:
            try:
                data, address = sock.recvfrom(4096)
            except TimeoutError:
                continue
            if address[2] == socket.PACKET_OUTGOING:
                continue
            if data[12:14] == b"\x08\x00" and data[23] == 4:  # IPv4 carrying IPIP: what the LB sends
                frames.append(data)
        return frames


def test_a_vip_written_once_sends_a_flow_to_the_same_real_through_either_lb_host(cluster):
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    fleet, _, _ = cluster
    with fleet.client(fleet.hosts[2]) as client:
        settings, _ = client.get_settings("lb")
        client.put_settings("lb", {"settings": {**settings["settings"], "interface": "data0", "use_fib": False,
                                                "gateway_mac": "02:00:00:00:00:fe"}})
        client.put_object("lb", "vips", VIP, {"address": VIP.split(":")[0], "port": 80}, create_only=True)
        for real in REALS:
            last = client.put_object("lb", "reals", f"{VIP}/{real}", {"address": real})
    converged(fleet, "lb", last["revision"])
    flows = [bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                   / IP(src=f"10.131.{n // 250}.{n % 250 + 1}", dst=VIP.split(":")[0])
                   / TCP(sport=10000 + n, dport=80, flags="S")) for n in range(40)]
    picked = {}
    for host in fleet.hosts[:2]:
        with ThreadPoolExecutor(1) as pool:
            seen = pool.submit(capture, fleet, host, len(flows))
            time.sleep(0.3)
            send_frames(fleet, host, flows)
            frames = seen.result()
        assert len(frames) == len(flows)
        # the inner packet is the client's; the outer destination is the real the ring chose
        picked[host.name] = {frame[14 + 20 + 12:14 + 20 + 20]: socket.inet_ntoa(frame[30:34]) for frame in frames}
    assert picked["h0"] == picked["h1"]
    assert set(picked["h0"].values()) == set(REALS)  # 40 flows spread over the three reals


def test_one_etcd_member_killed_writes_go_on(cluster):
    fleet, etcd, _ = cluster
    etcd.kill(1)
    try:
        with fleet.client(fleet.hosts[0]) as client:
            added = client.create_object("ddos", "rules", {"expr": "udp dst port 7001", "comment": "member down"})
        converged(fleet, "ddos", added["revision"])
    finally:
        etcd.start_member(1)
    with fleet.client(fleet.hosts[2]) as client:
        assert any(r["object"]["comment"] == "member down" for r in client.list_objects("ddos", "rules"))
        client.delete_object("ddos", "rules", added["key"])


def test_with_every_etcd_member_stopped_data_planes_forward_and_agents_catch_up_after(cluster):
    fleet, etcd, state = cluster
    before = revisions(fleet, "ddos")
    for index in range(3):
        etcd.stop(index)
    try:
        assert _reachable(state, "x/a", "z/b") and _reachable(state, "z/b", "y/c")  # across hosts, no store
        refused = subprocess.run([str(BPFNET), "ddos", "rule", "add", "udp dst port 7002",
                                  "--socket", str(fleet.hosts[0].socket)], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1
        assert "is unreachable" in refused.stdout + refused.stderr
    finally:
        for index in range(3):
            etcd.start_member(index, wait=False)
        for index in range(3):
            etcd.wait_healthy(index)
    assert revisions(fleet, "ddos") == before  # nothing half-written
    with fleet.client(fleet.hosts[1]) as client:
        added = client.create_object("ddos", "rules", {"expr": "udp dst port 7003", "comment": "after etcd"})
    converged(fleet, "ddos", added["revision"])  # the same agents, no restart: their watches came back
    with fleet.client(fleet.hosts[1]) as client:
        client.delete_object("ddos", "rules", added["key"])


def test_an_agent_killed_while_others_write_catches_up_when_started_again(cluster):
    fleet, etcd, _ = cluster
    victim = fleet.hosts[2]
    fleet.kill_agent(victim)
    with fleet.client(fleet.hosts[0]) as client:
        added = [client.create_object("ddos", "rules", {"expr": f"udp dst port {7100 + n}", "comment": "while down"})
                 for n in range(3)]
    started = fleet.start_agent(victim, etcd.url, "--lease-ttl", str(LEASE_TTL))
    assert started.returncode == 0, started.stdout + started.stderr
    converged(fleet, "ddos", added[-1]["revision"], hosts=[victim])
    with fleet.client(victim) as client:
        in_force = {r["expr"] for r in client.query("ddos", "rules") if r["in_force"]}
    assert {f"udp dst port {7100 + n}" for n in range(3)} <= in_force
    with fleet.client(fleet.hosts[0]) as client:
        for rule in added:
            client.delete_object("ddos", "rules", rule["key"])


def members_seen_by(fleet: Fleet, host) -> list[str]:
    with fleet.client(host) as client:
        return client.health()["fleet"]["members"]


def test_a_host_cut_off_longer_than_its_lease_is_dropped_and_rejoins(cluster):
    fleet, _, state = cluster
    cut = fleet.hosts[2]
    a = next(p.key for p in state.pods if p.node == "h0")
    c = next(p.key for p in state.pods if p.node == "h2")
    assert _reachable(state, a, c)
    fleet.cut(cut)
    try:
        wait_for(lambda: members_seen_by(fleet, fleet.hosts[0]) == ["h0", "h1"], timeout=LEASE_TTL * 4,
                 what="h2 dropped by h0")
        wait_for(lambda: not _reachable(state, a, c, timeout=0.5), timeout=10, what="h0 stops routing to h2's pods")
        assert _reachable(state, a, next(p.key for p in state.pods if p.node == "h1"))
    finally:
        fleet.heal(cut)
    wait_for(lambda: members_seen_by(fleet, fleet.hosts[0]) == ["h0", "h1", "h2"], timeout=LEASE_TTL * 4,
             what="h2 back")
    wait_for(lambda: _reachable(state, a, c), timeout=10, what="h0 routes to h2's pods again")


def test_two_hosts_racing_for_one_vip_get_one_result(cluster):
    fleet, _, _ = cluster
    vip = "10.120.0.9:443/tcp"

    def create(host):
        with fleet.client(host) as client:
            try:
                return client.put_object("lb", "vips", vip, {"address": "10.120.0.9", "port": 443},
                                         create_only=True)["revision"]
            except AgentRequestError as err:
                return err.status

    with ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(create, fleet.hosts[:2]), key=lambda r: r == 412)
    assert results[1] == 412 and results[0] not in (412, 409)
    converged(fleet, "lb", results[0])
    for host in fleet.hosts:
        with fleet.client(host) as client:
            assert [row["key"] for row in client.list_objects("lb", "vips")].count(vip) == 1
    # identities: every agent derives the same numbers from the same objects
    identities = []
    for host in fleet.hosts:
        with fleet.client(host) as client:
            identities.append({f"{e['namespace']}/{e['name']}": e["identity"]
                               for e in client.query("podnet", "endpoints")})
    assert identities[0] == identities[1] == identities[2] and len(identities[0]) == 9
