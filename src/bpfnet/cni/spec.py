"""The CNI specification 1.0.0 as bpfnet-cni speaks it: the CNI_* variables, the network
configuration on stdin, CNI_ARGS, and the result and error JSON. Pure: no agent, no kernel.

Spec version: 1.0.0 (also answers configurations of 0.4.0, whose results differ only in the
`version` of each IP). 1.1.0's STATUS and GC are not implemented; VERSION says so by not listing
1.1.0, and a runtime of 1.1.0 falls back to 1.0.0 calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bpfnet.app.paths import DEFAULT_SOCKET
from bpfnet.errors import BpfnetError
from bpfnet.podnet.config import check_dns_label, check_labels

CNI_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")

# the spec's well-known error codes
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
# bpfnet's own (100 and up, as the spec reserves them for plugins)
AGENT_UNAVAILABLE = 100    # no agent answers on the configured socket
AGENT_REFUSED = 101        # the agent refused the change (an invalid or conflicting pod)
CHECK_FAILED = 102         # CHECK found the attachment differs from what ADD set up
PLUGIN_FAILED = 103        # anything else that went wrong in the plugin (the message says what)

# the fields of a network configuration the spec defines, and bpfnet-cni's own
_SPEC_FIELDS = {"cniVersion", "name", "type", "args", "dns", "runtimeConfig", "capabilities", "prevResult"}
_OWN_FIELDS = {"agentSocket", "node", "namespace", "labels"}
_KNOWN_ARGS = {"IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID",
               "K8S_POD_UID", "BPFNET_LABELS"}


class CniError(BpfnetError):
    """An error as the spec reports it: code, msg and details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, cni_version: str = CNI_VERSION) -> dict:
        error: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            error["details"] = self.details
        return error


@dataclass(frozen=True)
class Environment:
    """The CNI_* variables of one call."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: str = ""


def parse_environment(env: dict[str, str]) -> Environment:
    """The call's variables, checked for what its command needs (error 4 names the variable)."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}",
                       "CNI_COMMAND")
    if command == "VERSION":
        return Environment(command)
    needed = {"CNI_CONTAINERID", "CNI_IFNAME"} | ({"CNI_NETNS"} if command in ("ADD", "CHECK") else set())
    missing = sorted(name for name in needed if not env.get(name))
    if missing:
        raise CniError(INVALID_ENVIRONMENT, f"{command} needs {', '.join(missing)}", ", ".join(missing))
    netns = env.get("CNI_NETNS", "")
    if netns and not netns.startswith("/"):
        raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS {netns!r} is not an absolute path", "CNI_NETNS")
    return Environment(command, env["CNI_CONTAINERID"], netns, env["CNI_IFNAME"],
                       parse_args(env.get("CNI_ARGS", "")), env.get("CNI_PATH", ""))


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS `K=V;K2=V2`; keys bpfnet does not know are an error unless IgnoreUnknown is set."""
    args: dict[str, str] = {}
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS item {item!r} is not KEY=VALUE", "CNI_ARGS")
        args[key] = value
    ignore = args.get("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = sorted(set(args) - _KNOWN_ARGS)
    if unknown and not ignore:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS has unknown keys {', '.join(unknown)} "
                       "(and no IgnoreUnknown=1)", "CNI_ARGS")
    return args


@dataclass(frozen=True)
class NetworkConfig:
    """The plugin's configuration as it arrives on stdin."""

    cni_version: str
    name: str
    agent_socket: str = str(DEFAULT_SOCKET)
    node: str | None = None
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    dns: dict = field(default_factory=dict)
    prev_result: dict | None = None


