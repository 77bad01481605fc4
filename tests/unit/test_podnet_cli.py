"""The podnet CLI against an in-memory agent: state edits, validation, listings, errors."""

import json

import pytest
from typer.testing import CliRunner

from bpfnet.app.client import AgentRequestError
from bpfnet.podnet import cli
from bpfnet.podnet.config import PodnetState
from support.fake_agent import podnet_agent

runner = CliRunner()


def _no_running_agent(**params):
    raise AgentRequestError("query needs a running agent", 503)


@pytest.fixture(autouse=True)
def agent(monkeypatch):
    return podnet_agent(monkeypatch, queries={"endpoint": _no_running_agent})


def run(*args):
    return runner.invoke(cli.app, list(args))


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args):
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return result.output.strip()


def test_namespaces_pods_and_default_node(agent):
    ok("namespace", "add", "x", "--labels", "team=a")
    assert "pod x/a added on node1 with address 10.244.1.2" in ok(
        "pod", "add", "x/a", "--labels", "pod=a", "--serve", "80/tcp,81/udp")
    ok("pod", "add", "x/b", "-l", "pod=b")
    rows = json.loads(ok("pod", "list", "-o", "json"))
    assert [(r["name"], r["address"], r["node"], r["labels"]) for r in rows] == [
        ("a", "10.244.1.2", "node1", {"pod": "a"}), ("b", "10.244.1.3", "node1", {"pod": "b"})]
    assert all(r["identity"] >= 256 for r in rows) and rows[0]["identity"] != rows[1]["identity"]
    state = PodnetState.model_validate(agent.states["podnet"])
    assert [p.name for p in state.pod("x/a").ports] == ["serve-80-tcp", "serve-81-udp"]
    assert state.nodes[0].netns == "bpfnet-node1"
    namespaces = json.loads(ok("namespace", "list", "-o", "json"))
    assert namespaces[0]["labels"] == {"team": "a", "kubernetes.io/metadata.name": "x"}


def test_labels_replace_and_identity_follows():
    ok("namespace", "add", "x")
    ok("pod", "add", "x/a", "-l", "pod=a")
    ok("pod", "add", "x/b", "-l", "pod=b")
    ok("pod", "label", "x/b", "pod=a")
    rows = json.loads(ok("pod", "list", "-o", "json"))
    assert rows[0]["identity"] == rows[1]["identity"]
    ok("namespace", "label", "x", "env=prod")
    assert json.loads(ok("namespace", "list", "-o", "json"))[0]["labels"]["env"] == "prod"


def test_nodes():
    ok("node", "add", "n2", "--pod-cidr", "10.9.0.0/24", "--netns", "pn-n2")
    ok("namespace", "add", "x")
    assert "on n2 with address 10.9.0.2" in ok("pod", "add", "x/a", "--node", "n2")
    assert fails("pod", "add", "x/b", "--node", "n9") == "error: pod x/b: node 'n9' does not exist"
    assert fails("node", "del", "n2") == "error: node n2 still has pods: x/a"
    assert "overlaps" in fails("node", "add", "n3", "--pod-cidr", "10.9.0.128/25")
    ok("pod", "del", "x/a")
    ok("node", "del", "n2")
    assert json.loads(ok("node", "list", "-o", "json")) == []


POLICY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}, policyTypes: [Egress]}
"""


def test_policy_apply_list_delete(tmp_path):
    ok("namespace", "add", "x")
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    assert ok("policy", "apply", "-f", str(path)).splitlines() == [
        "networkpolicy x/web created", "networkpolicy x/deny created"]
    assert "networkpolicy x/web unchanged" in ok("policy", "apply", "-f", str(path))
    path.write_text(POLICY.replace("port: 80", "port: 81"))
    assert "networkpolicy x/web configured" in ok("policy", "apply", "-f", str(path))
    listed = json.loads(ok("policy", "list", "-o", "json"))
    assert [p["metadata"]["name"] for p in listed] == ["web", "deny"]
    assert listed[0]["spec"]["ingress"][0]["ports"] == [{"port": 81, "protocol": "TCP"}]
    ok("policy", "delete", "x/deny")
    assert fails("policy", "delete", "x/deny") == "error: policy 'x/deny' does not exist"


def test_errors_are_one_line_and_leave_state_unchanged(agent, tmp_path):
    ok("namespace", "add", "x")
    before = json.dumps(agent.states["podnet"], sort_keys=True)
    path = tmp_path / "bad.yaml"
    path.write_text(POLICY.replace("port: 80", "port: 80, endPort: 10"))
    assert fails("policy", "apply", "-f", str(path)).startswith(
        f"error: {path}: document 1 (web): spec.ingress.0.ports.0: endPort 10 must be within")
    path.write_text(POLICY.replace("namespace: x}", "namespace: q}", 1))
    assert fails("policy", "apply", "-f", str(path)) == "error: policy q/web: namespace 'q' does not exist"
    assert "No such file" in fails("policy", "apply", "-f", str(tmp_path / "missing.yaml"))
    assert fails("namespace", "add", "x") == "error: namespace 'x' already exists"
    assert "is not a DNS label" in fails("namespace", "add", "Bad_Name")
    assert fails("pod", "add", "x") == "error: pod 'x': use NAMESPACE/NAME"
    assert fails("pod", "add", "q/a") == "error: pod q/a: namespace 'q' does not exist"
    assert fails("pod", "add", "x/a", "-l", "novalue") == "error: label 'novalue' is not of the form key=value"
    assert "--serve item '80/sctp'" in fails("pod", "add", "x/a", "--serve", "80/sctp")
    assert fails("pod", "label", "x/zz", "a=b") == "error: pod 'x/zz' does not exist"
    assert json.dumps(agent.states["podnet"], sort_keys=True) == before


def test_namespace_delete_takes_its_pods_and_policies(agent, tmp_path):
    ok("namespace", "add", "x")
    ok("namespace", "add", "y")
    ok("pod", "add", "x/a")
    ok("pod", "add", "y/a")
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    ok("policy", "apply", "-f", str(path))
    ok("namespace", "del", "x")
    state = PodnetState.model_validate(agent.states["podnet"])
    assert [p.key for p in state.pods] == ["y/a"] and state.policies == []


def test_agent_errors_are_reported():
    assert fails("endpoint", "show", "x/a") == "error: query needs a running agent"
