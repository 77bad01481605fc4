"""The policy compiler against the reference evaluator.

`datapath_allows` is a tiny interpreter of the compiled entries that mirrors the BPF program's
lookups: ipcache longest-prefix match of the remote address -> (label identity, local identity);
per isolated direction, an LPM lookup with the label identity, then with ANY, then with the local
identity; any hit allows.
"""

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfnet.podnet.config import (
    ContainerPort,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    PodnetState,
    Protocol,
)
from bpfnet.podnet.identity import ANY, HOST, WORLD
from bpfnet.podnet.policy import (
    ANY_PROTOCOL,
    CompiledPolicy,
    Direction,
    IpcacheEntry,
    PolicyKey,
    compile_policy,
    port_blocks,
)
from bpfnet.testing import reference
from bpfnet.testing.conformance import CASES, model_state, policy

PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1}
NODE = Node(name="n1", pod_cidr="10.0.0.0/24")


def ipcache_lookup(compiled: CompiledPolicy, address: IPv4Address) -> IpcacheEntry:
    matches = [p for p in compiled.ipcache if address in p]
    if not matches:
        return IpcacheEntry(WORLD, 0)
    return compiled.ipcache[max(matches, key=lambda p: p.prefixlen)]


def entry_hits(entry: PolicyKey, endpoint, direction, identity, protocol, port) -> bool:
    if (entry.endpoint, entry.direction, entry.identity) != (endpoint, direction, identity):
        return False
    if entry.protocol == ANY_PROTOCOL:
        return True
    shift = 16 - entry.port_bits
    return entry.protocol == protocol and entry.port >> shift == port >> shift


def policy_allows(endpoint, direction, remote: IpcacheEntry, protocol, port) -> bool:
    local = (remote.local_identity,) if remote.local_identity else ()
    for identity in (remote.identity, ANY, *local):
        if any(entry_hits(e, endpoint.address, direction, identity, protocol, port)
               for e in endpoint.entries):
            return True
    return False


def datapath_allows(compiled: CompiledPolicy, src: IPv4Address, dst: IPv4Address, port: int,
                    protocol: str) -> bool:
    by_address = {ep.address: ep for ep in compiled.endpoints.values()}
    number = PROTOCOLS[protocol]
    port = port if protocol != "ICMP" else 0
    source, destination = by_address.get(src), by_address.get(dst)
    if source and source.egress_isolated and not policy_allows(
            source, Direction.EGRESS, ipcache_lookup(compiled, dst), number, port):
        return False
    if destination and destination.ingress_isolated and not policy_allows(
            destination, Direction.INGRESS, ipcache_lookup(compiled, src), number, port):
        return False
    return True


def address_of(endpoint):
    return endpoint.address if isinstance(endpoint, Pod) else endpoint


def assert_agrees(state: PodnetState, endpoints, probes):
    compiled = compile_policy(state)
    for src in endpoints:
        for dst in endpoints:
            if src is dst or not (isinstance(src, Pod) or isinstance(dst, Pod)):
                continue
            for port, proto in probes:
                want = reference.allowed(state, src, dst, port, proto)
                got = datapath_allows(compiled, address_of(src), address_of(dst), port, proto)
                assert got == want, (src, dst, port, proto, state.policies)


# --- compiler details -----------------------------------------------------------------------------

def test_port_blocks_cover_exactly():
    assert port_blocks(80, 80) == [(80, 16)]
    assert port_blocks(0, 65535) == [(0, 0)]
    assert port_blocks(80, 90) == [(80, 13), (88, 15), (90, 16)]
    for first, last in [(1, 65535), (1000, 2000), (65535, 65535), (32767, 32769)]:
        covered = set()
        for start, bits in port_blocks(first, last):
            size = 1 << (16 - bits)
            assert start % size == 0
            covered |= set(range(start, start + size))
        assert covered == set(range(first, last + 1))


def test_prefix_lengths():
    ep = IPv4Address("10.0.0.2")
    assert PolicyKey(ep, 5, Direction.INGRESS).prefixlen == 72
    assert PolicyKey(ep, 5, Direction.INGRESS, 6, 0, 0).prefixlen == 80
    assert PolicyKey(ep, 5, Direction.INGRESS, 6, 80, 16).prefixlen == 96


@pytest.fixture
def model():
    return model_state([NODE])


