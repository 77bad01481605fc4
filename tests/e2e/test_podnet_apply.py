"""`bpfnet apply -f` with a real agent: the lab's pod network from its Kubernetes YAML (on one node
here, so no fabric is shared with other runs), probed with real connections; `get -o yaml` applies
back unchanged; a bad file changes nothing.

Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_podnet_apply.py
"""

import json
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bpfnet.app.client import AgentClient
from bpfnet.lab.runner import POD_NETWORK
from bpfnet.podnet import cli

pytestmark = pytest.mark.root

TAG = uuid.uuid4().hex[:6]
LAB = POD_NETWORK  # the lab applies this file itself
runner = CliRunner()


@pytest.fixture(scope="module")
def agent(background_agent):
    with background_agent("podnet", f"pn-apply-{TAG}") as sock:
        yield sock


def invoke(sock, *args):
    return runner.invoke(cli.app, [*args, "--socket", str(sock)])


def one_node_lab(tmp_path) -> Path:
    documents = []
    for doc in yaml.safe_load_all(LAB.read_text()):
        for item in doc["items"] if doc["kind"] == "List" else [doc]:
            if item["kind"] == "Node" and item["metadata"]["name"] == "n2":
                continue
            if item["kind"] == "Node":
                item["metadata"]["annotations"]["bpfnet.io/netns"] = f"pn-apply-{TAG}"
            if item["kind"] == "Pod":
                item["spec"]["nodeName"] = "n1"
            documents.append(item)
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    return path


def test_the_lab_pod_network_applied_from_kubernetes_yaml(agent, tmp_path):
    applied = invoke(agent, "apply", "-f", str(one_node_lab(tmp_path)))
    assert applied.exit_code == 0, applied.output
    assert applied.output.splitlines()[:3] == ["node/n1 created", "namespace/web created", "namespace/shop created"]
    assert "networkpolicy.networking.k8s.io/db-from-web created" in applied.output

    probed = invoke(agent, "probe", "--port", "80", "-o", "json")
    assert probed.exit_code == 0, probed.output
    matrix = json.loads(probed.output)
    expected = {(src, dst): dst.startswith("web/") or (src, dst) == ("web/frontend", "shop/db")
                for src in matrix for dst in matrix[src] if src != dst}
    assert {(s, d): matrix[s][d] for s, d in expected} == expected

    listed = invoke(agent, "get", "pods", "-o", "yaml")
    assert listed.exit_code == 0, listed.output
    pods = yaml.safe_load(listed.output)["items"]
    assert {p["metadata"]["name"]: p["status"]["podIP"].startswith("10.201.1.") for p in pods} == {
        "frontend": True, "debug": True, "db": True, "cart": True}
    back = tmp_path / "pods.yaml"
    back.write_text(listed.output)
    again = invoke(agent, "apply", "-f", str(back))
    assert again.exit_code == 0 and again.output.splitlines() == [
        f"pod/{name} unchanged" for name in ("frontend", "debug", "db", "cart")]


def test_a_bad_file_changes_nothing(agent, tmp_path):
    with AgentClient(agent) as client:
        before = client.get_state_and_revision("podnet")
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n---\n"
                   "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: extra}\n"
                   "spec: {containers: [{name: c, ports: [{containerPort: 80, hostPort: 8080}]}]}\n")
    refused = invoke(agent, "apply", "-f", str(bad))
    assert refused.exit_code == 1
    assert refused.output.strip() == (f'error: {bad}: document 2 (Pod p): unknown field '
                                      '"spec.containers[0].ports[0].hostPort"')
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n")
    assert "kind 'Deployment' of apiVersion 'apps/v1' is not taken" in invoke(agent, "apply", "-f", str(unknown)).output
    with AgentClient(agent) as client:
        assert client.get_state_and_revision("podnet") == before
