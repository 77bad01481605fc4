"""bpfnet-cni's reading of a CNI call and its JSON answers, and the podnet state changes behind
ADD and DEL, checked against the CNI specification 1.0.0 without an agent or a kernel."""

import json
import subprocess
import sys
from ipaddress import IPv4Address

import pytest

from bpfnet.cni import spec
from bpfnet.cni.plugin import run
from bpfnet.cni.spec import CniError
from bpfnet.podnet.config import ConfigError, Namespace, Node, Pod, PodnetState, Sandbox
from bpfnet.podnet.sandboxes import AttachmentConflict, SandboxPod, plug, unplug

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/proc/42/ns/net",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
CONF = {"cniVersion": "1.0.0", "name": "bpfnet", "type": "bpfnet-cni"}
SANDBOX = {"pod": "default/web", "node": "n1", "address": "10.244.1.2", "prefixlen": 32,
           "gateway": "169.254.1.1", "host": {"name": "lxc0123456789a", "mac": "aa:aa:aa:aa:aa:01"},
           "pod_interface": {"name": "eth0", "mac": "aa:aa:aa:aa:aa:02", "sandbox": "/proc/42/ns/net"},
           "identity": 4242}


def code_of(call, *args):
    with pytest.raises(CniError) as caught:
        call(*args)
    return caught.value.code, caught.value.msg


# --- the call's variables -------------------------------------------------------------------------

