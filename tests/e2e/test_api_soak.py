"""API soak: thousands of malformed requests and config files against a real agent running every
available app; each gets a 4xx (never a 5xx, never a hang) whose message names the problem, and
no app's state or data plane moves.

One agent process (`bpfnet agent --background`, pins under /sys/fs/bpf/bpfnet/sk-<tag>, podnet node
in network namespace sk-<tag>) is started for the module with a known state per app; the tests
then send hand-written tricky cases and hypothesis-generated ones (derandomized, bounded), and the
last test proves that state, stats, queries and every pinned map are exactly as they were and
that a valid change still goes through. Apps whose controller does not import are left out.

Run under the shared lock: flock /tmp/bpfnet-kernel.lock .venv/bin/python -m pytest tests/e2e/test_api_soak.py
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bpfnet.app.client import AgentClient
from bpfnet.app.controller import BUILTIN_APPS
from bpfnet.ebpf import Map, MapType, pins
from support.apps import importable_apps

pytestmark = pytest.mark.root

TAG = "sk-" + secrets.token_hex(3)
PIN_ROOT = pins.PIN_ROOT / TAG
BPFNET = Path(sys.executable).with_name("bpfnet")
REQUEST_TIMEOUT = 20.0  # a request that takes this long counts as a hang
SOAK = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


APPS = importable_apps()


def _all_baselines() -> dict[str, dict]:
    return {
        "lb": {
            "settings": {"ring_size": 257, "max_vips": 4, "max_reals": 16, "conn_table_size": 1024},
            "vips": [
                {"address": "10.93.0.1", "port": 80, "protocol": "tcp",
                 "reals": [{"address": "10.93.1.1", "weight": 1}, {"address": "10.93.1.2", "weight": 2}]},
                {"address": "fc00:93::1", "port": 53, "protocol": "udp", "flags": ["hash_no_src_port"],
                 "reals": [{"address": "fc00:93:1::1"}]},
            ],
        },
        "ddos": {
            "rules": [
                {"expr": "udp and src port 53", "action": "drop", "comment": "reflection"},
                {"expr": "tcp[tcpflags] & tcp-syn != 0", "action": "limit", "rate": 1000, "per_source": True},
                {"expr": "icmp", "action": "pass"},
            ],
            "sample_every": 50,
        },
        "podnet": {
            "nodes": [{"name": "n1", "pod_cidr": "10.93.64.0/24", "netns": TAG}],
            "namespaces": [{"name": "prod", "labels": {"team": "a"}}, {"name": "dev"}],
            "pods": [{"namespace": "prod", "name": "web", "labels": {"app": "web"}, "node": "n1"},
                     {"namespace": "dev", "name": "client", "labels": {"app": "client"}, "node": "n1"}],
            "policies": [{
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "allow-client", "namespace": "prod"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}},
                                               {"podSelector": {"matchExpressions": [
                                                   {"key": "app", "operator": "In", "values": ["client"]}]},
                                                "namespaceSelector": {}}],
                                      "ports": [{"protocol": "TCP", "port": 80}]}]},
            }],
        },
    }


def baseline_states() -> dict[str, dict]:
    """The known state of each app during the soak: real entries in every map that holds config,
    nothing that changes by itself (no health checks, no expiring rules, no traffic)."""
    return {app: state for app, state in _all_baselines().items() if app in APPS}


def state_model(app: str):
    importlib.import_module(BUILTIN_APPS[app])
    from bpfnet.app.controller import CONTROLLERS

    return CONTROLLERS[app].state_model


def locally_valid(app: str, body: Any) -> bool:
    """Would the app's model accept `body`? Such bodies are real changes, not malformed input."""
    try:
        state_model(app).model_validate(body)
    except Exception:
        return False
    return True


# --- the agent ---------------------------------------------------------------------------------

class SoakAgent:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sk-"))  # short: unix socket paths max 107 bytes
        self.socket = self.dir / "agent.sock"
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                 base_url="http://agent", timeout=REQUEST_TIMEOUT)
        self.sent = 0

    def bpfnet(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BPFNET), *args], capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"bpfnet {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc

    def start(self) -> None:
        self.bpfnet("agent", "--background", "--socket", str(self.socket),
                    "--state-db", str(self.dir / "state.db"), "--pin-root", str(PIN_ROOT),
                    "--apps", ",".join(APPS))

    def stop(self) -> None:
        self.http.close()
        stopped = self.bpfnet("agent", "stop", "--detach", "--socket", str(self.socket), check=False)
        pid_file = self.socket.with_suffix(".pid")
        if stopped.returncode != 0 and pid_file.exists():  # wedged: make sure nothing stays behind
            subprocess.run(["kill", "-9", pid_file.read_text().strip()], check=False)
        for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            if ns.startswith(TAG):
                subprocess.run(["ip", "netns", "delete", ns], check=False)
        pins.unpin(PIN_ROOT)
        shutil.rmtree(self.dir, ignore_errors=True)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        self.sent += 1
        return self.http.request(method, path, **kwargs)

    def put(self, app: str, **kwargs) -> httpx.Response:
        return self.request("PUT", f"/v1/apps/{app}/state", **kwargs)

    def snapshot(self) -> dict:
        """Everything that must not move: state, revision, stats, queries, every pinned map."""
        with AgentClient(self.socket) as client:
            apps = {}
            for app in APPS:
                state, revision = client.get_state_and_revision(app)
                apps[app] = {"state": state, "revision": revision, "stats": client.stats(app),
                             "queries": app_queries(client, app, state)}
            return {"apps": apps, "pins": pinned_maps(PIN_ROOT)}