def test_identities_ipcache_and_isolation(model):
    s = model.model_copy(update={"policies": [
        policy("p", "x", {"matchLabels": {"pod": "a"}}, ingress=[{"from": [
            {"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.3/32"]}}]}])]})
    c = compile_policy(s)
    assert len(set(c.identities.values())) == 9
    assert c.ipcache[IPv4Network("10.0.0.1/32")].identity == HOST
    assert c.ipcache[IPv4Network("10.0.0.0/24")].identity == WORLD
    xa = c.endpoints["x/a"]
    assert xa.ingress_isolated and not xa.egress_isolated
    assert xa.selected_by == {Direction.INGRESS: ["x/p"], Direction.EGRESS: []}
    allowed_local = {e.identity for e in xa.entries}
    local_of = {p: e.local_identity for p, e in c.ipcache.items()}
    assert local_of[IPv4Network("10.0.0.3/32")] not in allowed_local   # x/b: the except
    assert local_of[IPv4Network("10.0.0.2/32")] in allowed_local       # x/a itself
    assert local_of[IPv4Network("10.0.0.0/24")] in allowed_local       # world inside the CIDR
    assert not c.endpoints["x/b"].entries and not c.endpoints["x/b"].ingress_isolated


def test_compilation_is_deterministic(model):
    s = model.model_copy(update={"policies": [CASES[7].steps[0].change(model).policies[0]]})
    assert compile_policy(s) == compile_policy(s)


def test_entries_for_ports_and_ranges(model):
    s = model.model_copy(update={"policies": [policy("p", "x", ingress=[
        {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
         "ports": [{"port": 80, "endPort": 83}, {"protocol": "UDP"}, {"port": "serve-81-tcp"}]}])]})
    c = compile_policy(s)
    xb = c.identities["x/b"]
    entries = {(e.identity, e.protocol, e.port, e.port_bits) for e in c.endpoints["x/a"].entries}
    assert entries == {(xb, 6, 80, 14), (xb, 17, 0, 0), (xb, 6, 81, 16)}


# --- the conformance model, every case, every step ------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conformance_case_compiles_to_the_reference(case, model):
    state = model
    for step in case.steps:
        state = step.change(state)
        world = [IPv4Address("10.0.0.250"), IPv4Address("192.168.1.1")]
        assert_agrees(state, state.pods + world, step.probes + [(82, "TCP"), (0, "ICMP")])


def test_at_least_thirty_conformance_cases():
    assert len(CASES) >= 30


# --- the property: random pods, labels and policies ------------------------------------------------

KEYS = ["app", "tier"]
VALUES = ["1", "2"]
label_dicts = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2)
requirements = st.one_of(
    st.builds(lambda k, op, v: {"key": k, "operator": op, "values": v}, st.sampled_from(KEYS),
              st.sampled_from(["In", "NotIn"]), st.lists(st.sampled_from(VALUES), min_size=1, max_size=2)),
    st.builds(lambda k, op: {"key": k, "operator": op}, st.sampled_from(KEYS + ["kubernetes.io/metadata.name"]),
              st.sampled_from(["Exists", "DoesNotExist"])),
)
selectors = st.one_of(
    st.just({}),
    st.builds(lambda ml, me: {"matchLabels": ml, "matchExpressions": me},
              st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=1),
              st.lists(requirements, max_size=1)))
CIDRS = ["10.0.0.0/24", "10.0.0.0/29", "10.0.0.4/30", "10.0.0.2/32", "10.0.0.0/28", "0.0.0.0/0",
         "192.168.0.0/16"]


@st.composite
def ip_blocks(draw):
    cidr = IPv4Network(draw(st.sampled_from(CIDRS)))
    inside = [c for c in CIDRS if IPv4Network(c).subnet_of(cidr) and IPv4Network(c) != cidr]
    excepts = draw(st.lists(st.sampled_from(inside), max_size=2, unique=True)) if inside else []
    return {"ipBlock": {"cidr": str(cidr), "except": excepts}}


peers = st.one_of(
    st.builds(lambda s: {"podSelector": s}, selectors),
    st.builds(lambda s: {"namespaceSelector": s}, selectors),
    st.builds(lambda a, b: {"podSelector": a, "namespaceSelector": b}, selectors, selectors),
    ip_blocks(),
    ip_blocks(),
)
named_ports = st.builds(lambda n, proto: {"port": n, "protocol": proto},
                        st.sampled_from(["http", "dns"]), st.sampled_from(["TCP", "UDP"]))