def decode(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CniError(DECODE_FAILURE, f"the network configuration on stdin is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise CniError(DECODE_FAILURE, "the network configuration on stdin is not a JSON object")
    return value


def check_version(version: Any) -> str:
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "cniVersion is missing from the network configuration", "cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported "
                       f"(supported: {', '.join(SUPPORTED_VERSIONS)})", f"cniVersion: {version}")
    return version


def parse_config(raw: dict) -> NetworkConfig:
    """Checked configuration: error 1 for a version bpfnet does not speak, 2 for a field it does not
    know (named with its value), 7 for a field whose value is wrong."""
    version = check_version(raw.get("cniVersion"))
    for key in sorted(set(raw) - _SPEC_FIELDS - _OWN_FIELDS):
        raise CniError(UNSUPPORTED_FIELD, f"unsupported field in the network configuration: "
                       f"{key}={json.dumps(raw[key])[:200]}", key)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(INVALID_CONFIG, "name is missing from the network configuration", "name")
    labels = {**_conf_labels(raw.get("labels"), "labels"),
              **_args_labels(raw.get("args")),
              **_conf_labels((raw.get("runtimeConfig") or {}).get("labels"), "runtimeConfig.labels")}
    socket, node = raw.get("agentSocket", str(DEFAULT_SOCKET)), raw.get("node")
    namespace = raw.get("namespace", "default")
    if not isinstance(socket, str) or not socket.startswith("/"):
        raise CniError(INVALID_CONFIG, f"agentSocket {socket!r} is not an absolute path", "agentSocket")
    if node is not None and not isinstance(node, str):
        raise CniError(INVALID_CONFIG, f"node {node!r} is not a node name", "node")
    try:
        check_dns_label(namespace if isinstance(namespace, str) else repr(namespace), "namespace")
    except ValueError as err:
        raise CniError(INVALID_CONFIG, str(err), "namespace") from None
    dns = raw.get("dns") or {}
    prev = raw.get("prevResult")
    if not isinstance(dns, dict) or (prev is not None and not isinstance(prev, dict)):
        raise CniError(INVALID_CONFIG, "dns and prevResult must be JSON objects", "dns, prevResult")
    return NetworkConfig(version, name, socket, node, namespace, labels, dns, prev)


def _conf_labels(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CniError(INVALID_CONFIG, f"{where} must be an object of string labels", where)
    try:
        return check_labels(dict(value))
    except ValueError as err:
        raise CniError(INVALID_CONFIG, f"{where}: {err}", where) from None


def _args_labels(args: Any) -> dict[str, str]:
    """`args.cni.labels`: [{"key": k, "value": v}, ...], the CNI conventions' form."""
    if args is None:
        return {}
    items = (args.get("cni") or {}).get("labels", []) if isinstance(args, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("key"), str)
                                              and isinstance(i.get("value"), str) for i in items):
        raise CniError(INVALID_CONFIG, "args.cni.labels must be a list of {\"key\", \"value\"} strings",
                       "args.cni.labels")
    return _conf_labels({i["key"]: i["value"] for i in items}, "args.cni.labels")


@dataclass(frozen=True)
class PodIdentity:
    """Who the container is to podnet: pod NAMESPACE/NAME and labels."""

    namespace: str
    name: str
    labels: dict[str, str]


def pod_identity(env: Environment, config: NetworkConfig) -> PodIdentity:
    """K8S_POD_NAMESPACE (else the configuration's `namespace`), K8S_POD_NAME (else `c-` and the
    container id's first 12 characters); labels from the configuration, args, runtimeConfig and
    CNI_ARGS BPFNET_LABELS (`k:v,k2:v2`), later ones winning."""
    namespace = env.args.get("K8S_POD_NAMESPACE") or config.namespace
    name = env.args.get("K8S_POD_NAME") or f"c-{env.container_id[:12].lower()}"
    for value, what in ((namespace, "K8S_POD_NAMESPACE"), (name, "K8S_POD_NAME")):
        try:
            check_dns_label(value, what)
        except ValueError as err:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS {err}", "CNI_ARGS") from None
    return PodIdentity(namespace, name, {**config.labels, **args_labels(env.args.get("BPFNET_LABELS", ""))})


def args_labels(text: str) -> dict[str, str]:
    """CNI_ARGS BPFNET_LABELS: `k:v,k2:v2`. Not `k=v`: libcni and the reference plugins refuse a
    CNI_ARGS value holding '=', and no label key or value may hold ':'."""
    pairs = [item.partition(":") for item in filter(None, (part.strip() for part in text.split(",")))]
    bad = [key for key, sep, _ in pairs if not sep]
    if bad:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS BPFNET_LABELS item {bad[0]!r} is not key:value", "CNI_ARGS")
    try:
        return check_labels({key: value for key, _, value in pairs})
    except ValueError as err:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS BPFNET_LABELS: {err}", "CNI_ARGS") from None


def add_result(version: str, sandbox: dict, prev_result: dict | None, dns: dict) -> dict:
    """The ADD result: the host veth and the pod's interface (with its sandbox), the pod's address
    on that interface, the default route through the gateway; appended to a previous plugin's
    result when bpfnet-cni is not first in the chain."""
    prev = prev_result or {}
    interfaces = list(prev.get("interfaces") or [])
    host = {"name": sandbox["host"]["name"], "mac": sandbox["host"]["mac"]}
    pod = {"name": sandbox["pod_interface"]["name"], "mac": sandbox["pod_interface"]["mac"],
           "sandbox": sandbox["pod_interface"]["sandbox"]}
    interfaces += [host, pod]
    ip: dict[str, Any] = {"address": f"{sandbox['address']}/{sandbox['prefixlen']}",
                          "gateway": sandbox["gateway"], "interface": len(interfaces) - 1}
    if version == "0.4.0":
        ip = {"version": "4", **ip}
    result: dict[str, Any] = {
        "cniVersion": version,
        "interfaces": interfaces,
        "ips": [*(prev.get("ips") or []), ip],
        "routes": [*(prev.get("routes") or []), {"dst": "0.0.0.0/0", "gw": sandbox["gateway"]}],
        "dns": prev.get("dns") or dns,
    }
    return result


def check_prev_result(prev_result: dict | None, sandbox: dict) -> list[str]:
    """What in CHECK's prevResult disagrees with the attachment as the agent knows it."""
    if not prev_result:
        return ["CHECK needs prevResult"]
    problems = []
    interfaces = prev_result.get("interfaces") or []
    want = sandbox["pod_interface"]
    index = next((i for i, itf in enumerate(interfaces) if isinstance(itf, dict)
                  and itf.get("name") == want["name"] and itf.get("sandbox") == want["sandbox"]), None)
    if index is None:
        return [f"prevResult has no interface {want['name']} in {want['sandbox']}"]
    if interfaces[index].get("mac") not in (None, want["mac"]):
        problems.append(f"interface {want['name']} has MAC {want['mac']}, prevResult says {interfaces[index]['mac']}")
    address = f"{sandbox['address']}/{sandbox['prefixlen']}"
    ours = [ip.get("address") for ip in prev_result.get("ips") or [] if isinstance(ip, dict)
            and ip.get("interface") == index]
    if ours != [address]:
        problems.append(f"prevResult gives interface {want['name']} {ours or 'no address'}, the pod has {address}")
    return problems
