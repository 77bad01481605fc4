"""The podnet CLI end to end: a real agent with the podnet app, pods in namespaces, probes.

Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_podnet_cli.py
"""

import json
import uuid

import pytest
from typer.testing import CliRunner

from bpfnet.netns import list_netns
from bpfnet.podnet import cli

pytestmark = pytest.mark.root

TAG = uuid.uuid4().hex[:6]
runner = CliRunner()


@pytest.fixture(scope="module")
def agent(background_agent):
    with background_agent("podnet", f"pn-cli-{TAG}") as sock:
        yield sock
    assert not [ns for ns in list_netns() if ns.startswith(f"pn-cli-{TAG}")]


def ok(sock, *args):
    result = runner.invoke(cli.app, [*args, "--socket", str(sock)])
    assert result.exit_code == 0, result.output
    return result.output


DENY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: serve-80-tcp}]
"""


def test_pods_policies_and_probes_through_the_agent(agent, tmp_path):
    ok(agent, "node", "add", "n1", "--pod-cidr", "10.78.1.0/24", "--netns", f"pn-cli-{TAG}")
    for ns in ("x", "y", "z"):
        ok(agent, "namespace", "add", ns, "--labels", f"ns={ns}")
    for pod in ("x/a", "y/b", "z/c"):
        ok(agent, "pod", "add", pod, "--labels", f"pod={pod[-1]}", "--serve", "80/tcp,81/tcp,80/udp")
    rows = json.loads(ok(agent, "pod", "list", "-o", "json"))
    assert [(r["namespace"], r["name"], r["address"]) for r in rows] == [
        ("x", "a", "10.78.1.2"), ("y", "b", "10.78.1.3"), ("z", "c", "10.78.1.4")]
    everything = json.loads(ok(agent, "probe", "-o", "json"))
    assert all(all(row.values()) for row in everything.values()), everything

    policy = tmp_path / "p.yaml"
    policy.write_text(DENY)
    assert ok(agent, "policy", "apply", "-f", str(policy)).strip() == "networkpolicy x/only-from-y created"
    tcp80 = json.loads(ok(agent, "probe", "--port", "80", "-o", "json"))
    assert tcp80["y/b"]["x/a"] and not tcp80["z/c"]["x/a"] and tcp80["x/a"]["z/c"]
    assert not json.loads(ok(agent, "probe", "y/b", "x/a", "--port", "81", "-o", "json"))["y/b"]["x/a"]
    assert "blocked" in ok(agent, "probe", "z/c", "x/a", "--protocol", "udp")
    table = ok(agent, "probe")
    assert table.splitlines()[0].split() == ["-", "x/a", "y/b", "z/c"]
    assert table.splitlines()[3].split() == ["z/c", "X", ".", "."]

    shown = json.loads(ok(agent, "endpoint", "show", "x/a", "-o", "json"))
    assert shown["ingress_isolated"] and shown["selected_by"]["Ingress"] == ["x/only-from-y"]
    assert [(e["ports"], e["remote"]) for e in shown["entries"]] == [("TCP/80", "y: pod=b")]
    assert shown["entries"][0]["hits"] >= 1
    assert "isolated by x/only-from-y" in ok(agent, "endpoint", "show", "x/a")

    stats = json.loads(ok(agent, "stats", "-o", "json"))
    assert stats["pods"] == 3 and stats["packets"]["drop_policy_denied_ingress"] >= 2

    ok(agent, "namespace", "label", "z", "ns=y")  # z/c now matches the namespaceSelector
    assert json.loads(ok(agent, "probe", "z/c", "x/a", "-o", "json"))["z/c"]["x/a"]
    ok(agent, "policy", "delete", "x/only-from-y")
    ok(agent, "pod", "del", "z/c")
    assert not [ns for ns in list_netns() if ns.endswith(".z.c") and ns.startswith(f"pn-cli-{TAG}")]
    assert json.loads(ok(agent, "probe", "-o", "json")) == {
        "x/a": {"x/a": True, "y/b": True}, "y/b": {"x/a": True, "y/b": True}}
