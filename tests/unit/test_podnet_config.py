"""NetworkPolicy parsing, defaults and validation errors; state consistency and addresses."""

from ipaddress import IPv4Address, IPv4Network

import pytest
from pydantic import ValidationError

from bpfnet.podnet.config import (
    ConfigError,
    Namespace,
    Node,
    Pod,
    PodnetState,
    Protocol,
    load_policies,
    parse_labels,
    parse_serve,
)

POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchExpressions: [{key: tier, operator: In, values: [fe]}]}
    - ipBlock: {cidr: 10.1.0.0/16, except: [10.1.2.0/24]}
    ports:
    - {port: 80}
    - {port: serve-81-udp, protocol: UDP}
    - {port: 1000, endPort: 2000, protocol: SCTP}
"""


def test_policy_fields_parse():
    (p,) = load_policies(POLICY)
    assert p.key == "x/web"
    rule = p.spec.ingress[0]
    assert rule.peers[0].namespace_selector.match_labels == {"team": "a"}
    assert rule.peers[0].pod_selector.match_expressions[0].values == ["fe"]
    assert rule.peers[1].ip_block.except_ == [IPv4Network("10.1.2.0/24")]
    assert [(pt.protocol, pt.port, pt.end_port) for pt in rule.ports] == [
        (Protocol.TCP, 80, None), (Protocol.UDP, "serve-81-udp", None),
        (Protocol.SCTP, 1000, 2000)]
    assert p.spec.effective_policy_types == {"Ingress"}


def test_policy_round_trips_through_json():
    (p,) = load_policies(POLICY)
    import json
    (again,) = load_policies(json.dumps(p.dump()))
    assert again == p


@pytest.mark.parametrize("spec, types", [
    ("{podSelector: {}}", {"Ingress"}),
    ("{podSelector: {}, egress: [{}]}", {"Ingress", "Egress"}),
    ("{podSelector: {}, egress: []}", {"Ingress"}),
    ("{podSelector: {}, egress: [{}], policyTypes: [Egress]}", {"Egress"}),
    ("{podSelector: {}, policyTypes: [Ingress, Egress]}", {"Ingress", "Egress"}),
])
def test_policy_types_default_as_kubernetes(spec, types):
    text = f"kind: NetworkPolicy\nmetadata: {{name: p}}\nspec: {spec}\n"
    (p,) = load_policies(text)
    assert p.spec.effective_policy_types == types
    assert p.namespace == "default"


def test_many_documents_and_lists():
    text = POLICY + "---\n" + POLICY.replace("name: web", "name: web2") + """---
kind: List
items:
- {kind: NetworkPolicy, metadata: {name: l1, namespace: y}, spec: {podSelector: {}}}
"""
    assert [p.key for p in load_policies(text)] == ["x/web", "x/web2", "y/l1"]


def test_nulls_mean_empty():
    text = """kind: NetworkPolicy
metadata: {name: p}
spec:
  podSelector:
  ingress:
  - from:
    ports:
