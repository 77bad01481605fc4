"""Several nodes: underlay addresses (allocation and validation), the ipcache's tunnel endpoints
for pods of other nodes, and `bpfnet node add` without a pod CIDR."""

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from bpfnet.podnet import cli
from bpfnet.podnet.config import ConfigError, Node, PodnetState, Underlay
from bpfnet.podnet.dataplane import NO_TUNNEL, EndpointLink, Overlay, desired_maps
from bpfnet.podnet.policy import compile_policy
from bpfnet.testing.conformance import model_state
from support.fake_agent import podnet_agent

NODES = [Node(name=f"n{i}", pod_cidr=f"10.0.{i}.0/24") for i in (1, 2, 3)]


def test_nodes_get_the_lowest_free_underlay_addresses_and_keep_them():
    state = PodnetState(nodes=[NODES[0], NODES[1].model_copy(update={"underlay_address": IPv4Address("192.168.255.1")}),
                               NODES[2]]).with_addresses()
    assert [str(n.underlay_address) for n in state.nodes] == ["192.168.255.2", "192.168.255.1",
                                                              "192.168.255.3"]
    assert state.with_addresses() == state


def test_underlay_cidr_is_configurable_and_can_run_out():
    small = Underlay(cidr="172.31.0.0/30", fabric_netns="f")
    state = PodnetState(nodes=NODES[:2], underlay=small).with_addresses()
    assert [str(n.underlay_address) for n in state.nodes] == ["172.31.0.1", "172.31.0.2"]
    with pytest.raises(ConfigError, match="node n3: no free underlay address left in 172.31.0.0/30"):
        PodnetState(nodes=NODES, underlay=small).with_addresses()


@pytest.mark.parametrize("nodes, underlay, message", [
    ([NODES[0].model_copy(update={"underlay_address": IPv4Address("10.9.9.9")})], Underlay(),
     "node n1: underlay address 10.9.9.9 is not a host address of the underlay cidr 192.168.255.0/24"),
    ([NODES[0].model_copy(update={"underlay_address": IPv4Address("192.168.255.255")})], Underlay(),
     "is not a host address"),
    ([n.model_copy(update={"underlay_address": IPv4Address("192.168.255.7")}) for n in NODES[:2]],
     Underlay(), "node n2: underlay address 192.168.255.7 is already used by node n1"),
    (NODES[:1], Underlay(cidr="10.0.0.0/16"), "node n1 pod_cidr 10.0.1.0/24 overlaps the underlay cidr"),
])
def test_bad_underlay_is_refused_naming_the_problem(nodes, underlay, message):
    with pytest.raises(ValidationError, match=message):
        PodnetState.model_validate({"nodes": [n.model_dump() for n in nodes],
                                    "underlay": underlay.model_dump()})


def test_underlay_cidr_must_leave_room_for_nodes():
    with pytest.raises(ValidationError, match="too small"):
        Underlay(cidr="192.168.255.0/31")


def test_ipcache_points_pods_of_other_nodes_at_their_node():
    state = model_state(NODES)
    compiled = compile_policy(state)
    underlay = {n.name: n.underlay_address for n in state.nodes}
    links = {p.key: EndpointLink(10 + i, bytes(6), bytes(6)) for i, p in enumerate(state.pods)}
    for node in state.nodes:
        desired = desired_maps(compiled, node.name, links, Overlay(42, underlay))
        assert desired.node == (42, node.underlay_address)
        for pod in state.pods:
            tunnel = desired.ipcache[IPv4Network(pod.address)][2]
            assert tunnel == (NO_TUNNEL if pod.node == node.name else underlay[pod.node])
        assert set(desired.endpoints) == {p.address for p in state.pods if p.node == node.name}
    single = desired_maps(compiled, "n1", links)
    assert single.node == (0, NO_TUNNEL)
    assert {entry[2] for entry in single.ipcache.values()} == {NO_TUNNEL}


def test_node_add_picks_a_free_pod_cidr_and_an_underlay_address(monkeypatch):
    podnet_agent(monkeypatch)
    runner = CliRunner()

    def ok(*args):
        result = runner.invoke(cli.app, list(args))
        assert result.exit_code == 0, result.output
        return result.output
    ok("node", "add", "n1", "--pod-cidr", "10.244.2.0/24")
    assert ok("node", "add", "n2").strip() == ("node n2 added with pod CIDR 10.244.1.0/24 and "
                                               "underlay address 192.168.255.2")
    assert "pod CIDR 10.244.3.0/24" in ok("node", "add", "n3")
    rows = json.loads(ok("node", "list", "-o", "json"))
    assert [(r["name"], r["pod_cidr"], r["underlay"]) for r in rows] == [
        ("n1", "10.244.2.0/24", "192.168.255.1"), ("n2", "10.244.1.0/24", "192.168.255.2"),
        ("n3", "10.244.3.0/24", "192.168.255.3")]