def test_environment_of_each_command():
    add = spec.parse_environment({**ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web;FOO=bar"})
    assert (add.command, add.container_id, add.netns, add.ifname) == ("ADD", "abc123", "/proc/42/ns/net", "eth0")
    assert add.args == {"IgnoreUnknown": "1", "K8S_POD_NAME": "web", "FOO": "bar"}
    delete = spec.parse_environment({k: v for k, v in ENV.items() if k != "CNI_NETNS"} | {"CNI_COMMAND": "DEL"})
    assert delete.netns == ""  # DEL may come after the runtime removed the namespace
    assert spec.parse_environment({"CNI_COMMAND": "VERSION"}).command == "VERSION"


@pytest.mark.parametrize("env, named", [
    ({"CNI_COMMAND": "GC"}, "CNI_COMMAND"),
    ({}, "CNI_COMMAND"),
    ({**ENV, "CNI_CONTAINERID": ""}, "CNI_CONTAINERID"),
    ({**ENV, "CNI_COMMAND": "CHECK", "CNI_NETNS": ""}, "CNI_NETNS"),
    ({**ENV, "CNI_IFNAME": ""}, "CNI_IFNAME"),
    ({**ENV, "CNI_NETNS": "netns-1"}, "CNI_NETNS"),
    ({**ENV, "CNI_ARGS": "K8S_POD_NAME=a;FOO=bar"}, "FOO"),
    ({**ENV, "CNI_ARGS": "novalue"}, "novalue"),
])
def test_invalid_variables_are_error_4_naming_them(env, named):
    code, msg = code_of(spec.parse_environment, env)
    assert code == spec.INVALID_ENVIRONMENT == 4 and named in msg


# --- the configuration ----------------------------------------------------------------------------

def test_configuration_fields_and_labels_from_every_source():
    config = spec.parse_config({**CONF, "agentSocket": "/run/x.sock", "node": "n1", "namespace": "shop",
                                "labels": {"app": "web", "tier": "a"},
                                "args": {"cni": {"labels": [{"key": "tier", "value": "b"}]}},
                                "runtimeConfig": {"labels": {"zone": "z1"}}, "dns": {"nameservers": ["10.0.0.10"]}})
    assert (config.agent_socket, config.node, config.namespace) == ("/run/x.sock", "n1", "shop")
    assert config.labels == {"app": "web", "tier": "b", "zone": "z1"}
    assert spec.parse_config(CONF).agent_socket == "/run/bpfnet/agent.sock"


@pytest.mark.parametrize("raw, code, words", [
    ({**CONF, "cniVersion": "1.1.0"}, 1, "cniVersion 1.1.0 is not supported"),
    ({**CONF, "cniVersion": "0.3.1"}, 1, "0.3.1"),
    ({**CONF, "ipam": {"type": "host-local"}}, 2, 'ipam={"type": "host-local"}'),
    ({**CONF, "bridge": "cni0"}, 2, 'bridge="cni0"'),
    ({k: v for k, v in CONF.items() if k != "cniVersion"}, 7, "cniVersion is missing"),
    ({**CONF, "name": ""}, 7, "name is missing"),
    ({**CONF, "agentSocket": "agent.sock"}, 7, "agentSocket"),
    ({**CONF, "namespace": "Not_A_Label"}, 7, "namespace"),
    ({**CONF, "labels": {"bad key!": "x"}}, 7, "labels"),
    ({**CONF, "args": {"cni": {"labels": [{"key": "a"}]}}}, 7, "args.cni.labels"),
    ({**CONF, "runtimeConfig": {"labels": ["a"]}}, 7, "runtimeConfig.labels"),
])
def test_configuration_errors_carry_the_spec_codes(raw, code, words):
    got, msg = code_of(spec.parse_config, raw)
    assert got == code and words in msg, msg


def test_stdin_that_is_not_a_json_object_is_error_6():
    assert code_of(spec.decode, b"{nope")[0] == spec.DECODE_FAILURE == 6
    assert code_of(spec.decode, b"[1]")[0] == 6


def test_pod_identity_from_cni_args_or_the_configuration():
    config = spec.parse_config({**CONF, "namespace": "shop", "labels": {"app": "web"}})
    env = spec.parse_environment({**ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;BPFNET_LABELS=pod:a,app:api"})
    assert spec.pod_identity(env, config) == spec.PodIdentity("x", "a", {"app": "api", "pod": "a"})
    bare = spec.parse_environment({**ENV, "CNI_CONTAINERID": "ABCDEF0123456789"})
    assert spec.pod_identity(bare, config) == spec.PodIdentity("shop", "c-abcdef012345", {"app": "web"})
    bad = spec.parse_environment({**ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=Elated_Turing"})
    code, msg = code_of(spec.pod_identity, bad, config)
    assert code == 4 and "K8S_POD_NAME 'Elated_Turing' is not a DNS label" in msg


# --- results and errors ---------------------------------------------------------------------------

def test_add_result_shape_of_1_0_0():
    result = spec.add_result("1.0.0", SANDBOX, None, {"nameservers": ["10.96.0.10"]})
    assert result == {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "lxc0123456789a", "mac": "aa:aa:aa:aa:aa:01"},
                       {"name": "eth0", "mac": "aa:aa:aa:aa:aa:02", "sandbox": "/proc/42/ns/net"}],
        "ips": [{"address": "10.244.1.2/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {"nameservers": ["10.96.0.10"]},
    }


def test_add_result_of_0_4_0_and_after_a_previous_plugin():
    assert spec.add_result("0.4.0", SANDBOX, None, {})["ips"] == [
        {"version": "4", "address": "10.244.1.2/32", "gateway": "169.254.1.1", "interface": 1}]
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "other0"}],
            "ips": [{"address": "192.0.2.2/24", "interface": 0}], "dns": {"search": ["x"]}}
    chained = spec.add_result("1.0.0", SANDBOX, prev, {})
    assert [i["name"] for i in chained["interfaces"]] == ["other0", "lxc0123456789a", "eth0"]
    assert chained["ips"][1]["interface"] == 2 and chained["ips"][0] == prev["ips"][0]
    assert chained["dns"] == {"search": ["x"]}


def test_error_json_has_code_msg_and_details():
    assert CniError(7, "bad", "field").to_json() == {"cniVersion": "1.0.0", "code": 7, "msg": "bad", "details": "field"}
    assert CniError(100, "down").to_json("0.4.0") == {"cniVersion": "0.4.0", "code": 100, "msg": "down"}


def test_check_compares_prev_result_with_the_attachment():
    good = spec.add_result("1.0.0", SANDBOX, None, {})
    assert spec.check_prev_result(good, SANDBOX) == []
    assert spec.check_prev_result(None, SANDBOX) == ["CHECK needs prevResult"]
    moved = {**good, "ips": [{**good["ips"][0], "address": "10.244.1.9/32"}]}
    assert "the pod has 10.244.1.2/32" in spec.check_prev_result(moved, SANDBOX)[0]
    other_mac = {**good, "interfaces": [good["interfaces"][0], {**good["interfaces"][1], "mac": "aa:aa:aa:aa:aa:99"}]}
    assert "MAC" in spec.check_prev_result(other_mac, SANDBOX)[0]
    elsewhere = {**good, "interfaces": [good["interfaces"][0], {**good["interfaces"][1], "sandbox": "/proc/1/ns/net"}]}
    assert "no interface eth0" in spec.check_prev_result(elsewhere, SANDBOX)[0]


def test_version_answers_the_supported_versions():
    assert run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}') == {
        "cniVersion": "0.4.0", "supportedVersions": ["0.4.0", "1.0.0"]}
    assert run({"CNI_COMMAND": "VERSION"}, b"") == {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}


def test_the_executable_prints_the_error_json_and_exits_non_zero(tmp_path):
    env = {**ENV, "CNI_NETNS": "/proc/self/ns/net"}
    conf = json.dumps({**CONF, "agentSocket": str(tmp_path / "none.sock")})
    proc = subprocess.run([sys.executable, "-m", "bpfnet.cni.plugin"], input=conf, env=env, capture_output=True,
                          text=True, timeout=30)
    error = json.loads(proc.stdout)
    assert proc.returncode == 1 and error["code"] == spec.AGENT_UNAVAILABLE == 100
    assert error["cniVersion"] == "1.0.0" and "agent not running" in error["msg"]


# --- the state changes behind ADD and DEL ---------------------------------------------------------

NODE = Node(name="n1", pod_cidr="10.244.1.0/24", netns="n1")


def request(name="web", container="abc", ifname="eth0", namespace="shop", **kw):
    return SandboxPod(namespace, name, Sandbox(container_id=container, netns=f"/proc/{len(container)}/ns/net",
                                               ifname=ifname), {"app": name}, **kw)


def test_plug_adds_namespace_and_pod_with_an_address_and_is_idempotent():
    state = plug(PodnetState(nodes=[NODE]), request())
    pod = state.pod("shop/web")
    assert pod.address == IPv4Address("10.244.1.2") and pod.node == "n1" and pod.labels == {"app": "web"}
    assert [ns.name for ns in state.namespaces] == ["shop"]
    assert plug(state, request()) is state
    second = plug(state, request("db", "def"))
    assert second.pod("shop/db").address == IPv4Address("10.244.1.3")
    assert state.attached("abc", "eth0").key == "shop/web" and state.attached("abc", "eth1") is None


def test_plug_refuses_conflicts_and_bad_names():
    state = plug(PodnetState(nodes=[NODE]), request())
    with pytest.raises(AttachmentConflict, match="already attached as pod shop/web"):
        plug(state, request("other"))
    with pytest.raises(AttachmentConflict, match=r"pod shop/web already exists \(container abc\)"):
        plug(state, request(container="xyz"))
    made = PodnetState(nodes=[NODE], namespaces=[Namespace(name="shop")], pods=[Pod(namespace="shop", name="web",
                                                                                    node="n1")])
    with pytest.raises(AttachmentConflict, match="a pod made by bpfnet"):
        plug(made, request())
    with pytest.raises(ConfigError, match="no node"):
        plug(PodnetState(), request())
    with pytest.raises(ConfigError, match="node 'n9' does not exist"):
        plug(PodnetState(nodes=[NODE]), request(node="n9"))
    with pytest.raises(ValueError, match="interface name"):
        Sandbox(container_id="abc", netns="/proc/1/ns/net", ifname="a-very-long-ifname")
    with pytest.raises(ValueError, match="not an absolute path"):
        Sandbox(container_id="abc", netns="/proc/../etc/ns")
    with pytest.raises(ValueError, match="container id"):
        Sandbox(container_id="-abc", netns="/proc/1/ns/net")


def test_unplug_removes_only_that_attachment_and_is_idempotent():
    state = plug(plug(PodnetState(nodes=[NODE]), request()), request("db", "def"))
    after = unplug(state, "abc", "eth0")
    assert [p.key for p in after.pods] == ["shop/db"] and [n.name for n in after.namespaces] == ["shop"]
    assert unplug(after, "abc", "eth0") is None
    assert unplug(after, "never-seen", "eth0") is None


def test_one_attachment_is_one_pod():
    pods = [Pod(namespace="shop", name=n, node="n1", sandbox=Sandbox(container_id="abc", netns="/proc/1/ns/net"))
            for n in ("a", "b")]
    with pytest.raises(ValueError, match="container abc interface eth0 is already pod shop/a"):
        PodnetState(nodes=[NODE], namespaces=[Namespace(name="shop")], pods=pods)


def test_labels_in_cni_args_are_key_colon_value():
    assert spec.args_labels("app:web, tier:fe") == {"app": "web", "tier": "fe"}
    assert spec.args_labels("") == {}
    assert code_of(spec.args_labels, "app=web")[0] == 4
    code, msg = code_of(spec.args_labels, "app:no spaces")
    assert code == 4 and "BPFNET_LABELS" in msg