"""
    (p,) = load_policies(text)
    assert p.spec.pod_selector.matches({"any": "thing"})
    assert p.spec.ingress[0].peers == [] and p.spec.ingress[0].ports == []


@pytest.mark.parametrize("change, message", [
    (("10.1.2.0/24]", "10.2.0.0/24]"), "from.1.ipBlock: except[0]: 10.2.0.0/24 is not a strict subset"),
    (("{port: 80}", "{port: 80, endPort: 70}"), "ports.0: endPort 70 must be within 80..65535"),
    (("{port: 80}", "{port: Web}"), "ports.0.port: port name 'Web' is not a valid port name"),
    (("{port: 80}", "{port: 0}"), "ports.0.port: port 0 is not in 1..65535"),
    (("{port: 80}", "{port: 80, protocol: ICMP}"), "ports.0.protocol: Input should be"),
    (("serve-81-udp, protocol", "serve-81-udp, endPort: 90, protocol"), "ports.1: endPort needs a numeric port"),
    (("values: [fe]", "values: []"), "matchExpressions.0: operator In needs a non-empty values list"),
    (("operator: In, values: [fe]", "operator: Exists, values: [fe]"), "operator Exists takes no values"),
    (("operator: In", "operator: Maybe"), "matchExpressions.0.operator: Input should be"),
    (("podSelector: {matchExp", "podSelectr: {matchExp"), "from.0.podSelectr: Extra inputs are not permitted"),
    (("- ipBlock: {cidr", "- podSelector: {}\n      ipBlock: {cidr"), "ipBlock cannot be combined"),
    (("10.1.0.0/16,", "fd00::/64,"), "ipBlock.cidr: fd00::/64: only IPv4 CIDRs are supported"),
    (("10.1.0.0/16,", "banana,"), "ipBlock.cidr: 'banana' is not a CIDR"),
    (("name: web", "name: Web"), "metadata.name: metadata.name 'Web' is not a DNS label"),
])
def test_errors_name_the_field(change, message):
    text = POLICY.replace(*change)
    assert text != POLICY
    with pytest.raises(ConfigError) as info:
        load_policies(text, "f.yaml")
    assert str(info.value).startswith("f.yaml: document 1 (")
    assert message in str(info.value)
    assert "spec.ingress.0" in str(info.value) or "metadata" in str(info.value)


def test_wrong_kind_and_bad_yaml():
    with pytest.raises(ConfigError, match="kind is 'Pod', expected 'NetworkPolicy'"):
        load_policies("kind: Pod\nmetadata: {name: x}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policies("kind: [")
    with pytest.raises(ConfigError, match="expected a NetworkPolicy mapping"):
        load_policies("- 1\n- 2\n")


def test_labels_and_serve_parsing():
    assert parse_labels("a=1, b=two") == {"a": "1", "b": "two"}
    assert parse_labels("") == {}
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_labels("a")
    with pytest.raises(ConfigError, match="not a valid Kubernetes label value"):
        parse_labels("a=b c")
    ports = parse_serve("80/tcp,81/udp")
    assert [(p.name, p.port, p.protocol) for p in ports] == [
        ("serve-80-tcp", 80, Protocol.TCP), ("serve-81-udp", 81, Protocol.UDP)]
    with pytest.raises(ConfigError, match="--serve item '80/icmp'"):
        parse_serve("80/icmp")
    with pytest.raises(ConfigError, match="--serve item '0/tcp'"):
        parse_serve("0/tcp")


def _state(**extra):
    base = dict(nodes=[Node(name="n1", pod_cidr="10.0.0.0/29")],
                namespaces=[Namespace(name="x", labels={"ns": "x"})],
                pods=[Pod(namespace="x", name="a", node="n1")])
    base.update(extra)
    return PodnetState(**base)


def test_namespace_labels_include_metadata_name():
    assert _state().namespace_labels("x") == {"ns": "x", "kubernetes.io/metadata.name": "x"}


def test_addresses_allocated_lowest_free_skipping_router():
    state = _state(pods=[Pod(namespace="x", name=n, node="n1") for n in "abcde"]).with_addresses()
    assert [str(p.address) for p in state.pods] == [f"10.0.0.{i}" for i in range(2, 7)]
    assert state.nodes[0].router_address == IPv4Address("10.0.0.1")
    full = _state(pods=[Pod(namespace="x", name=n, node="n1") for n in "abcdef"])
    with pytest.raises(ConfigError, match="node n1 has no free address left in 10.0.0.0/29"):
        full.with_addresses()


def test_existing_addresses_are_kept():
    state = _state(pods=[Pod(namespace="x", name="a", node="n1", address="10.0.0.5"),
                         Pod(namespace="x", name="b", node="n1")]).with_addresses()
    assert [str(p.address) for p in state.pods] == ["10.0.0.5", "10.0.0.2"]


@pytest.mark.parametrize("extra, message", [
    (dict(pods=[Pod(namespace="q", name="a", node="n1")]), "pod q/a: namespace 'q' does not exist"),
    (dict(pods=[Pod(namespace="x", name="a", node="n9")]), "pod x/a: node 'n9' does not exist"),
    (dict(pods=[Pod(namespace="x", name="a", node="n1", address="10.0.1.2")]),
     "address 10.0.1.2 is not a pod address of node n1"),
    (dict(pods=[Pod(namespace="x", name="a", node="n1", address="10.0.0.2"),
                Pod(namespace="x", name="b", node="n1", address="10.0.0.2")]),
     "pod x/b: address 10.0.0.2 is already used by x/a"),
    (dict(pods=[Pod(namespace="x", name="a", node="n1")] * 2), "pod 'x/a' is defined twice"),
    (dict(nodes=[Node(name="n1", pod_cidr="10.0.0.0/24"), Node(name="n2", pod_cidr="10.0.0.128/25")]),
     "overlaps node n2"),
])
def test_state_consistency(extra, message):
    with pytest.raises(ValidationError, match=message):
        _state(**extra)


def test_bad_names_and_labels():
    with pytest.raises(ValidationError, match="namespace name 'X_1' is not a DNS label"):
        Namespace(name="X_1")
    with pytest.raises(ValidationError, match="label key '-a' is not a valid"):
        Pod(namespace="x", name="a", node="n1", labels={"-a": "1"})
    with pytest.raises(ValidationError, match="too small"):
        Node(name="n1", pod_cidr="10.0.0.0/30")
