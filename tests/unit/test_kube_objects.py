"""`bpfnet apply -f` and `bpfnet get`: Kubernetes objects in and out of the pod network, against an
in-process agent (the real API and store, controllers that record)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from bpfnet.cli import app
from bpfnet.podnet.config import PodnetState
from support.fake_agent import podnet_agent

runner = CliRunner()

SHOP = """
apiVersion: v1
kind: Node
metadata: {name: n1, annotations: {bpfnet.io/netns: shop-n1}}
spec: {podCIDR: 10.61.1.0/24}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec:
  nodeName: n1
  containers:
    - name: postgres
      image: postgres:16
      command: [postgres]
      resources: {limits: {cpu: "1"}}
      ports: [{name: sql, containerPort: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {containers: [{name: web, image: nginx, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: db}, ports: [{port: 5432, targetPort: sql}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}], sessionAffinity: ClientIP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.61.1.3], targetRef: {kind: Pod, name: web}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]
"""


@pytest.fixture
def agent(monkeypatch):
    return podnet_agent(monkeypatch)


def run(*args, stdin=None):
    return runner.invoke(app, list(args), input=stdin)


def test_apply_takes_the_objects_users_have(agent, tmp_path):
    path = tmp_path / "shop.yaml"
    path.write_text(SHOP)
    result = run("apply", "-f", str(path))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "node/n1 created", "namespace/shop created", "pod/db created", "pod/web created",
        "endpointslice.discovery.k8s.io/web-abc configured", "service/db created", "service/web created",
        "networkpolicy.networking.k8s.io/db-from-web created"]
    state = PodnetState.model_validate(agent.states["podnet"])
    assert state.node("n1").netns == "shop-n1"
    assert state.pod("shop/db").ports[0].name == "sql" and state.pod("shop/db").ports[0].port == 5432
    assert state.pod("shop/web").node == "n1"  # no nodeName: the first node
    db, web = state.services
    assert (db.selector, db.target_port) == ({"app": "db"}, "sql")
    assert [(b.pod, b.port) for b in web.backends] == [("web", 80)] and web.affinity == "client-ip"
    assert state.policies[0].key == "shop/db-from-web"
    again = run("apply", "-f", str(path))
    assert again.exit_code == 0 and all(line.endswith(" unchanged") for line in again.output.splitlines())


def test_get_gives_objects_that_apply_takes_back(agent, tmp_path):
    path = tmp_path / "shop.yaml"
    path.write_text(SHOP)
    assert run("apply", "-f", str(path)).exit_code == 0
    before = agent.states["podnet"]
    listed = {}
    for resource in ("nodes", "ns", "po", "svc", "netpol"):
        result = run("get", resource, "-o", "yaml")
        assert result.exit_code == 0, result.output
        listed[resource] = yaml.safe_load(result.output)
        assert listed[resource]["kind"] == "List"
    assert [p["status"]["podIP"] for p in listed["po"]["items"]] == ["10.61.1.2", "10.61.1.3"]
    assert [o["kind"] for o in listed["svc"]["items"]] == ["Service", "Service"]
    slices = yaml.safe_load(run("get", "endpointslices", "-o", "yaml").output)["items"]
    assert [(s["metadata"]["labels"]["kubernetes.io/service-name"], s["endpoints"][0]["targetRef"]["name"])
            for s in slices] == [("web", "web")]  # web's backends as an EndpointSlice
    listed["slices"] = {"apiVersion": "v1", "kind": "List", "items": slices}
    one = json.loads(run("get", "pod", "db", "-n", "shop", "-o", "json").output)
    assert one["metadata"]["name"] == "db" and one["metadata"]["labels"] == {"app": "db"}
    table = run("get", "pods", "-n", "shop")
    assert "db" in table.output and "app=web" in table.output
    # everything shown, applied to an empty agent, makes the same state
    dump = tmp_path / "all.yaml"
    dump.write_text(yaml.safe_dump_all([listed[r] for r in ("nodes", "ns", "po", "svc", "slices", "netpol")]))
    fresh = podnet_agent(pytest.MonkeyPatch())
    try:
        from bpfnet.app import cli as app_cli

        original = app_cli.AgentClient
        app_cli.AgentClient = lambda *a, **k: fresh
        assert run("apply", "-f", str(dump)).exit_code == 0
        assert fresh.states["podnet"] == before
    finally:
        app_cli.AgentClient = original


@pytest.mark.parametrize("document, message", [
    ("apiVersion: v1\nkind: Deployment\nmetadata: {name: x}\n",
     "document 2 (Deployment x): kind 'Deployment' of apiVersion 'v1' is not taken"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n"
     "spec: {containers: [{name: c, imag: nginx}]}\n",
     'document 2 (Pod p): unknown field "spec.containers[0].imag"'),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: shop}\n"
     "spec: {clusterIP: 10.96.0.12, ports: [{port: 70000}]}\n",
     "document 2 (Service s): spec.ports[0].port: Input should be less than or equal to 65535 (got 70000)"),
    ("apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: n}\n",
     "kind 'NetworkPolicy' of apiVersion 'networking.k8s.io/v1beta1' is not taken"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: nowhere}\nspec: {containers: [{name: c}]}\n",
     "pod nowhere/p: namespace 'nowhere' does not exist"),
])
def test_bad_objects_are_refused_naming_document_and_field_and_nothing_is_applied(agent, tmp_path, document,
                                                                                    message):
    good = tmp_path / "shop.yaml"
    good.write_text(SHOP)
    assert run("apply", "-f", str(good)).exit_code == 0
    before = agent.states["podnet"]
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n---\n" + document
                    if "Namespace" not in document else document)
    result = run("apply", "-f", str(path))
    assert result.exit_code == 1
    assert message in result.output, result.output
    assert agent.states["podnet"] == before  # the good Namespace of the same file is not applied either


def test_a_list_and_a_dry_run(agent):
    objects = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": {"podCIDR": "10.62.1.0/24"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}]}
    result = run("apply", "-f", "-", "--dry-run", stdin=json.dumps(objects))
    assert result.exit_code == 0 and result.output.splitlines() == ["node/n1 created (dry run)",
                                                                    "namespace/x created (dry run)"]
    assert agent.states["podnet"]["nodes"] == []
    assert run("apply", "-f", "-", stdin=json.dumps(objects)).exit_code == 0
    assert [n["name"] for n in agent.states["podnet"]["namespaces"]] == ["x"]
    missing = run("get", "pod", "nope")
    assert missing.exit_code == 1 and 'pods "nope" not found' in missing.output
    unknown = run("get", "deployments")
    assert unknown.exit_code == 1 and "doesn't have a resource type 'deployments'" in unknown.output


def test_the_lab_pod_network_is_one_kubernetes_file():
    from bpfnet.lab.runner import POD_NETWORK, pod_state

    state = pod_state()
    assert POD_NETWORK.suffix == ".yaml"
    assert [(p.key, p.node, str(p.address)) for p in state.pods] == [
        ("web/frontend", "n1", "10.201.1.2"), ("web/debug", "n1", "10.201.1.3"),
        ("shop/db", "n2", "10.201.2.2"), ("shop/cart", "n2", "10.201.2.3")]
    assert [(n.name, n.netns) for n in state.nodes] == [("n1", "lab-n1"), ("n2", "lab-n2")]
    assert [p.key for p in state.policies] == ["shop/default-deny", "shop/db-from-web"]
    assert [(s.key, str(s.address), s.selector) for s in state.services] == [
        ("shop/db", "10.96.0.10", {"app": "db"}), ("web/frontend", "10.96.0.20", {"app": "web"})]
