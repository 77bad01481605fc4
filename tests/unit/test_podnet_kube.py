"""`bpfnet apply -f` / `bpfnet get`: Kubernetes objects in and out of the podnet state."""

import pytest
import yaml

from bpfnet.podnet.config import PodnetState
from bpfnet.podnet.kube import KubeError, apply_objects, get_objects, load_objects

CLUSTER = """
apiVersion: v1
kind: Node
metadata: {name: node1, annotations: {bpfnet.io/netns: lab-node1}}
spec: {podCIDR: 10.244.1.0/24}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: x, labels: {ns: x}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: y, labels: {ns: y}, uid: 1234, resourceVersion: "7"}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  nodeName: node1
  containers:
  - name: web
    image: registry.k8s.io/e2e-test-images/agnhost:2.43
    command: [/agnhost, serve-hostname]
    ports: [{name: serve-80-tcp, containerPort: 80}, {containerPort: 81, protocol: UDP}]
status: {phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {pod: b}}
spec: {containers: [{name: c, image: busybox}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  selector: {pod: a}
  ports: [{port: 80, targetPort: serve-80-tcp}]
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: y}
spec: {clusterIP: 10.96.5.5, ports: [{port: 8080, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: manual-1, namespace: y, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.3], targetRef: {kind: Pod, name: b}}]
ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
"""


def applied(text=CLUSTER, state=None):
    return apply_objects(state or PodnetState(), load_objects(text, "cluster.yaml"))


def test_a_cluster_from_one_file():
    state, lines = applied()
    assert lines == ["node/node1 created", "namespace/x created", "namespace/y created", "pod/a created",
                     "pod/b created", "endpointslice.discovery.k8s.io/manual-1 configured", "service/web created",
                     "service/manual created", "networkpolicy.networking.k8s.io/only-y created"]
    assert state.node("node1").netns == "lab-node1" and str(state.node("node1").pod_cidr) == "10.244.1.0/24"
    a = state.pod("x/a")
    assert (a.node, str(a.address), a.labels) == ("node1", "10.244.1.2", {"pod": "a"})
    assert [(p.name, p.port, p.protocol.value) for p in a.ports] == [("serve-80-tcp", 80, "TCP"), (None, 81, "UDP")]
    assert state.pod("y/b").node == "node1"   # no nodeName: the first node
    web, manual = state.services
    assert (str(web.address), web.selector, web.target_port) == ("10.96.0.1", {"pod": "a"}, "serve-80-tcp")
    assert (str(manual.address), [(b.pod, b.port) for b in manual.backends]) == ("10.96.5.5", [("b", 8080)])
    assert state.policies[0].key == "x/only-y"


def test_apply_again_is_unchanged_and_a_change_is_configured():
    state, _ = applied()
    again, lines = applied(state=state)
    assert again == state and all(line.endswith(("unchanged", "configured")) for line in lines)
    assert "service/web unchanged" in lines and "pod/a unchanged" in lines
    relabelled, lines = applied(CLUSTER.replace("labels: {pod: b}", "labels: {pod: b, tier: db}"), state)
    assert "pod/b configured" in lines and relabelled.pod("y/b").address == state.pod("y/b").address


def test_get_gives_manifests_that_apply_back_unchanged():
    state, _ = applied()
    for kind in ("nodes", "namespaces", "pods", "services", "endpointslices", "networkpolicies"):
        listed = get_objects(state, kind)
        assert listed["kind"] == "List" and listed["items"]
        again, lines = apply_objects(state, load_objects(yaml.safe_dump(listed), kind))
        assert all(line.endswith("unchanged") for line in lines), (kind, lines)
    assert get_objects(state, "endpointslices")["items"][0]["endpoints"] == [
        {"addresses": ["10.244.1.3"], "targetRef": {"kind": "Pod", "name": "b"}}]
    pod = get_objects(state, "pods")["items"][0]
    assert pod["status"]["podIP"] == "10.244.1.2" and pod["spec"]["containers"][0]["ports"][0] == {
        "name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"}


@pytest.mark.parametrize("text, message", [
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}", "document 1 (Deployment d): kind 'Deployment' "
                                                                   "of apiVersion 'apps/v1' is not taken"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, foo: 1}]}",
     'document 1 (Pod p): unknown field "spec.containers[0].foo"'),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{name: x}]}]}",
     "spec.containers[0].ports[0].containerPort: Required value"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p, colour: red}\nspec: {}", 'unknown field "metadata.colour"'),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspex: {}", 'unknown field "spex"'),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 1}, {port: 2}]}",
     "spec.ports: a bpfnet service has exactly one port (got 2)"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {type: NodePort, ports: [{port: 1}]}", "spec.type"),
    ("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\nendpoints: []\nports: []",
     "an EndpointSlice needs the label kubernetes.io/service-name"),
    ("apiVersion: v1\nkind: Namespace\nmetadata: {name: Bad_Name}", "is not a DNS label"),
    ("- 1\n- 2", "expected an object (mapping), got list"),
])
def test_bad_documents_are_refused_with_field_paths(text, message):
    with pytest.raises(KubeError) as caught:
        load_objects(text, "f.yaml")
    assert message in str(caught.value) and str(caught.value).startswith("f.yaml: document 1")


def test_nothing_is_applied_when_one_object_does_not_fit():
    state, _ = applied()
    with pytest.raises(KubeError, match="namespace 'z' does not exist"):
        applied("apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: z}\nspec: {}", state)
    with pytest.raises(KubeError, match="service y/nothing does not exist"):
        applied("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: y, labels: "
                "{kubernetes.io/service-name: nothing}}\nendpoints: []\nports: [{port: 1}]", state)
