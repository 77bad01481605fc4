"""The Kubernetes network-policy test model and its cases (test/e2e/network/netpol upstream).

Namespaces x, y, z (label ns=NAME, plus kubernetes.io/metadata.name) each hold pods a, b, c (label
pod=NAME) serving 80 and 81 on TCP and UDP with container ports named serve-PORT-PROTO. A case is a
series of steps; each step changes the state (policies, labels) and is then probed on some
ports, every cell compared with the reference evaluator. Shared by the unit tests (compiled maps)
and the end-to-end tests (real sockets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bpfnet.podnet.config import (
    ContainerPort,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    PodnetState,
    Protocol,
)
from bpfnet.podnet.pods import pod_netns
from bpfnet.podnet.probe import Probe, format_matrix, run_probes
from bpfnet.testing import reference

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
SERVED = [ContainerPort.serve(port, proto) for proto in (Protocol.TCP, Protocol.UDP)
          for port in (80, 81)]
TCP80 = (80, "TCP")
TCP81 = (81, "TCP")
UDP80 = (80, "UDP")
UDP81 = (81, "UDP")


def model_state(nodes: list[Node], namespace_names: tuple[str, ...] = NAMESPACES) -> PodnetState:
    """The 3x3 model, pods spread over the given nodes round robin, addresses allocated."""
    pods = []
    for i, (ns, name) in enumerate((ns, p) for ns in namespace_names for p in PODS):
        pods.append(Pod(namespace=ns, name=name, labels={"pod": name},
                        node=nodes[i % len(nodes)].name, ports=SERVED))
    namespaces = [Namespace(name=ns, labels={"ns": ns}) for ns in namespace_names]
    return PodnetState(nodes=nodes, namespaces=namespaces, pods=pods).with_addresses()


def policy(name: str, namespace: str, pod_selector: dict | None = None, *,
           ingress: list | None = None, egress: list | None = None,
           types: list[str] | None = None) -> NetworkPolicy:
    spec: dict = {"podSelector": pod_selector or {}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = types
    return NetworkPolicy.model_validate({"apiVersion": "networking.k8s.io/v1",
                                         "kind": "NetworkPolicy",
                                         "metadata": {"name": name, "namespace": namespace},
                                         "spec": spec})


def pods(**labels: str) -> dict:
    return {"podSelector": {"matchLabels": labels}}


def namespaces(**labels: str) -> dict:
    return {"namespaceSelector": {"matchLabels": labels}}


def pod_cidr_block(state: PodnetState, except_pods: tuple[str, ...] = ()) -> dict:
    """ipBlock over the nodes' pod CIDRs (their smallest common supernet), except the given pods' /32."""
    cidr = state.nodes[0].pod_cidr
    while not all(n.pod_cidr.subnet_of(cidr) for n in state.nodes):
        cidr = cidr.supernet()
    block: dict = {"cidr": str(cidr)}
    if except_pods:
        block["except"] = [f"{state.pod(k).address}/32" for k in except_pods]
    return {"ipBlock": block}


Transform = Callable[[PodnetState], PodnetState]


@dataclass
class Step:
    change: Transform
    probes: list[tuple[int, str]] = field(default_factory=lambda: [TCP80])


@dataclass
class Case:
    name: str
    steps: list[Step]


def set_policies(*make: Callable[[PodnetState], NetworkPolicy]) -> Transform:
    return lambda s: s.model_copy(update={"policies": [m(s) for m in make]})


def add_policy(make: Callable[[PodnetState], NetworkPolicy]) -> Transform:
    def change(s: PodnetState) -> PodnetState:
        new = make(s)
        kept = [p for p in s.policies if p.key != new.key]
        return s.model_copy(update={"policies": kept + [new]})
    return change


def delete_policy(key: str) -> Transform:
    return lambda s: s.model_copy(update={"policies": [p for p in s.policies if p.key != key]})


def set_pod_labels(key: str, labels: dict[str, str]) -> Transform:
    def change(s: PodnetState) -> PodnetState:
        pods_ = [p.model_copy(update={"labels": labels}) if p.key == key else p for p in s.pods]
        return s.model_copy(update={"pods": pods_})
    return change


def set_namespace_labels(name: str, labels: dict[str, str]) -> Transform:
    def change(s: PodnetState) -> PodnetState:
        nss = [n.model_copy(update={"labels": labels}) if n.name == name else n
               for n in s.namespaces]
        return s.model_copy(update={"namespaces": nss})
    return change


def _p(*args, **kwargs) -> Callable[[PodnetState], NetworkPolicy]:
    return lambda s: policy(*args, **kwargs)


def _case(name: str, *policies: Callable[[PodnetState], NetworkPolicy],
          probes: list[tuple[int, str]] | None = None, then: list[Step] | None = None) -> Case:
    return Case(name, [Step(set_policies(*policies), probes or [TCP80])] + (then or []))


BOTH = ["Ingress", "Egress"]
A = pods(pod="a")
SELECT_A = {"matchLabels": {"pod": "a"}}
SELECT_B = {"matchLabels": {"pod": "b"}}
B = pods(pod="b")
P80 = {"port": 80}
P81 = {"port": 81}

CASES: list[Case] = [
    _case("no policy: everything reachable", probes=[TCP80, UDP81]),
    _case("default deny ingress in x", _p("deny", "x", ingress=[], types=["Ingress"]),
          probes=[TCP80, UDP80]),
    _case("default deny egress in x", _p("deny", "x", egress=[], types=["Egress"]),
          probes=[TCP80, UDP80]),
    _case("default deny all in x", _p("deny", "x", types=BOTH), probes=[TCP81]),
    _case("allow all ingress with an empty rule", _p("allow", "x", ingress=[{}])),
    _case("deny all together with allow all: allows add up",
          _p("deny", "x", types=["Ingress"]), _p("allow", "x", ingress=[{}])),
    _case("ingress to x/a from x/b only", _p("p", "x", SELECT_A, ingress=[{"from": [B]}])),
    _case("ingress to x from the same namespace", _p("p", "x", ingress=[{"from": [{"podSelector": {}}]}])),
    _case("ingress to x/a from namespace y", _p("p", "x", SELECT_A, ingress=[{"from": [namespaces(ns="y")]}])),
    _case("ingress to x/a from all namespaces",
          _p("p", "x", SELECT_A, ingress=[{"from": [{"namespaceSelector": {}}]}])),
    _case("namespaceSelector matchExpressions NotIn",
          _p("p", "x", SELECT_A, ingress=[{"from": [{"namespaceSelector": {"matchExpressions": [
              {"key": "ns", "operator": "NotIn", "values": ["y"]}]}}]}])),
    _case("podSelector matchExpressions In",
          _p("p", "x", SELECT_A, ingress=[{"from": [{"podSelector": {"matchExpressions": [
              {"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}])),
    _case("policy podSelector Exists / DoesNotExist",
          _p("p", "x", {"matchExpressions": [{"key": "pod", "operator": "Exists"}]},
             ingress=[{"from": [{"podSelector": {"matchExpressions": [
                 {"key": "other", "operator": "DoesNotExist"}]}, "namespaceSelector": {
                     "matchLabels": {"ns": "z"}}}]}])),
    _case("peer with namespace AND pod selectors",
          _p("p", "x", SELECT_A, ingress=[{"from": [{**namespaces(ns="y"), **B}]}])),
    _case("peers with namespace OR pod selectors",
          _p("p", "x", SELECT_A, ingress=[{"from": [namespaces(ns="y"), B]}])),
    _case("ingress on port 81 only", _p("p", "x", SELECT_A, ingress=[{"ports": [P81]}]),
          probes=[TCP80, TCP81]),
    _case("ingress from y on port 80, from z on port 81",
          _p("p", "x", ingress=[{"from": [namespaces(ns="y")], "ports": [P80]},
                                {"from": [namespaces(ns="z")], "ports": [P81]}]),
          probes=[TCP80, TCP81]),
    _case("ingress on named port serve-81-tcp",
          _p("p", "x", ingress=[{"ports": [{"port": "serve-81-tcp"}]}]), probes=[TCP80, TCP81]),
    _case("named port serve-80-udp allows UDP only",
          _p("p", "x", SELECT_A, ingress=[{"ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}]),
          probes=[TCP80, UDP80, UDP81]),
    _case("named port with the wrong protocol allows nothing",
          _p("p", "x", SELECT_A, ingress=[{"ports": [{"port": "serve-80-tcp", "protocol": "UDP"}]}]),
          probes=[TCP80, UDP80]),
    _case("ports 80 and 81 from namespace y",
          _p("p", "x", ingress=[{"from": [namespaces(ns="y")], "ports": [P80, P81]}]),
          probes=[TCP80, TCP81]),
    _case("endPort range 80-81", _p("p", "x", ingress=[{"ports": [{"port": 80, "endPort": 81}]}]),
          probes=[TCP80, TCP81]),
    _case("endPort range 81-90 from pod b",
          _p("p", "x", ingress=[{"from": [{"namespaceSelector": {}, **B}],
                                 "ports": [{"port": 81, "endPort": 90}]}]),
          probes=[TCP80, TCP81]),
    _case("UDP port 80 only", _p("p", "x", ingress=[{"ports": [{"port": 80, "protocol": "UDP"}]}]),
          probes=[TCP80, UDP80, UDP81]),
    _case("all UDP ports, no TCP", _p("p", "y", ingress=[{"ports": [{"protocol": "UDP"}]}]),
          probes=[TCP81, UDP81]),
    _case("SCTP only blocks TCP and UDP",
          _p("p", "x", ingress=[{"ports": [{"port": 80, "protocol": "SCTP"}]}]),
          probes=[TCP80, UDP80]),
    _case("egress from x/a to x/b only", _p("p", "x", SELECT_A, egress=[{"to": [B]}]),
          probes=[TCP80, UDP80]),
    _case("egress from x to namespace y",
          _p("p", "x", egress=[{"to": [namespaces(ns="y")]}], types=["Egress"])),
    _case("egress on port 81 only", _p("p", "x", egress=[{"ports": [P81]}]),
          probes=[TCP80, TCP81]),
    _case("egress on named port serve-81-udp",
          _p("p", "x", egress=[{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]),
          probes=[UDP80, UDP81, TCP81]),
    _case("ingress and egress in one policy",
          _p("p", "y", SELECT_B, ingress=[{"from": [namespaces(ns="x")]}],
             egress=[{"to": [namespaces(ns="z")]}]), probes=[TCP80]),
    _case("policyTypes Ingress ignores egress rules",
          _p("p", "x", SELECT_A, egress=[{"to": [B]}], types=["Ingress"])),
    _case("egress rules without policyTypes imply Egress",
          _p("p", "x", SELECT_A, ingress=[{}], egress=[{"to": [namespaces(ns="z")]}])),
    Case("ingress ipBlock: the pod CIDR except x/b",
         [Step(set_policies(lambda s: policy("p", "x", SELECT_A, ingress=[
             {"from": [pod_cidr_block(s, ("x/b",))]}])), [TCP80])]),
    Case("egress ipBlock to the pod CIDR except z/a and z/b, on UDP",
         [Step(set_policies(lambda s: policy("p", "y", egress=[
             {"to": [pod_cidr_block(s, ("z/a", "z/b"))], "ports": [{"protocol": "UDP"}]}])),
               [UDP80, TCP80])]),
    _case("two policies select the same pod: union",
          _p("p1", "x", SELECT_A, ingress=[{"from": [B]}]),
          _p("p2", "x", SELECT_A, ingress=[{"from": [namespaces(ns="z")], "ports": [P81]}]),
          probes=[TCP80, TCP81]),
    _case("policy update: deny all, then allow from pod b",
          _p("p", "x", types=["Ingress"]),
          then=[Step(add_policy(_p("p", "x", ingress=[{"from": [{"namespaceSelector": {}, **B}]}])))]),
    _case("policy delete: deny all, then removed",
          _p("p", "x", types=BOTH),
          then=[Step(delete_policy("x/p"))]),
    _case("pod relabel: x/c becomes pod=b",
          _p("p", "x", SELECT_A, ingress=[{"from": [B]}]),
          then=[Step(set_pod_labels("x/c", {"pod": "b"})),
                Step(set_pod_labels("x/c", {"pod": "c"}))]),
    _case("namespace relabel: z becomes ns=y",
          _p("p", "x", SELECT_A, ingress=[{"from": [namespaces(ns="y")]}]),
          then=[Step(set_namespace_labels("z", {"ns": "y"})),
                Step(set_namespace_labels("z", {"ns": "z"}))]),
]


def check_matrix(state: PodnetState, port: int, protocol: str) -> int:
    """Probe every off-diagonal pair of pods with real sockets, from each pod's namespace on its
    node, against the reference evaluator; a mismatch is probed once more (3 s) before it counts.
    AssertionError with both matrices if any cell is wrong; else the number of allowed cells."""
    keys = [p.key for p in state.pods]
    cells = [(a, b) for a in keys for b in keys if a != b]
    expected = {(a, b): reference.allowed(state, state.pod(a), state.pod(b), port, protocol) for a, b in cells}

    def observe(which: list[tuple[str, str]], timeout: float) -> dict[tuple[str, str], bool]:
        probes = [Probe(pod_netns(state.node(state.pod(a).node), state.pod(a)), state.pod(b).ip, port, protocol)
                  for a, b in which]
        return dict(zip(which, run_probes(probes, timeout), strict=True))

    observed = observe(cells, 1.0)
    wrong = [c for c in cells if observed[c] != expected[c]]
    if wrong:
        observed.update(observe(wrong, 3.0))
        wrong = [c for c in cells if observed[c] != expected[c]]

    def table(values: dict) -> str:
        return format_matrix({a: {b: values.get((a, b)) for b in keys} for a in keys})
    if wrong:
        raise AssertionError(f"{port}/{protocol}: {len(wrong)} wrong of {len(cells)}\nexpected:\n"
                             f"{table(expected)}\nobserved:\n{table(observed)}")
    return sum(expected.values())
