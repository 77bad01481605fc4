"""`bpfnet observe` end to end: a real agent with the podnet app collects the data plane's flow
events; a connection a policy denies shows up as DROPPED (POLICY_DENIED) with the right pods, an
allowed one as FORWARDED, filters combine as documented, and the stats count flows by verdict.

Run under the shared lock:
flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_podnet_flows_observe.py
"""

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bpfnet.cli import app as bpfnet_app
from bpfnet.netns import list_netns

pytestmark = pytest.mark.root

TAG = "vx-fl-" + uuid.uuid4().hex[:5]
runner = CliRunner()

DENY_Y = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"""


@pytest.fixture(scope="module")
def agent(background_agent):
    with background_agent("podnet", TAG) as sock:
        yield sock
    assert not [ns for ns in list_netns() if ns.startswith(TAG)]


def bpfnet(sock, *args):
    result = runner.invoke(bpfnet_app, [*args, "--socket", str(sock)])
    assert result.exit_code == 0, result.output
    return result.output


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_denied_and_allowed_connections_in_observe(agent, tmp_path):
    bpfnet(agent, "node", "add", "n1", "--pod-cidr", "10.81.1.0/24", "--netns", f"{TAG}-n1")
    for ns in ("x", "y"):
        bpfnet(agent, "namespace", "add", ns, "--labels", f"ns={ns}")
        bpfnet(agent, "pod", "add", f"{ns}/a", "--labels", "pod=a", "--serve", "80/tcp")
    policy = tmp_path / "deny.yaml"
    policy.write_text(DENY_Y)
    bpfnet(agent, "policy", "apply", "-f", str(policy))
    assert "blocked" in bpfnet(agent, "probe", "x/a", "y/a", "--port", "80")
    assert "reachable" in bpfnet(agent, "probe", "y/a", "x/a", "--port", "80")

    dropped = json_lines(bpfnet(agent, "observe", "--verdict", "dropped", "--last", "5", "-o", "json"))
    assert 1 <= len(dropped) <= 5
    for flow in dropped:
        assert (flow["source"]["namespace"], flow["source"]["pod"]) == ("x", "a")
        assert (flow["destination"]["namespace"], flow["destination"]["pod"]) == ("y", "a")
        assert (flow["verdict"], flow["drop_reason"], flow["direction"]) == ("DROPPED", "POLICY_DENIED", "ingress")
        assert (flow["protocol"], flow["destination"]["port"], flow["tcp_flags"]) == ("TCP", 80, ["SYN"])
        assert flow["node"] == "n1" and "ns=x" in flow["source"]["labels"]

    allowed = json_lines(bpfnet(agent, "observe", "--verdict", "forwarded", "--from-pod", "y/a",
                                "--to-pod", "x/a", "-o", "json"))
    assert allowed and allowed[0]["tcp_flags"] == ["SYN"] and not allowed[0]["is_reply"]
    assert {f["verdict"] for f in allowed} == {"FORWARDED"}
    replies = json_lines(bpfnet(agent, "observe", "--from-pod", "x/a", "--to-pod", "y/a",
                                "--not", "--verdict", "dropped", "-o", "json"))
    assert replies and all(f["is_reply"] and f["verdict"] == "FORWARDED" for f in replies)

    compact = bpfnet(agent, "observe", "--drop-reason", "policy_denied", "--last", "1")
    assert "x/a:" in compact and "-> y/a:80" in compact and "DROPPED (POLICY_DENIED)" in compact
    table = bpfnet(agent, "observe", "--last", "3", "-o", "table").splitlines()
    assert table[0].strip() == "flows" and "FORWA" in "".join(table)  # narrow terminal: cut

    stats = json.loads(bpfnet(agent, "podnet", "stats", "-o", "json"))
    assert stats["flows"]["by_verdict"]["DROPPED"] >= len(dropped)
    assert stats["flows"]["drops_by_reason"]["POLICY_DENIED"] >= len(dropped)
    assert stats["flow_events"]["lost"] == 0


def test_bad_filter_is_one_line_error(agent):
    result = runner.invoke(bpfnet_app, ["observe", "--to-pod", "x/a", "--port", "http",
                                        "--socket", str(agent)])
    assert result.exit_code == 1
    assert result.output.strip() == "error: --port 'http': invalid literal for int() with base 10: 'http'"


def test_follow_prints_new_flows_as_json_lines(agent):
    """`observe --follow` keeps polling: probes made while it runs show up on its stdout."""
    command = [str(Path(sys.executable).with_name("bpfnet")), "observe", "--follow", "-o", "json",
               "--from-pod", "y/a", "--to-pod", "x/a", "--tcp-flags", "SYN", "--socket", str(agent)]
    follower = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while not lines and time.monotonic() < deadline:
            assert "reachable" in bpfnet(agent, "probe", "y/a", "x/a", "--port", "80")
            time.sleep(0.5)
    finally:
        follower.terminate()
        follower.wait(10)
    assert lines, follower.stderr.read()
    flow = json.loads(lines[0])
    assert (flow["source"]["pod"], flow["destination"]["pod"], flow["verdict"]) == ("a", "a", "FORWARDED")
    assert flow["source"]["namespace"] == "y" and "SYN" in flow["tcp_flags"]


def test_no_event_lost_at_a_moderate_rate(agent):
    """100 connections at once: each shows up with its own SYN record; nothing lost."""
    from bpfnet.app.client import AgentClient
    from bpfnet.podnet.config import Node, Pod
    from bpfnet.podnet.pods import pod_netns
    from bpfnet.podnet.probe import Probe, run_probes

    pods = json.loads(bpfnet(agent, "pod", "list", "-o", "json"))
    target = next(p["address"] for p in pods if (p["namespace"], p["name"]) == ("x", "a"))
    node = json.loads(bpfnet(agent, "node", "list", "-o", "json"))[0]
    source = pod_netns(Node(name="n1", pod_cidr=node["pod_cidr"], netns=node["netns"]),
                       Pod(namespace="y", name="a", node="n1"))
    with AgentClient(agent) as client:
        before = client.query("podnet", "flows", last=1)["seen"]
        assert all(run_probes([Probe(source, target, 80, "TCP")] * 100, 5.0))
        answer = client.query("podnet", "flows", since_seen=before, filters=json.dumps(
            ["--from-pod", "y/a", "--to-pod", "x/a", "--tcp-flags", "SYN"]))
    assert len({f["source"]["port"] for f in answer["flows"]}) == 100
    assert answer["lost_events"] == 0
