"""One podnet controller per node (what `bpfnet agent --node NAME` runs on each host), all given
the same state as agents sharing a store are: each programs only its own node, pods talk across
the overlay as the policy says, and a node whose agent detaches takes only its own namespaces and
pins with it.

Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_podnet_node_agents.py
"""

import uuid

import pytest

from bpfnet.ebpf import pins
from bpfnet.netns import list_netns
from bpfnet.podnet import pods as podnet_pods
from bpfnet.podnet.config import Node, Underlay
from bpfnet.podnet.controller import PodnetController
from bpfnet.podnet.probe import Probe, run_probes
from bpfnet.testing import reference
from bpfnet.testing.conformance import model_state, policy

pytestmark = pytest.mark.root

TAG = "na-" + uuid.uuid4().hex[:5]
NODES = [Node(name=f"n{i}", pod_cidr=f"10.81.{i}.0/24", netns=f"{TAG}-n{i}") for i in (1, 2, 3)]
UNDERLAY = Underlay(cidr="192.168.254.0/24", fabric_netns=f"{TAG}-fabric")


@pytest.fixture(scope="module")
def agents():
    state = model_state(NODES).model_copy(update={"underlay": UNDERLAY}).with_addresses()
    roots = {node.name: pins.pin_dir(f"{TAG}-{node.name}") for node in NODES}
    controllers = {name: PodnetController(root, nodes=[name]) for name, root in roots.items()}
    try:
        for controller in controllers.values():
            controller.start(state)
        yield controllers, state
    finally:
        for controller in controllers.values():
            controller.stop(detach=True)
        podnet_pods.remove_fabric(UNDERLAY)
        for root in roots.values():
            pins.unpin(root)
        leftovers = [ns for ns in list_netns() if ns.startswith(TAG)]
        assert not leftovers, leftovers


def probes(state, pairs, port=80, protocol="TCP"):
    def probe(a, b):
        pod = state.pod(a)
        return Probe(podnet_pods.pod_netns(state.node(pod.node), pod), state.pod(b).address, port, protocol)
    return dict(zip(pairs, run_probes([probe(a, b) for a, b in pairs], 3.0), strict=True))


def test_each_agent_programs_only_its_own_node(agents):
    controllers, state = agents
    for name, controller in controllers.items():
        assert set(controller.dataplanes) == {name}
        assert {p.name for p in controller.pin_dir.iterdir() if p.is_dir()} == {name}
    namespaces = set(list_netns())
    for node in NODES:
        assert node.netns in namespaces
        assert {podnet_pods.pod_netns(node, p) for p in state.pods if p.node == node.name} <= namespaces


def test_a_policy_given_to_every_agent_is_enforced_across_nodes(agents):
    controllers, state = agents
    # ingress to x/a only from x/b, written once and given to every agent
    only_b = policy("p", "x", {"matchLabels": {"pod": "a"}},
                    ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])
    with_policy = state.model_copy(update={"policies": [only_b]})
    for controller in controllers.values():
        controller.apply(with_policy)
    keys = [p.key for p in state.pods]
    pairs = [(a, b) for a in keys for b in keys if a != b and state.pod(a).node != state.pod(b).node]
    observed = probes(with_policy, pairs)
    expected = {(a, b): reference.allowed(with_policy, with_policy.pod(a), with_policy.pod(b), 80, "TCP")
                for a, b in pairs}
    wrong = {pair: observed[pair] for pair in pairs if observed[pair] != expected[pair]}
    assert not wrong, wrong
    assert any(expected.values()) and not all(expected.values())  # the case allows some, denies some


def kernel_ipcache(controller) -> set[bytes]:
    """The /32 addresses in the node's ipcache map, read from the kernel."""
    return {bytes(key.addr) for key, _ in controller.dataplanes["n1"].ipcache.items() if key.prefixlen == 32}


def test_a_node_whose_lease_ran_out_is_not_routed_to_until_it_is_back(agents):
    controllers, state = agents
    for controller in controllers.values():
        controller.apply(state)
    a = next(p.key for p in state.pods if p.node == "n1")
    b = next(p.key for p in state.pods if p.node == "n2")
    c = next(p.key for p in state.pods if p.node == "n3")
    b_address = state.pod(b).address
    controllers["n1"].members_changed({"n1", "n3"})  # n2's agent lost its lease
    ipcache = kernel_ipcache(controllers["n1"])
    assert b_address.packed not in ipcache and state.pod(c).address.packed in ipcache
    assert probes(state, [(a, b), (a, c)]) == {(a, b): False, (a, c): True}
    controllers["n1"].members_changed({"n1", "n2", "n3"})  # it re-registered
    assert b_address.packed in kernel_ipcache(controllers["n1"])
    assert probes(state, [(a, b)]) == {(a, b): True}


def test_a_node_whose_agent_detaches_takes_only_its_own_pods(agents):
    controllers, state = agents
    for controller in controllers.values():
        controller.apply(state)
    controllers["n2"].stop(detach=True)
    remaining = set(list_netns())
    assert NODES[1].netns not in remaining
    assert NODES[0].netns in remaining and NODES[2].netns in remaining
    a = next(p.key for p in state.pods if p.node == "n1")
    c = next(p.key for p in state.pods if p.node == "n3")
    assert probes(state, [(a, c), (c, a)]) == {(a, c): True, (c, a): True}
    controllers["n2"] = PodnetController(pins.pin_dir(f"{TAG}-n2"), nodes=["n2"])
    controllers["n2"].start(state)  # it rejoins: its pods are reachable again
    b = next(p.key for p in state.pods if p.node == "n2")
    assert probes(state, [(a, b), (b, c)]) == {(a, b): True, (b, c): True}