def app_queries(client: AgentClient, app: str, state: dict) -> dict:
    if app == "lb":
        vips = [f"{'[{}]'.format(v['address']) if ':' in v['address'] else v['address']}:{v['port']}/{v['protocol']}"
                for v in state["vips"]]
        return {"health": client.query("lb", "health"),
                **{f"ring {vip}": client.query("lb", "ring", vip=vip) for vip in vips}}
    if app == "ddos":
        rules = client.query("ddos", "rules")
        return {"rules": rules, "samples": client.query("ddos", "samples")}
    if app == "podnet":
        return {"endpoints": client.query("podnet", "endpoints"),
                **{f"endpoint {p['namespace']}/{p['name']}": client.query(
                    "podnet", "endpoint", pod=f"{p['namespace']}/{p['name']}") for p in state["pods"]}}
    return {}


def pinned_maps(root: Path) -> dict[str, Any]:
    """Contents of every map pinned under `root`; programs and links by their kind only."""
    out: dict[str, Any] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        fd = Map.fd_from_pin(path, "object")
        fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
        if "map_type:" not in fdinfo:
            os.close(fd)
            out[name] = "prog" if "prog_type:" in fdinfo else "link"
            continue
        with Map.from_fd(fd) as m:
            if m.type in (MapType.RINGBUF, MapType.PERF_EVENT_ARRAY, MapType.PROG_ARRAY):
                out[name] = (m.type, m.max_entries)
            else:
                out[name] = dict(m.items())
    return out


@pytest.fixture(scope="module")
def agent() -> Iterator[SoakAgent]:
    if not APPS:
        pytest.skip("no app controller imports")
    soak = SoakAgent()
    try:
        soak.start()
        for app, state in baseline_states().items():
            response = soak.put(app, json=state)
            assert response.status_code == 200, response.text
        soak.baseline = soak.snapshot()
        yield soak
    finally:
        soak.stop()


def assert_refused(response: httpx.Response, *, statuses=range(400, 500)) -> str:
    """A 4xx with a JSON message that is one readable line; returns the message."""
    where = f"{response.request.method} {str(response.request.url)[:200]}"
    assert response.status_code in statuses, f"{where}: {response.status_code} {response.text[:500]}"
    assert response.headers.get("content-type", "").startswith("application/json"), where
    message = response.json()["message"]
    assert isinstance(message, str) and message.strip(), where
    assert len(message) < 2000 and "Traceback" not in message, f"{where}: {message[:500]}"
    return message


def assert_invalid_state(response: httpx.Response, app: str) -> str:
    """422 for the app's state, naming where the problem is ('vips.0.port: ...')."""
    message = assert_refused(response, statuses=(422,))
    assert message.startswith(f"invalid state for {app}: "), message
    detail = message.removeprefix(f"invalid state for {app}: ")
    assert ": " in detail, message  # where: what
    errors = response.json().get("errors")
    if errors is not None:
        assert errors and all("loc" in e and "msg" in e for e in errors), errors
    return message


# --- hand-written cases ------------------------------------------------------------------------

def changed(app: str, path: str, value: Any) -> dict:
    """The baseline state of `app` with the value at dotted `path` replaced ('vips.0.port')."""
    state = _all_baselines()[app]
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = state
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return state


DELETE = object()
LONG = "x" * 1_000_000