ports = st.one_of(
    named_ports,
    st.builds(lambda p, proto: {"port": p, "protocol": proto}, st.sampled_from([80, 81, 82]),
              st.sampled_from(["TCP", "UDP"])),
    st.builds(lambda p, e: {"port": p, "endPort": p + e}, st.sampled_from([80, 81]), st.integers(0, 2)),
    named_ports,
    st.builds(lambda proto: {"protocol": proto}, st.sampled_from(["TCP", "UDP", "SCTP"])),
)
rules = st.builds(lambda p, q: {k: v for k, v in (("peers", p), ("ports", q)) if v is not None},
                  st.one_of(st.none(), st.lists(peers, min_size=1, max_size=2)),
                  st.one_of(st.none(), st.lists(ports, min_size=1, max_size=2)))


@st.composite
def policies(draw, namespaces):
    def direction(key):
        return [{(key if k == "peers" else k): v for k, v in r.items()}
                for r in draw(st.lists(rules, max_size=2))]
    spec = {"podSelector": draw(selectors), "ingress": direction("from"),
            "egress": direction("to")}
    types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    if types:
        spec["policyTypes"] = types
    return NetworkPolicy.model_validate({
        "kind": "NetworkPolicy", "spec": spec,
        "metadata": {"name": f"p{draw(st.integers(0, 10**6))}", "namespace": draw(st.sampled_from(namespaces))}})


container_ports = st.lists(st.builds(
    lambda n, p, proto: ContainerPort(name=n, port=p, protocol=proto),
    st.sampled_from(["http", "dns"]), st.sampled_from([80, 81, 82]),
    st.sampled_from([Protocol.TCP, Protocol.UDP])), max_size=2, unique_by=lambda c: (c.name, c.protocol))


@st.composite
def states(draw):
    names = ["ns1", "ns2", "ns3"][: draw(st.integers(1, 3))]
    namespaces = [Namespace(name=n, labels=draw(label_dicts)) for n in names]
    pod_list = [Pod(namespace=draw(st.sampled_from(names)), name=f"pod{i}", labels=draw(label_dicts),
                    node="n1", ports=draw(container_ports)) for i in range(draw(st.integers(2, 6)))]
    pols = draw(st.lists(policies(names), min_size=1, max_size=2, unique_by=lambda p: p.key))
    return PodnetState(nodes=[NODE], namespaces=namespaces, pods=pod_list,
                       policies=pols).with_addresses()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_compiled_maps_agree_with_the_reference(state):
    world = [IPv4Address(a) for a in ("10.0.0.3", "10.0.0.9", "10.0.0.200", "192.168.3.4", "8.8.8.8")]
    world = [a for a in world if a not in {p.address for p in state.pods}]
    probes = [(p, proto) for p in (80, 81, 82) for proto in ("TCP", "UDP", "SCTP")] + [(0, "ICMP")]
    assert_agrees(state, state.pods + world, probes)


def test_each_node_gets_its_endpoints_and_the_whole_ipcache():
    from bpfnet.podnet.dataplane import EndpointLink, desired_maps

    nodes = [Node(name="n1", pod_cidr="10.0.1.0/24"), Node(name="n2", pod_cidr="10.0.2.0/24")]
    state = model_state(nodes)
    state = state.model_copy(update={"policies": [policy("deny", "x", types=["Ingress"]),
                                                  policy("p", "y", egress=[{"ports": [{"port": 80}]}])]})
    compiled = compile_policy(state)
    links = {p.key: EndpointLink(i + 10, bytes(6), bytes(6)) for i, p in enumerate(state.pods)}
    for node in ("n1", "n2"):
        desired = desired_maps(compiled, node, links)
        local = {p.address for p in state.pods if p.node == node}
        assert set(desired.endpoints) == local
        assert {e.endpoint for e in desired.policy} <= local
        assert {IPv4Network(p.address) for p in state.pods} <= set(desired.ipcache)
        assert {IPv4Network(n.router_address) for n in nodes} <= set(desired.ipcache)
    yb = state.pod("y/b")
    assert yb.address in desired_maps(compiled, yb.node, links).endpoints
    without = desired_maps(compiled, yb.node, {k: v for k, v in links.items() if k != "y/b"})
    assert yb.address not in without.endpoints  # no veth yet: not an endpoint yet
