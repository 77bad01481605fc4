"""The VXLAN bench's pod network: what the policy peers' rules compile to (no root)."""

import pytest

from bpfnet.bench.vxlan import IPERF_PORT, NAMESPACE, RR_PORT, podnet_state
from bpfnet.podnet.policy import Direction, compile_policy
from bpfnet.testing import reference


def test_state_puts_the_client_on_one_node_and_every_server_on_the_other():
    state = podnet_state("vx7u", rules=(10, 100))
    nodes = {p.name: p.node for p in state.pods}
    assert nodes == {"client": "n1", "server": "n2", "guarded-10": "n2", "guarded-100": "n2"}
    assert [n.netns for n in state.nodes] == ["vx7u-n1", "vx7u-n2"]
    assert state.underlay.fabric_netns == "vx7u-fabric"
    assert all(p.address is not None for p in state.pods)


@pytest.mark.parametrize("rules", [1, 10, 1000])
def test_a_guarded_server_holds_its_rules_and_admits_only_the_client_on_the_measured_ports(rules):
    state = podnet_state("vx7u", rules=(rules,))
    compiled = compile_policy(state)
    guarded = compiled.endpoints[f"{NAMESPACE}/guarded-{rules}"]
    client_identity = compiled.identities[f"{NAMESPACE}/client"]
    assert guarded.ingress_isolated and not guarded.egress_isolated
    # the client on two ports, and one entry per other rule
    assert len(guarded.entries) == 2 + (rules - 1)
    assert {(e.identity, e.port) for e in guarded.entries if e.identity == client_identity} == {
        (client_identity, IPERF_PORT), (client_identity, RR_PORT)}
    assert all(e.direction is Direction.INGRESS for e in guarded.entries)
    assert not compiled.endpoints[f"{NAMESPACE}/server"].ingress_isolated
    client, server = state.pod(f"{NAMESPACE}/client"), state.pod(f"{NAMESPACE}/guarded-{rules}")
    assert reference.allowed(state, client, server, IPERF_PORT, "TCP")
    assert reference.allowed(state, client, server, RR_PORT, "TCP")
    assert not reference.allowed(state, client, server, RR_PORT + 1, "TCP")