# (app, body, status, words the message must contain)
STATE_CASES = [
    ("lb", {"vips": "nonsense"}, 422, ["vips", "valid list"]),
    ("lb", changed("lb", "vips.0.address", "10.0.0.300"), 422, ["vips.0.address", "10.0.0.300"]),
    ("lb", changed("lb", "vips.0.address", LONG), 422, ["vips.0.address", "chars)..."]),
    ("lb", changed("lb", "vips.0.address", "10.93.0.1/32"), 422, ["vips.0.address"]),
    ("lb", changed("lb", "vips.0.port", 70000), 422, ["vips.0.port", "70000"]),
    ("lb", changed("lb", "vips.0.port", -1), 422, ["vips.0.port", "-1"]),
    ("lb", changed("lb", "vips.0.port", "http"), 422, ["vips.0.port", "http"]),
    ("lb", changed("lb", "vips.0.port", 80.5), 422, ["vips.0.port"]),
    ("lb", changed("lb", "vips.0.port", DELETE), 422, ["vips.0.port", "Field required"]),
    ("lb", changed("lb", "vips.0.protocol", "icmp"), 422, ["vips.0.protocol", "icmp"]),
    ("lb", changed("lb", "vips.0.flags", ["turbo"]), 422, ["vips.0.flags.0", "turbo"]),
    ("lb", changed("lb", "vips.0.maglev", "v3"), 422, ["vips.0.maglev", "v3"]),
    ("lb", changed("lb", "vips.0.reals.0.weight", -1), 422, ["vips.0.reals.0.weight", "-1"]),
    ("lb", changed("lb", "vips.0.reals.0.weight", 10**12), 422, ["vips.0.reals.0.weight"]),
    ("lb", changed("lb", "vips.0.reals.0.weight", "heavy"), 422, ["vips.0.reals.0.weight", "heavy"]),
    ("lb", changed("lb", "vips.0.reals.0.address", "10.93.1.2"), 422, ["vips.0", "10.93.1.2 is listed twice"]),
    ("lb", changed("lb", "vips.1.reals.0.address", "10.93.1.9"), 422, ["vips.1", "10.93.1.9 is IPv4"]),
    ("lb", changed("lb", "vips.0.reals.0.port", 80), 422, ["vips.0.reals.0.port", "Extra inputs"]),
    ("lb", changed("lb", "vips.1", {"address": "10.93.0.1", "port": 80}), 422, ["10.93.0.1:80/tcp is defined twice"]),
    ("lb", changed("lb", "vips.0.health_check", {"kind": "http", "path": "health"}), 422,
     ["vips.0.health_check.path", "must start with '/'"]),
    ("lb", changed("lb", "vips.0.health_check", {"kind": "icmp"}), 422, ["vips.0.health_check.kind", "icmp"]),
    ("lb", changed("lb", "vips.0.health_check", {"interval": 0}), 422, ["vips.0.health_check.interval"]),
    ("lb", changed("lb", "vips.0.health_check", {"rise": 0}), 422, ["vips.0.health_check.rise"]),
    ("lb", changed("lb", "vips.0", {"address": "10.93.0.9", "port": 0, "health_check": {}}), 422,
     ["needs a port"]),
    ("lb", changed("lb", "settings.ring_size", 65536), 422, ["settings.ring_size", "must be prime"]),
    ("lb", changed("lb", "settings.ring_size", 2**61 - 1), 422, ["settings.ring_size"]),
    ("lb", changed("lb", "settings.max_vips", 1), 422, ["2 VIPs, settings.max_vips is 1"]),
    ("lb", changed("lb", "settings.max_vips", 0), 422, ["settings.max_vips"]),
    ("lb", changed("lb", "settings.gateway_mac", "02:00:00:00:00"), 422, ["settings.gateway_mac", "02:00:00:00:00"]),
    ("lb", changed("lb", "settings.encap", "gre"), 422, ["settings.encap", "gre"]),
    ("lb", changed("lb", "settings.encap", "gue"), 422, ["gue_source_v4 is needed"]),
    ("lb", changed("lb", "settings.gue_source_v4", "fc00::1"), 422, ["settings.gue_source_v4"]),
    ("lb", changed("lb", "settings.udp_timeout", 1e308), 422, ["settings.udp_timeout"]),
    ("lb", changed("lb", "settings.udp_timeout", -1), 422, ["settings.udp_timeout"]),
    ("lb", changed("lb", "settings.max_frame_size", 10**6), 422, ["settings.max_frame_size"]),
    ("lb", changed("lb", "settings.xdp_mode", "offload"), 422, ["settings.xdp_mode", "offload"]),
    ("lb", {"vipz": []}, 422, ["vipz", "Extra inputs are not permitted"]),
    ("lb", changed("lb", "settings.interface", "sk-nosuch0"), 409, ["no interface 'sk-nosuch0'"]),
    ("ddos", {"rules": [{"expr": "udp and"}]}, 422, ["rules.0", "'udp and'", "syntax error"]),
    ("ddos", {"rules": [{"expr": "port 99999"}]}, 422, ["rules.0", "'port 99999'"]),
    ("ddos", {"rules": [{"expr": "host 10.0.0.300"}]}, 422, ["rules.0", "10.0.0.300"]),
    ("ddos", {"rules": [{"expr": "net 10.0.0.0/33"}]}, 422, ["rules.0", "10.0.0.0/33"]),
    ("ddos", {"rules": [{"expr": "tcp port http and"}]}, 422, ["rules.0", "expression"]),
    ("ddos", {"rules": [{"expr": "udp", "rate": 5}]}, 422, ["rules.0", "only apply to action limit"]),
    ("ddos", {"rules": [{"expr": "udp", "action": "limit"}]}, 422, ["rules.0", "action limit needs a rate"]),
    ("ddos", {"rules": [{"expr": ""}]}, 422, ["rules.0.expr", "at least 1 character"]),
    ("ddos", {"rules": [{"expr": "udp or " * 200 + "tcp"}]}, 422, ["rules.0.expr", "at most 1024 characters"]),
    ("ddos", {"rules": [{"expr": LONG}]}, 422, ["rules.0.expr", "chars)..."]),
    ("ddos", {"rules": [{"expr": "udp", "action": "reject"}]}, 422, ["rules.0.action", "reject"]),
    ("ddos", {"rules": [{"expr": "udp", "action": "limit", "rate": -1}]}, 422, ["rules.0.rate", "-1"]),
    ("ddos", {"rules": [{"expr": "udp", "action": "limit", "rate": 10**9}]}, 422, ["rules.0.rate"]),
    ("ddos", {"rules": [{"expr": "udp", "action": "limit", "rate": 5, "burst": 0}]}, 422, ["rules.0.burst"]),
    ("ddos", {"rules": [{"expr": "udp", "id": 0}]}, 422, ["rules.0.id"]),
    ("ddos", {"rules": [{"expr": "udp", "id": 65536}]}, 422, ["rules.0.id", "65536"]),
    ("ddos", {"rules": [{"expr": "udp", "id": 7}, {"expr": "tcp", "id": 7}]}, 422, ["duplicate id 7"]),
    ("ddos", {"rules": [{"expr": "udp", "expires": "tomorrow"}]}, 422, ["rules.0.expires", "tomorrow"]),
    ("ddos", {"rules": [{"expr": "udp", "prio": 1}]}, 422, ["rules.0.prio", "Extra inputs"]),
    ("ddos", {"rules": [{"expr": "udp"}] * 65536}, 422, ["rules", "at most 65535"]),
    ("ddos", {"rules": {"expr": "udp"}}, 422, ["rules", "valid list"]),
    ("ddos", {"sample_every": -1}, 422, ["sample_every", "-1"]),
    ("ddos", {"sample_every": "often"}, 422, ["sample_every", "often"]),
    ("ddos", {"interfaces": ["bad name!"]}, 422, ["interface name 'bad name!'"]),
    ("ddos", {"interfaces": ["a" * 16]}, 422, ["interface name"]),
    ("ddos", {"xdp_mode": "offload"}, 422, ["xdp_mode", "offload"]),
    ("ddos", {"interfaces": ["sk-nosuch0"]}, 409, ["no interface 'sk-nosuch0'"]),
    ("podnet", changed("podnet", "nodes.0.pod_cidr", "10.0.0.0/30"), 422, ["nodes.0.pod_cidr", "too small"]),
    ("podnet", changed("podnet", "nodes.0.pod_cidr", "banana"), 422, ["nodes.0.pod_cidr", "'banana' is not a CIDR"]),
    ("podnet", changed("podnet", "nodes.0.pod_cidr", "fc00::/64"), 422, ["nodes.0.pod_cidr", "only IPv4"]),
    ("podnet", changed("podnet", "nodes.0.name", "Node_1"), 422, ["nodes.0.name", "'Node_1' is not a DNS label"]),
    ("podnet", changed("podnet", "nodes", [{"name": "n1", "pod_cidr": "10.93.64.0/24", "netns": TAG},
                                           {"name": "n2", "pod_cidr": "10.93.0.0/16", "netns": TAG + "b"}]),
     422, ["node n1 pod_cidr 10.93.64.0/24 overlaps node n2"]),
    ("podnet", changed("podnet", "namespaces.0.labels", {"bad key!": "x"}), 422,
     ["namespaces.0.labels", "'bad key!'"]),
    ("podnet", changed("podnet", "namespaces.0.labels", {"team": "x" * 64}), 422,
     ["namespaces.0.labels", "not a valid Kubernetes label value"]),
    ("podnet", changed("podnet", "namespaces.1.name", "ghost"), 422, ["namespace 'dev' does not exist"]),
    ("podnet", changed("podnet", "pods.0.node", "ghost"), 422, ["node 'ghost' does not exist"]),
    ("podnet", changed("podnet", "pods.0.address", "10.93.65.5"), 422, ["10.93.65.5 is not a pod address of node n1"]),
    ("podnet", changed("podnet", "pods.0.address", "10.93.64.300"), 422, ["pods.0.address", "10.93.64.300"]),
    ("podnet", changed("podnet", "pods.1", {"namespace": "prod", "name": "web", "node": "n1"}), 422,
     ["pod 'prod/web' is defined twice"]),
    ("podnet", changed("podnet", "pods.0.ports", [{"port": 70000}]), 422, ["pods.0.ports.0.port", "70000"]),
    ("podnet", changed("podnet", "pods.0.labels", {"app": ["web"]}), 422, ["pods.0.labels.app"]),
    ("podnet", changed("podnet", "policies.0.spec.podSelector.matchExpressions",
                       [{"key": "app", "operator": "Maybe"}]), 422, ["matchExpressions.0.operator", "Maybe"]),
    ("podnet", changed("podnet", "policies.0.spec.podSelector.matchExpressions",
                       [{"key": "app", "operator": "In"}]), 422, ["operator In needs a non-empty values list"]),
    ("podnet", changed("podnet", "policies.0.spec.podSelector.matchExpressions",
                       [{"key": "app", "operator": "Exists", "values": ["x"]}]), 422,
     ["operator Exists takes no values"]),
    ("podnet", changed("podnet", "policies.0.spec.podSelector.matchLabels", {"app": 5}), 422,
     ["podSelector.matchLabels.app"]),
    ("podnet", changed("podnet", "policies.0.spec.ingress.0.from", [{"ipBlock": {"cidr": "10.0.0.0/33"}}]), 422,
     ["ipBlock.cidr", "'10.0.0.0/33' is not a CIDR"]),
    ("podnet", changed("podnet", "policies.0.spec.ingress.0.from",
                       [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.0.0.0/8"]}}]), 422,
     ["10.0.0.0/8 is not a strict subset of cidr 10.1.0.0/16"]),
    ("podnet", changed("podnet", "policies.0.spec.ingress.0.from",
                       [{"ipBlock": {"cidr": "10.1.0.0/16"}, "podSelector": {}}]), 422,
     ["ipBlock cannot be combined with podSelector"]),
    ("podnet", changed("podnet", "policies.0.spec.ingress.0.from", [{}]), 422,
     ["a peer needs podSelector, namespaceSelector or ipBlock"]),
    ("podnet", changed("podnet", "policies.0.spec.ingress.0.ports", [{"port": 0}]), 422, ["port 0 is not in 1..65535"]),
    ("podnet", changed("podnet", "policies.0.spec.ingress.0.ports", [{"port": "HTTP"}]), 422,
     ["port name 'HTTP' is not a valid port name"]),
    ("podnet", changed("podnet", "policies.0.spec.ingress.0.ports", [{"port": 90, "endPort": 80}]), 422,
     ["endPort 80 must be within 90..65535"]),
    ("podnet", changed("podnet", "policies.0.spec.ingress.0.ports", [{"port": "http", "endPort": 80}]), 422,
     ["endPort needs a numeric port"]),
    ("podnet", changed("podnet", "policies.0.spec.ingress.0.ports", [{"protocol": "ICMP"}]), 422,
     ["ports.0.protocol", "ICMP"]),
    ("podnet", changed("podnet", "policies.0.spec.policyTypes", ["Sideways"]), 422, ["policyTypes.0", "Sideways"]),
    ("podnet", changed("podnet", "policies.0.apiVersion", "v1"), 422, ["policies.0.apiVersion", "v1"]),
    ("podnet", changed("podnet", "policies.0.kind", "Pod"), 422, ["policies.0.kind", "Pod"]),
    ("podnet", changed("podnet", "policies.0.metadata.name", "Bad_Name"), 422, ["metadata.name", "'Bad_Name'"]),
    ("podnet", changed("podnet", "policies.0.metadata.namespace", "ghost"), 422,
     ["policy ghost/allow-client: namespace 'ghost' does not exist"]),
    ("podnet", changed("podnet", "policies.0.spec", DELETE), 422, ["policies.0.spec", "Field required"]),
    ("podnet", {"pods": [{"namespace": "prod", "name": "web", "node": "n1"}]}, 422,
     ["namespace 'prod' does not exist"]),
]


@pytest.mark.parametrize("app, body, status, words", [c for c in STATE_CASES if c[0] in APPS],
                         ids=lambda v: None if not isinstance(v, str) or len(v) > 20 else v)
def test_invalid_states_are_refused_naming_the_field(agent, app, body, status, words):
    response = agent.put(app, json=body)
    message = assert_invalid_state(response, app) if status == 422 else assert_refused(response, statuses=(status,))
    for word in words:
        assert word in message, message


# bodies that are not a state of any app: (body, content type, status, words)
BODY_CASES = [
    (b"", "application/json", 422, ["body is empty"]),
    (b"{", "application/json", 422, ["body is not JSON"]),
    (b"{'vips': []}", "application/json", 422, ["body is not JSON"]),
    (b'{"rules": [}', "application/json", 422, ["body is not JSON"]),
    (b"\xef\xbb\xbf{", "application/json", 422, ["body is not JSON"]),
    (b"\xff\xfe\xfd", "application/json", 422, ["body is not JSON"]),
    (b"\x00" * 100, "application/json", 422, ["body is not JSON"]),
    (b'{"a": NaN}', "application/json", 422, ["NaN is not a JSON number"]),
    (b'{"a": -Infinity}', "application/json", 422, ["-Infinity is not a JSON number"]),
    (b"[" * 5000 + b"]" * 5000, "application/json", 422, ["nests deeper than"]),
    (b'{"a":' * 100 + b"1" + b"}" * 100, "application/json", 422, ["nests deeper than"]),
    (b"null", "application/json", 422, ["state: Input should be a valid dictionary"]),
    (b"[]", "application/json", 422, ["state: Input should be a valid dictionary"]),
    (b'"state"', "application/json", 422, ["state: Input should be a valid dictionary"]),
    (b"42", "application/json", 422, ["state: Input should be a valid dictionary"]),
    (b"true", "application/json", 422, ["state: Input should be a valid dictionary"]),
    (b"x" * (17 * 1024 * 1024), "application/json", 413, ["over the limit"]),
    (b"{}", "text/plain", 415, ["Content-Type must be application/json, not 'text/plain'"]),
    (b"{}", "application/x-www-form-urlencoded", 415, ["application/x-www-form-urlencoded"]),
    (b"{}", "application/yaml", 415, ["application/yaml"]),
    (b"vips: []", "application/yaml", 415, ["application/yaml"]),
]


@pytest.mark.parametrize("body, content_type, status, words", BODY_CASES,
                         ids=[f"{c[1]}-{c[0][:12]!r}" for c in BODY_CASES])
def test_bodies_that_are_not_json_states_are_refused(agent, body, content_type, status, words):
    for app in APPS:
        message = assert_refused(agent.put(app, content=body, headers={"content-type": content_type}),
                                 statuses=(status,))
        assert message.startswith(f"invalid state for {app}: "), message
        for word in words:
            assert word in message, message


def test_a_valid_state_sent_as_another_content_type_is_not_applied(agent):
    for app, state in baseline_states().items():
        for content_type in ("text/plain", "text/json", "application/octet-stream"):
            assert_refused(agent.put(app, content=json.dumps(state).encode(),
                                     headers={"content-type": content_type}), statuses=(415,))


def test_if_match_must_be_the_current_revision(agent):
    for app in APPS:
        revision = agent.baseline["apps"][app]["revision"]
        state = agent.baseline["apps"][app]["state"]
        message = assert_refused(agent.put(app, json=state, headers={"if-match": f'"{revision + 7}"'}),
                                 statuses=(412,))
        assert f"at revision {revision}, not {revision + 7}" in message
        for bad in ("abc", "*", '"1.5"', "9" * 5000):
            message = assert_refused(agent.put(app, json=state, headers={"if-match": bad}), statuses=(400,))
            assert "If-Match must be a revision number" in message


# (method, path, status, words)
ROUTE_CASES = [
    ("GET", "/", 404, ["no such endpoint: GET /"]),
    ("GET", "/v2/health", 404, ["no such endpoint: GET /v2/health"]),
    ("GET", "/v1/apps/nope/state", 404, ["app 'nope' is not enabled in this agent"]),
    ("PUT", "/v1/apps/nope/state", 404, ["app 'nope' is not enabled in this agent"]),
    ("GET", "/v1/apps/nope/stats", 404, ["app 'nope' is not enabled"]),
    ("GET", "/v1/apps/nope/schema", 404, ["app 'nope' is not enabled"]),
    ("GET", "/v1/apps/nope/query/rules", 404, ["app 'nope' is not enabled"]),
    ("GET", "/v1/apps/" + "a" * 3000 + "/state", 404, ["is not enabled"]),
    ("GET", "/v1/apps/LB/state", 404, ["app 'LB' is not enabled"]),
    ("DELETE", "/v1/apps/lb/state", 405, ["method DELETE is not allowed on /v1/apps/lb/state"]),
    ("POST", "/v1/apps/ddos/state", 405, ["method POST is not allowed"]),
    ("PATCH", "/v1/apps/podnet/state", 405, ["method PATCH is not allowed"]),
    ("PUT", "/v1/health", 405, ["method PUT is not allowed on /v1/health"]),
    ("POST", "/metrics", 405, ["method POST is not allowed on /metrics"]),
    ("GET", "/v1/shutdown", 405, ["method GET is not allowed on /v1/shutdown"]),
    ("POST", "/v1/shutdown?detach=maybe", 400, ["query parameter detach"]),
    ("GET", "/v1/audit?limit=abc", 400, ["query parameter limit", "'abc'"]),
    ("GET", "/v1/audit?limit=-1", 400, ["query parameter limit"]),
    ("GET", "/v1/audit?limit=" + "9" * 100, 400, ["query parameter limit"]),
    ("GET", "/v1/apps/lb/query/nope", 404, ["app lb has no query 'nope'"]),
    ("GET", "/v1/apps/lb/query/ring", 400, ["missing parameter 'vip'"]),
    ("GET", "/v1/apps/lb/query/ring?vip=10.93.0.1:81/tcp", 400, ["no VIP 10.93.0.1:81"]),
    ("GET", "/v1/apps/lb/query/ring?vip=banana", 400, ["'banana'"]),
    ("GET", "/v1/apps/lb/query/ring?vip=10.93.0.1:99999", 400, ["99999"]),
    ("GET", "/v1/apps/lb/query/flow?src=10.0.0.1&sport=x&dst=10.93.0.1&dport=80", 400, ["lb query flow"]),
    ("GET", "/v1/apps/lb/query/flow?src=10.0.0.1&sport=1000&dst=fc00:93::1&dport=53&protocol=udp", 400,
     ["different IP versions"]),
    ("GET", "/v1/apps/lb/query/flow?src=10.0.0.1&sport=1000&dst=10.93.0.1&dport=80&protocol=sctp", 400,
     ["'sctp'"]),
    ("GET", "/v1/apps/lb/query/flow?src=banana&sport=1000&dst=10.93.0.1&dport=80", 400, ["banana"]),
    ("GET", "/v1/apps/lb/query/flow?src=10.0.0.1&sport=99999&dst=10.93.0.1&dport=80", 400, ["99999"]),
    ("GET", "/v1/apps/lb/query/flow?src=10.0.0.1&sport=-1&dst=10.93.0.1&dport=80", 400, ["-1"]),
    ("GET", "/v1/apps/ddos/query/nope", 404, ["app ddos has no query 'nope'"]),
    ("GET", "/v1/apps/ddos/query/samples?limit=many", 400, ["ddos query samples", "many"]),
    ("GET", "/v1/apps/podnet/query/nope", 404, ["app podnet has no query 'nope'"]),
    ("GET", "/v1/apps/podnet/query/endpoint?pod=prod/ghost", 404, ["pod 'prod/ghost' does not exist"]),
    ("GET", "/v1/apps/podnet/query/endpoint", 404, ["podnet query endpoint"]),
]


@pytest.mark.parametrize("method, path, status, words",
                         [c for c in ROUTE_CASES if not re.match(r"/v1/apps/(lb|ddos|podnet)/", c[1])
                          or c[1].split("/")[3] in APPS], ids=lambda v: v[:40] if isinstance(v, str) else None)
def test_unknown_routes_methods_and_bad_parameters_are_refused(agent, method, path, status, words):
    message = assert_refused(agent.request(method, path), statuses=(status,))
    for word in words:
        assert word in message, message


def test_malformed_http_is_refused_by_the_server(agent):
    """Below the API: requests that are not HTTP at all get a 4xx status line, not a hang."""
    import socket

    for raw in (b"GARBAGE\r\n\r\n", b"GET /v1/health\r\n\r\n",
                b"GET /v1/health HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n",
                b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
                b"PUT /v1/apps/x/state HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(REQUEST_TIMEOUT)
            sock.connect(str(agent.socket))
            sock.sendall(raw)
            reply = sock.recv(4096)
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.") else None
        assert status is not None and 400 <= status < 500, (raw[:60], reply[:200])
    assert agent.request("GET", "/v1/health").status_code == 200


# --- generated cases ---------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=10)
tricky_values = st.sampled_from([
    -1, 0, 1, 65535, 65536, 2**31, 2**64, -2**63, 10**30, 1e300, -0.0, 0.5, True, False, None, "", " ",
    "x" * 5000, "10.0.0.300", "300.1.1.1/8", "::g", "fc00::1", "10.0.0.1", "0.0.0.0/0", "10.0.0.0/33",
    "02:00:00:00:00:zz", "udp and", "port 99999", "host", "(", "TCP", "In", "Ingress", "a/b", "..",
    "\x00", "\u202e", "é", [], {}, [None], {"": None}, {"matchLabels": {"k": "v"}}, ["x"] * 50,
])
bad_values = tricky_values | json_values


def tree_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indexes)."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += tree_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += tree_paths(item, (*prefix, index))
    return paths


def mutated(state: dict, path: tuple, how: str, value: Any, key: str) -> Any:
    """`state` with the node at `path` replaced by `value`, removed, or given an extra field."""
    if not path:
        return value if how == "replace" else {**state, key: value}
    state = copy.deepcopy(state)
    node = state
    for part in path[:-1]:
        node = node[part]
    last = path[-1]
    if how == "replace":
        node[last] = value
    elif how == "delete":
        del node[last]
    elif isinstance(node[last], dict):
        node[last][key] = value
    else:
        node[last] = [node[last], value] if not isinstance(node[last], list) else [*node[last], value]
    return state


@pytest.mark.parametrize("app", APPS)
@settings(SOAK, max_examples=450)
@given(data=st.data())
def test_generated_mutations_of_a_valid_state_are_refused(agent, app, data):
    """One node of the app's valid state replaced by a bad value, removed, or given an unknown
    field; whenever the model would not accept the result, the agent refuses it with a 422."""
    state = baseline_states()[app]
    path = data.draw(st.sampled_from(tree_paths(state)), label="path")
    how = data.draw(st.sampled_from(["replace", "replace", "delete", "extra"]), label="how")
    value = data.draw(bad_values, label="value")
    key = data.draw(st.sampled_from(["unknown", "Address", "ports ", "vip", "ruless"]) | st.text(max_size=10),
                    label="key")
    if how == "delete" and not path:
        how = "replace"
    body = mutated(state, path, how, value, key)
    if locally_valid(app, body):
        return  # a real (valid) change, not malformed input
    assert_invalid_state(agent.put(app, json=body), app)


@pytest.mark.parametrize("app", APPS)
@settings(SOAK, max_examples=160)
@given(body=json_values)
def test_generated_json_documents_are_refused(agent, app, body):
    if locally_valid(app, body):
        return
    assert_invalid_state(agent.put(app, json=body), app)


pcap_tokens = st.sampled_from([
    "tcp", "udp", "icmp", "ip", "ip6", "host", "net", "port", "portrange", "src", "dst", "and", "or", "not",
    "(", ")", "10.0.0.1", "10.0.0.0/8", "10.0.0.0/33", "fc00::1", "53", "99999", "1-1024", "tcp[13]", "&", "=",
    "!=", "0x12", "tcp[tcpflags]", "tcp-syn", "vlan", "ether", "proto", "len", ">", "<", "greater", "less", "1500"])


@pytest.mark.skipif("ddos" not in APPS, reason="the ddos controller is not installed")
@settings(SOAK, max_examples=150)
@given(tokens=st.lists(pcap_tokens, min_size=1, max_size=8))
def test_generated_tcpdump_expressions_that_do_not_compile_are_refused(agent, tokens):
    expression = " ".join(tokens)
    body = {"rules": [{"expr": expression, "action": "drop"}]}
    if locally_valid("ddos", body):
        return  # a real filter: sending it would change the rules
    message = assert_invalid_state(agent.put("ddos", json=body), "ddos")
    assert message.startswith("invalid state for ddos: rules.0"), message
    assert expression in message, message


@settings(SOAK, max_examples=300)
@given(body=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       content_type=st.sampled_from(["application/json", "text/plain", "application/octet-stream", None]))
def test_generated_raw_bodies_are_refused(agent, body, content_type):
    app = APPS[len(body) % len(APPS)]
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and content_type in ("application/json", None) and locally_valid(app, parsed):
        return
    headers = {"content-type": content_type} if content_type else {}
    assert_refused(agent.put(app, content=body, headers=headers))


media_types = st.from_regex(r"[a-z]{1,12}/[a-z0-9.+-]{1,20}(; ?[a-z]{1,8}=[a-z0-9-]{1,10})?", fullmatch=True)


@settings(SOAK, max_examples=120)
@given(content_type=media_types)
def test_generated_content_types_other_than_json_are_refused(agent, content_type):
    media_type = content_type.split(";")[0]
    if media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json")):
        return
    app = APPS[len(content_type) % len(APPS)]
    message = assert_refused(agent.put(app, json=baseline_states()[app], headers={"content-type": content_type}),
                             statuses=(415,))
    assert content_type in message


segments = st.sampled_from(["v1", "apps", *BUILTIN_APPS, "nope", "state", "stats", "schema", "query",
                            "audit", "health", "metrics", "rules", "flows", "..", ".", "%00", "~", "é"]) \
    | st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"), exclude_characters="/?#%"),
              min_size=1, max_size=20)


@settings(SOAK, max_examples=300)
@given(method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]),
       parts=st.lists(segments, min_size=0, max_size=6),
       params=st.dictionaries(st.sampled_from(["limit", "app", "detach", "vip", "pod", "x"]) | st.text(max_size=8),
                              st.text(max_size=20), max_size=3))
