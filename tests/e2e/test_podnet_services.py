"""Services end to end: connect()/sendmsg() from pods to a service address reach backend pods
through the socket hooks, replies come from the service address, backends follow the selector,
an empty service refuses at once, NetworkPolicy applies to the real backend."""

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bpfnet.cli import app
from bpfnet.netns import list_netns

pytestmark = pytest.mark.root

TAG = uuid.uuid4().hex[:6]
NODE_NS = f"svc-{TAG}"
runner = CliRunner()

CLIENT = str(Path(__file__).with_name("socket_client.py"))



@pytest.fixture(scope="module")
def agent(background_agent):
    with background_agent("podnet", f"svc-{TAG}") as sock:
        ok(sock, "node", "add", "n1", "--pod-cidr", "10.79.1.0/24", "--netns", NODE_NS)
        for ns in ("shop", "web"):
            ok(sock, "namespace", "add", ns, "--labels", f"team={ns}")
        for pod, labels in (("shop/db-1", "app=db"), ("shop/db-2", "app=db"), ("web/client", "app=web"),
                            ("web/other", "app=other")):
            ok(sock, "pod", "add", pod, "--labels", labels, "--node", "n1", "--serve", "80/tcp,80/udp")
        yield sock
    assert not [ns for ns in list_netns() if ns.startswith(NODE_NS)]


def ok(sock, *args):
    result = runner.invoke(app, [*args, "--socket", str(sock)])
    assert result.exit_code == 0, result.output
    return result.output


def from_pod(pod, vip, port, count, protocol="tcp"):
    namespace, name = pod.split("/")
    out = subprocess.run(["ip", "netns", "exec", f"{NODE_NS}.{namespace}.{name}", sys.executable, CLIENT,
                          vip, str(port), str(count), protocol], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_selector_service_spreads_over_backends_and_answers_from_its_address(agent):
    ok(agent, "service", "add", "shop/db", "--vip", "10.96.0.10:80/tcp", "--selector", "app=db",
       "--target-port", "80")
    ok(agent, "service", "add", "shop/db-udp", "--vip", "10.96.0.10:80/udp", "--selector", "app=db",
       "--target-port", "80")
    tcp = from_pod("web/client", "10.96.0.10", 80, 40)
    udp = from_pod("web/client", "10.96.0.10", 80, 40, "udp")
    assert {answer for answer, _ in tcp} == {"shop/db-1", "shop/db-2"}
    assert {peer for _, peer in tcp} == {"10.96.0.10"}
    assert {answer for answer, _ in udp} == {"shop/db-1", "shop/db-2"}
    assert {peer for _, peer in udp} == {"10.96.0.10"}  # replies appear to come from the service
    rows = {r["name"]: r for r in json.loads(ok(agent, "service", "list", "-o", "json"))}
    assert rows["db"]["connects"] == 40 and rows["db-udp"]["datagrams"] == 40
    assert sorted(rows["db"]["backends"]) == ["10.79.1.2:80", "10.79.1.3:80"]


def test_backends_follow_pods_and_an_empty_service_refuses_at_once(agent):
    ok(agent, "service", "add", "shop/api", "--vip", "10.96.0.11:80/tcp", "--selector", "app=api",
       "--target-port", "80")
    assert from_pod("web/client", "10.96.0.11", 80, 3) == ["refused"] * 3
    ok(agent, "pod", "add", "shop/api-1", "--labels", "app=api", "--node", "n1", "--serve", "80/tcp")
    assert {a for a, _ in from_pod("web/client", "10.96.0.11", 80, 5)} == {"shop/api-1"}
    ok(agent, "pod", "del", "shop/api-1")
    assert from_pod("web/client", "10.96.0.11", 80, 2) == ["refused"] * 2
    ok(agent, "service", "del", "shop/api")
    assert from_pod("web/client", "10.96.0.11", 80, 1) != ["refused"]  # no longer a service


def test_policy_applies_to_the_real_backend(agent, tmp_path):
    ok(agent, "service", "add", "shop/pinned", "--vip", "10.96.0.12:80/tcp", "--backend", "shop/db-1:80")
    policy = tmp_path / "p.yaml"
    policy.write_text(textwrap.dedent("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: db-from-web-client, namespace: shop}
        spec:
          podSelector: {matchLabels: {app: db}}
          ingress:
          - from: [{namespaceSelector: {matchLabels: {team: web}}, podSelector: {matchLabels: {app: web}}}]
    """))
    ok(agent, "policy", "apply", "-f", str(policy))
    try:
        assert from_pod("web/client", "10.96.0.12", 80, 2) == [["shop/db-1", "10.96.0.12"]] * 2
        assert from_pod("web/other", "10.96.0.12", 80, 1) == ["timeout"]  # dropped at db-1's ingress
    finally:
        ok(agent, "policy", "delete", "shop/db-from-web-client")


def test_bad_service_input_is_refused_with_a_clear_message(agent):
    for args, message in [
        (["shop/x", "--vip", "10.96.0.13", "--selector", "app=db", "--target-port", "80"], "ADDRESS:PORT/PROTO"),
        (["shop/x", "--vip", "10.96.0.13:80/tcp"], "give --backend"),
        (["shop/x", "--vip", "10.96.0.13:80/tcp", "--backend", "shop/nope:80"], "backend pod shop/nope does not exist"),
        (["shop/x", "--vip", "10.96.0.10:80/tcp", "--backend", "shop/db-1:80"], "defined twice"),
    ]:
        result = runner.invoke(app, ["service", "add", *args, "--socket", str(agent)])
        assert result.exit_code == 1 and message in result.output, result.output