def test_generated_routes_and_methods_never_fail_the_server(agent, method, parts, params):
    path = "/" + "/".join(parts)
    if path.rstrip("/") == "/v1/shutdown" or (method == "PUT" and path.endswith("/state")) \
            or (method == "POST" and "shutdown" in path):
        return  # real verbs with real effects are not the point here
    response = agent.request(method, path, params=params)
    assert response.status_code < 500, f"{method} {response.request.url}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert_refused(response)


query_names = st.sampled_from(["health", "ring", "flow", "rules", "samples", "endpoints", "endpoint", "flows",
                               "nope", "RING", "ring ", "x" * 300]) \
    | st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"), exclude_characters="/?#%"),
              min_size=1, max_size=15)
query_params = st.dictionaries(
    st.sampled_from(["vip", "src", "sport", "dst", "dport", "protocol", "limit", "pod", "node", "x"]),
    st.sampled_from(["10.93.0.1:80/tcp", "[fc00:93::1]:53/udp", "10.93.0.1", "fc00:93::1", "10.0.0.1", "80",
                     "53", "0", "-1", "65536", "99999999999999999999", "tcp", "udp", "icmp", "prod/web",
                     "prod/ghost", "", "abc", "1e3", "1.5"]) | st.text(max_size=12),
    max_size=6)


@settings(SOAK, max_examples=300)
@given(name=query_names, params=query_params)
def test_generated_queries_answer_or_refuse(agent, name, params):
    app = APPS[len(name) % len(APPS)]
    response = agent.request("GET", f"/v1/apps/{app}/query/{name}", params=params)
    assert response.status_code < 500, f"{response.request.url}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        message = assert_refused(response, statuses=(400, 404))
        assert app in message or "no such endpoint" in message, message


# --- config files through the CLIs -------------------------------------------------------------

CLI_APPLY = {"lb": ["apply", "-f"], "ddos": ["apply", "-f"], "podnet": ["policy", "apply", "-f"]}

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=False))

COMMON_FILES = [  # (file name, content, words the error must contain)
    ("binary.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", ["binary.yaml: not a UTF-8 text file"]),
    ("unclosed.yaml", b"vips: [\n  {address: 10.0.0.1\n", ["unclosed.yaml: not valid YAML", "line 3, column 1"]),
    ("tabs.yaml", b"rules:\n\t- expr: udp\n", ["tabs.yaml: not valid YAML", "line 2, column 1"]),
    ("scalar.yaml", b"just a string\n", ["scalar.yaml"]),
    ("laughs.yaml", BILLION_LAUGHS.encode(), []),
    ("deep.yaml", b"[" * 1500 + b"]" * 1500, []),
]
APP_FILES = {
    "lb": [
        ("lb-bad-ip.yaml", b"vips:\n- address: 10.0.0.300\n  port: 80\n", ["vips.0.address"]),
        ("lb-port.yaml", b"vips:\n- address: 10.0.0.1\n  port: 70000\n", ["vips.0.port"]),
        ("lb-weight.yaml", b"vips:\n- {address: 10.0.0.1, port: 80, reals: [{address: 10.0.1.1, weight: -3}]}\n",
         ["vips.0.reals.0.weight"]),
        ("lb-nan.yaml", b"settings: {udp_timeout: .nan}\n", ["settings.udp_timeout: nan is not a finite number"]),
        ("lb-inf.yaml", b"settings: {udp_timeout: .inf}\n", ["settings.udp_timeout: inf is not a finite number"]),
        ("lb-unknown.yaml", b"vips: []\nvipz: []\n", ["vipz"]),
        ("lb-list.yaml", b"- address: 10.0.0.1\n", ["lb-list.yaml"]),
    ],
    "ddos": [
        ("ddos-expr.yaml", b"- expr: 'udp and'\n", ["udp and"]),
        ("ddos-host.yaml", b"rules:\n- expr: host 10.0.0.300\n", ["10.0.0.300"]),
        ("ddos-action.yaml", b"- {expr: udp, action: reject}\n", ["action"]),
        ("ddos-rate.yaml", b"- {expr: udp, action: limit}\n", ["needs a rate"]),
        ("ddos-expires.yaml", b"- {expr: udp, expires: .nan}\n", ["0.expires: nan is not a finite number"]),
        ("ddos-unknown.yaml", b"rulez: []\n", ["rulez"]),
        ("ddos-long.yaml", ("- expr: '" + "udp or " * 300 + "tcp'\n").encode(), ["1024"]),
    ],
    "podnet": [
        ("pn-op.yaml", b"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: prod}\n"
                       b"spec:\n  podSelector:\n    matchExpressions: [{key: app, operator: Maybe}]\n",
         ["operator"]),
        ("pn-cidr.yaml", b"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                         b"metadata: {name: p, namespace: prod}\n"
                         b"spec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
         ["10.0.0.0/33"]),
        ("pn-port.yaml", b"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                         b"metadata: {name: p, namespace: prod}\n"
                         b"spec:\n  podSelector: {}\n  ingress: [{ports: [{port: 0}]}]\n", ["port 0"]),
        ("pn-kind.yaml", b"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", ["kind is 'Pod'"]),
        ("pn-ns.yaml", b"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ghost}\n"
                       b"spec: {podSelector: {}}\n", ["ghost"]),
        ("pn-name.yaml", b"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: Bad_Name}\n"
                         b"spec: {podSelector: {}}\n", ["Bad_Name"]),
    ],
}


def cli_entry(app: str):
    """The typer app to invoke `bpfnet <app> ...` with: the mounted one when `bpfnet` has it."""
    from bpfnet.cli import app as bpfnet_app

    if CliRunner().invoke(bpfnet_app, [app, "--help"]).exit_code == 0:
        return bpfnet_app, [app]
    return importlib.import_module(f"bpfnet.{app}.cli").app, []


CLI_APPS = [app for app in APPS if importlib.util.find_spec(f"bpfnet.{app}.cli") is not None]


@pytest.mark.parametrize("app", CLI_APPS)
def test_broken_config_files_are_refused_by_the_cli(agent, app, tmp_path):
    entry, prefix = cli_entry(app)
    files = [*COMMON_FILES, *APP_FILES[app], ("missing.yaml", None, ["missing.yaml"]), ("dir.yaml", "dir", [])]
    problems = []
    for name, content, words in files:
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        result = CliRunner().invoke(entry, [*prefix, *CLI_APPLY[app], str(path), "--socket", str(agent.socket)])
        output = (result.stderr or result.stdout).strip()
        if not (result.exit_code == 1 and isinstance(result.exception, SystemExit)):
            problems.append(f"{name}: exit {result.exit_code} {result.exception!r} {output[:300]}")
        elif not (output.startswith("error: ") and "\n" not in output) or "Traceback" in result.stdout + result.stderr:
            problems.append(f"{name}: not one error line: {output[:500]!r}")
        elif not all(word in output for word in words):
            problems.append(f"{name}: {words} not in {output!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("app", CLI_APPS)
def test_the_installed_command_refuses_a_broken_file(agent, app, tmp_path):
    if agent.bpfnet(app, "--help", check=False).returncode != 0:
        pytest.skip(f"`bpfnet {app}` is not mounted yet")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(APP_FILES[app][0][1])
    proc = agent.bpfnet(app, *CLI_APPLY[app], str(bad), "--socket", str(agent.socket), check=False)
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert APP_FILES[app][0][2][0] in proc.stderr


# --- after the soak ----------------------------------------------------------------------------

def test_zz_nothing_moved_and_a_valid_change_still_works(agent):
    """Runs last (file order): state, revisions, stats, queries and pinned maps are exactly as
    before the soak; the agent answers and still applies a real change."""
    print(f"soak: {agent.sent} requests")
    assert agent.sent > 2000, f"only {agent.sent} requests were sent"
    after = agent.snapshot()
    for app in APPS:
        assert after["apps"][app] == agent.baseline["apps"][app], app
    assert after["pins"].keys() == agent.baseline["pins"].keys()
    for name, contents in agent.baseline["pins"].items():
        assert after["pins"][name] == contents, f"pinned map {name} changed"

    with AgentClient(agent.socket) as client:
        assert client.health()["status"] == "ok"
        assert all(app["tick_errors"] == 0 for app in client.health()["apps"].values())
        if "lb" in APPS:
            result = client.update_state("lb", lambda s: {**s, "vips": [
                {**s["vips"][0], "reals": [*s["vips"][0]["reals"], {"address": "10.93.1.3", "weight": 1}]},
                *s["vips"][1:]]})
            assert result["revision"] == agent.baseline["apps"]["lb"]["revision"] + 1
            ring = client.query("lb", "ring", vip="10.93.0.1:80/tcp")
            assert [row["real"] for row in ring] == ["10.93.1.1", "10.93.1.2", "10.93.1.3"]
            assert sum(row["slots"] for row in ring) == 257 and all(row["slots"] > 0 for row in ring)
        if "ddos" in APPS:
            client.update_state("ddos", lambda s: {**s, "rules": [*s["rules"], {"expr": "udp port 9"}]})
            rules = client.query("ddos", "rules")
            assert [r["expr"] for r in rules][-1] == "udp port 9" and rules[-1]["in_force"]
            assert client.stats("ddos")["rules_in_force"] == 4
        if "podnet" in APPS:
            client.update_state("podnet", lambda s: {**s, "namespaces": [*s["namespaces"], {"name": "qa"}]})
            assert client.stats("podnet")["namespaces"] == 3
        audit = client.audit(limit=5000)
        outcomes = {entry["outcome"] for entry in audit}
        assert {"invalid", "applied"} <= outcomes
