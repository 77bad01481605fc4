"""Desired state of the pod network: nodes, namespaces, pods and Kubernetes NetworkPolicies.

The NetworkPolicy models follow networking.k8s.io/v1 field by field (camelCase aliases), so a
manifest written for Kubernetes loads unchanged. Bad input is rejected with a message naming the
field, e.g. ``spec.ingress[0].from[1].ipBlock.except[0]: 10.0.0.0/8 is not inside cidr 10.1.0.0/16``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from enum import Enum
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bpfnet.app.objects import ObjectKind
from bpfnet.app.validation import validation_message
from bpfnet.configfile import ConfigFileError, parse_yaml
from bpfnet.errors import BpfnetError
from bpfnet.schema import STRICT, InterfaceName, NetnsName, Port, Text

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
API_VERSION = "networking.k8s.io/v1"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")
PortName = Annotated[str, Field(max_length=15)]  # IANA_SVC_NAME: at most 15 characters


class ConfigError(BpfnetError, ValueError):
    """Input that does not describe a valid state; the message names the field."""


class Protocol(str, Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def number(self) -> int:
        return {"TCP": 6, "UDP": 17, "SCTP": 132}[self.value]


def check_dns_label(value: str, what: str) -> str:
    if not _DNS_LABEL.match(value):
        raise ValueError(f"{what} {value!r} is not a DNS label (lower-case letters, digits and '-', "
                         "at most 63 characters, starting and ending with a letter or digit)")
    return value


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and not _DNS_SUBDOMAIN.match(prefix)) or not _LABEL_NAME.match(name):
            raise ValueError(f"label key {key!r} is not a valid Kubernetes label key")
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            raise ValueError(f"label {key}={value!r}: value is not a valid Kubernetes label value")
    return labels


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (as the CLI takes them) -> dict; empty text gives no labels."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"label {item!r} is not of the form key=value")
        labels[key.strip()] = value.strip()
    try:
        return check_labels(labels)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class _Strict(BaseModel):
    model_config = ConfigDict(**STRICT, populate_by_name=True, frozen=True)


# --- label selectors -----------------------------------------------------------------------------

class LabelSelectorRequirement(_Strict):
    key: Text
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[Text] = Field(default_factory=list)

    @field_validator("values", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _values_fit_operator(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs a non-empty values list")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


class LabelSelector(_Strict):
    """An empty selector matches everything; all terms are ANDed."""

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list,
                                                              alias="matchExpressions")

    @field_validator("match_labels", mode="before")
    @classmethod
    def _no_labels(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("match_expressions", mode="before")
    @classmethod
    def _no_expressions(cls, value: Any) -> Any:
        return [] if value is None else value

    def matches(self, labels: dict[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels.items())
                and all(req.matches(labels) for req in self.match_expressions))


def _selector_or_empty(value: Any) -> Any:
    return {} if value is None else value


# --- NetworkPolicy (networking.k8s.io/v1) --------------------------------------------------------

class IPBlock(_Strict):
    cidr: IPv4Network
    except_: list[IPv4Network] = Field(default_factory=list, alias="except")

    @field_validator("cidr", "except_", mode="before")
    @classmethod
    def _parse_cidrs(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, list):
            return [_ipv4_network(v) for v in value]
        return _ipv4_network(value)

    @model_validator(mode="after")
    def _except_inside_cidr(self) -> IPBlock:
        for i, excluded in enumerate(self.except_):
            if not excluded.subnet_of(self.cidr) or excluded == self.cidr:
                raise ValueError(f"except[{i}]: {excluded} is not a strict subset of cidr {self.cidr}")
        return self

    def contains(self, address: IPv4Address) -> bool:
        return address in self.cidr and not any(address in e for e in self.except_)


def _ipv4_network(value: Any) -> IPv4Network:
    try:
        network = ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR") from None
    if network.version != 4:
        raise ValueError(f"{value}: only IPv4 CIDRs are supported")
    return network


class NetworkPolicyPeer(_Strict):
    pod_selector: LabelSelector | None = Field(None, alias="podSelector")
    namespace_selector: LabelSelector | None = Field(None, alias="namespaceSelector")
    ip_block: IPBlock | None = Field(None, alias="ipBlock")

    @model_validator(mode="after")
    def _one_kind(self) -> NetworkPolicyPeer:
        has_selector = self.pod_selector is not None or self.namespace_selector is not None
        if self.ip_block is not None and has_selector:
            raise ValueError("ipBlock cannot be combined with podSelector or namespaceSelector")
        if self.ip_block is None and not has_selector:
            raise ValueError("a peer needs podSelector, namespaceSelector or ipBlock")
        return self


class NetworkPolicyPort(_Strict):
    protocol: Protocol = Protocol.TCP
    port: int | str | None = None
    end_port: Port | None = Field(None, alias="endPort")

    @field_validator("protocol", mode="before")
    @classmethod
    def _default_protocol(cls, value: Any) -> Any:
        return Protocol.TCP if value is None else value

    @field_validator("port")
    @classmethod
    def _valid_port(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 65535:
            raise ValueError(f"port {value} is not in 1..65535")
        if isinstance(value, str) and (not _PORT_NAME.match(value) or value.isdigit()
                                       or "--" in value):
            raise ValueError(f"port name {value!r} is not a valid port name (IANA_SVC_NAME)")
        return value

    @model_validator(mode="after")
    def _valid_end_port(self) -> NetworkPolicyPort:
        if self.end_port is None:
            return self
        if not isinstance(self.port, int):
            raise ValueError("endPort needs a numeric port")
        if not self.port <= self.end_port <= 65535:
            raise ValueError(f"endPort {self.end_port} must be within {self.port}..65535")
        return self


def _none_is_empty_list(value: Any) -> Any:
    return [] if value is None else value


class NetworkPolicyIngressRule(_Strict):
    ports: list[NetworkPolicyPort] = Field(default_factory=list)
    from_: list[NetworkPolicyPeer] = Field(default_factory=list, alias="from")

    _lists = field_validator("ports", "from_", mode="before")(_none_is_empty_list)

    @property
    def peers(self) -> list[NetworkPolicyPeer]:
        return self.from_


class NetworkPolicyEgressRule(_Strict):
    ports: list[NetworkPolicyPort] = Field(default_factory=list)
    to: list[NetworkPolicyPeer] = Field(default_factory=list)

    _lists = field_validator("ports", "to", mode="before")(_none_is_empty_list)

    @property
    def peers(self) -> list[NetworkPolicyPeer]:
        return self.to


PolicyType = Literal["Ingress", "Egress"]


class NetworkPolicySpec(_Strict):
    pod_selector: LabelSelector = Field(alias="podSelector")
    ingress: list[NetworkPolicyIngressRule] = Field(default_factory=list)
    egress: list[NetworkPolicyEgressRule] = Field(default_factory=list)
    policy_types: list[PolicyType] | None = Field(None, alias="policyTypes")

    _selector = field_validator("pod_selector", mode="before")(_selector_or_empty)
    _lists = field_validator("ingress", "egress", mode="before")(_none_is_empty_list)

    @property
    def effective_policy_types(self) -> frozenset[str]:
        """Kubernetes default: Ingress always, Egress when the policy has egress rules."""
        if self.policy_types:
            return frozenset(self.policy_types)
        return frozenset(["Ingress", "Egress"] if self.egress else ["Ingress"])


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)

    name: str
    namespace: str = "default"

    _name = field_validator("name")(lambda v: check_dns_label(v, "metadata.name"))
    _ns = field_validator("namespace")(lambda v: check_dns_label(v, "metadata.namespace"))


class NetworkPolicy(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True, frozen=True)

    api_version: Literal["networking.k8s.io/v1"] = Field("networking.k8s.io/v1", alias="apiVersion")
    kind: Literal["NetworkPolicy"] = "NetworkPolicy"
    metadata: ObjectMeta
    spec: NetworkPolicySpec

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    def selects(self, pod: Pod) -> bool:
        return pod.namespace == self.namespace and self.spec.pod_selector.matches(pod.labels)

    def dump(self) -> dict:
        """The manifest as kubectl would show it: camelCase, no nulls, no empty lists."""
        return _without_empty_lists(self.model_dump(mode="json", by_alias=True, exclude_none=True))


def _without_empty_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_empty_lists(v) for k, v in value.items() if v != []}
    if isinstance(value, list):
        return [_without_empty_lists(v) for v in value]
    return value


# --- nodes, namespaces, pods ---------------------------------------------------------------------

class ContainerPort(_Strict):
    """A port a pod serves; `name` is what NetworkPolicy named ports refer to."""

    name: PortName | None = None
    port: Port
    protocol: Protocol = Protocol.TCP

    @classmethod
    def serve(cls, port: int, protocol: Protocol) -> ContainerPort:
        """The Kubernetes netpol model's naming: serve-80-tcp."""
        return cls(name=f"serve-{port}-{protocol.value.lower()}", port=port, protocol=protocol)


def parse_serve(text: str) -> list[ContainerPort]:
    """`80/tcp,81/udp` -> container ports named serve-80-tcp, serve-81-udp."""
    ports = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        number, _, proto = item.partition("/")
        try:
            protocol = Protocol((proto or "tcp").upper())
            if protocol is Protocol.SCTP:
                raise ValueError
            ports.append(ContainerPort.serve(int(number), protocol))
        except (ValueError, ValidationError):
            raise ConfigError(f"--serve item {item!r} is not PORT/tcp or PORT/udp "
                              "with PORT in 1..65535") from None
    return ports


class Node(_Strict):
    """A host; `netns` None means the root network namespace."""

    name: str
    pod_cidr: IPv4Network
    netns: NetnsName | None = None
    underlay_address: IPv4Address | None = None  # on the underlay segment; allocated when None

    _name = field_validator("name")(lambda v: check_dns_label(v, "node name"))

    @field_validator("pod_cidr", mode="before")
    @classmethod
    def _cidr(cls, value: Any) -> Any:
        network = _ipv4_network(value)
        if network.prefixlen > 29:
            raise ValueError(f"pod_cidr {network} is too small (at most /29)")
        return network

    @property
    def router_address(self) -> IPv4Address:
        """The node's own address towards its pods: the first address of the pod CIDR."""
        return self.pod_cidr.network_address + 1


class Underlay(_Strict):
    """The L2 segment joining the nodes (a bridge in its own namespace) that VXLAN runs over; it
    exists while there are at least two nodes."""

    cidr: IPv4Network = IPv4Network("192.168.255.0/24")
    fabric_netns: NetnsName = "bpfnet-fabric"

    @field_validator("cidr", mode="before")
    @classmethod
    def _cidr(cls, value: Any) -> Any:
        network = _ipv4_network(value)
        if network.prefixlen > 30:
            raise ValueError(f"underlay cidr {network} is too small (at most /30)")
        return network


class Namespace(_Strict):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)

    _name = field_validator("name")(lambda v: check_dns_label(v, "namespace name"))
    _labels = field_validator("labels")(check_labels)

    @property
    def effective_labels(self) -> dict[str, str]:
        """The labels selectors see: the user's plus kubernetes.io/metadata.name=NAME."""
        return {**self.labels, NAMESPACE_NAME_LABEL: self.name}


_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$")  # CNI spec: CNI_CONTAINERID


class Sandbox(_Strict):
    """A network namespace a container runtime made and passes in (CNI_NETNS): bpfnet plugs the
    pod's veth into it (named `ifname`, CNI_IFNAME) and, on removal, takes out only that veth;
    the namespace itself and its processes belong to the runtime. `container_id` and `ifname`
    identify the attachment, as CNI does."""

    container_id: str = Field(description="the runtime's container id (CNI_CONTAINERID)")
    netns: str = Field(description="absolute path of the namespace, e.g. /proc/PID/ns/net or /run/netns/X")
    ifname: InterfaceName = Field("eth0", description="the pod-side interface (CNI_IFNAME)")
    network: str | None = Field(None, max_length=253, description="the CNI network name, if any")

    @field_validator("container_id")
    @classmethod
    def _container_id(cls, value: str) -> str:
        if not _CONTAINER_ID.match(value):
            raise ValueError(f"container id {value[:80]!r} is not valid (1-255 of A-Z a-z 0-9 _ . -, "
                             "starting with a letter or digit)")
        return value

    @field_validator("netns")
    @classmethod
    def _netns(cls, value: str) -> str:
        parts = value.split("/")
        if (not value.startswith("/") or len(value) > 4096 or "\0" in value
                or any(p in (".", "..") for p in parts) or value.endswith("/")):
            raise ValueError(f"netns {value[:80]!r} is not an absolute path of a network namespace")
        return value


class Pod(_Strict):
    namespace: str
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    node: str
    ports: list[ContainerPort] = Field(default_factory=list)
    address: IPv4Address | None = None
    sandbox: Sandbox | None = Field(None, description="the runtime's namespace (CNI); None: bpfnet "
                                    "creates and removes the pod's namespace itself")

    @property
    def ip(self) -> IPv4Address:
        """The pod's address; a state assigns one to every pod that has none."""
        if self.address is None:
            raise ConfigError(f"pod {self.namespace}/{self.name} has no address yet")
        return self.address

    _ns = field_validator("namespace")(lambda v: check_dns_label(v, "pod namespace"))
    _name = field_validator("name")(lambda v: check_dns_label(v, "pod name"))
    _labels = field_validator("labels")(check_labels)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def named_port(self, name: str, protocol: Protocol) -> int | None:
        for port in self.ports:
            if port.name == name and port.protocol == protocol:
                return port.port
        return None


class ServiceBackend(_Strict):
    """One explicit backend: a pod of the service's namespace and the port it serves on."""

    pod: str = Field(description="pod name in the service's namespace")
    port: int | str = Field(description="port number, or a named container port of the pod")

    _pod = field_validator("pod")(lambda v: check_dns_label(v, "backend pod"))


class Service(_Strict):
    """A ClusterIP-like service: connect()/sendmsg() to `address:port/protocol` from any pod reach
    a backend, chosen by the socket hooks (explicit `backends`, or pods matching `selector`)."""

    namespace: str
    name: str
    address: IPv4Address
    port: Port
    protocol: Literal["TCP", "UDP"] = "TCP"
    backends: list[ServiceBackend] = Field(default_factory=list)
    selector: dict[str, str] | None = Field(None, description="pod labels; backends follow the pods")
    target_port: int | str | None = Field(None, description="with selector: number or named port")
    affinity: Literal["none", "client-ip"] = "none"

    _ns = field_validator("namespace")(lambda v: check_dns_label(v, "service namespace"))
    _name = field_validator("name")(lambda v: check_dns_label(v, "service name"))
    _selector = field_validator("selector")(lambda v: v if v is None else check_labels(v))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def vip(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol.lower()}"

    @model_validator(mode="after")
    def _backends_or_selector(self) -> Service:
        if self.selector is not None and self.backends:
            raise ValueError(f"service {self.key}: give backends or a selector, not both")
        if self.selector is not None and self.target_port is None:
            raise ValueError(f"service {self.key}: a selector needs target_port")
        if self.selector is None and self.target_port is not None:
            raise ValueError(f"service {self.key}: target_port goes with a selector")
        if isinstance(self.target_port, int) and not 1 <= self.target_port <= 65535:
            raise ValueError(f"service {self.key}: target_port {self.target_port} is not in 1..65535")
        if isinstance(self.target_port, str) and not _PORT_NAME.match(self.target_port):
            raise ValueError(f"service {self.key}: target_port {self.target_port[:80]!r} is not a port name")
        for backend in self.backends:
            if isinstance(backend.port, int) and not 1 <= backend.port <= 65535:
                raise ValueError(f"service {self.key}: backend {backend.pod} port {backend.port} "
                                 "is not in 1..65535")
            if isinstance(backend.port, str) and not _PORT_NAME.match(backend.port):
                raise ValueError(f"service {self.key}: backend {backend.pod} port {backend.port[:80]!r} "
                                 "is not a port name")
        return self


# the per-object API: one object per node, namespace, pod, policy and service
PODNET_OBJECTS = (
    ObjectKind("nodes", "nodes", lambda node: node.name),
    ObjectKind("namespaces", "namespaces", lambda namespace: namespace.name),
    ObjectKind("pods", "pods", lambda pod: pod.key),
    ObjectKind("policies", "policies", lambda policy: policy.key),
    ObjectKind("services", "services", lambda service: service.key),
)


class PodnetState(_Strict):
    nodes: list[Node] = Field(default_factory=list)
    namespaces: list[Namespace] = Field(default_factory=list)
    pods: list[Pod] = Field(default_factory=list)
    policies: list[NetworkPolicy] = Field(default_factory=list)
    services: list[Service] = Field(default_factory=list)
    underlay: Underlay = Field(default_factory=Underlay)

    @model_validator(mode="after")
    def _consistent(self) -> PodnetState:
        _unique([n.name for n in self.nodes], "node")
        _unique([n.name for n in self.namespaces], "namespace")
        _unique([p.key for p in self.pods], "pod")
        _unique([p.key for p in self.policies], "policy")
        for i, a in enumerate(self.nodes):
            for b in self.nodes[i + 1:]:
                if a.pod_cidr.overlaps(b.pod_cidr):
                    raise ValueError(f"node {a.name} pod_cidr {a.pod_cidr} overlaps node {b.name} "
                                     f"pod_cidr {b.pod_cidr}")
        _check_underlay(self.underlay, self.nodes)
        nodes = {n.name: n for n in self.nodes}
        namespaces = {n.name for n in self.namespaces}
        seen: dict[IPv4Address, str] = {}
        attachments: dict[tuple[str, str], str] = {}
        for pod in self.pods:
            if pod.sandbox is not None:
                attachment = (pod.sandbox.container_id, pod.sandbox.ifname)
                if attachment in attachments:
                    raise ValueError(f"pod {pod.key}: container {attachment[0]} interface {attachment[1]} "
                                     f"is already pod {attachments[attachment]}")
                attachments[attachment] = pod.key
            if pod.namespace not in namespaces:
                raise ValueError(f"pod {pod.key}: namespace {pod.namespace!r} does not exist")
            if pod.node not in nodes:
                raise ValueError(f"pod {pod.key}: node {pod.node!r} does not exist")
            if pod.address is None:
                continue
            node = nodes[pod.node]
            if pod.address not in usable_addresses(node):
                raise ValueError(f"pod {pod.key}: address {pod.address} is not a pod address of "
                                 f"node {node.name} ({node.pod_cidr})")
            if pod.address in seen:
                raise ValueError(f"pod {pod.key}: address {pod.address} is already used by "
                                 f"{seen[pod.address]}")
            seen[pod.address] = pod.key
        for policy in self.policies:
            if policy.namespace not in namespaces:
                raise ValueError(f"policy {policy.key}: namespace {policy.namespace!r} does not exist")
        return self

    @model_validator(mode="after")
    def _services_consistent(self) -> PodnetState:
        _unique([svc.key for svc in self.services], "service")
        _unique([svc.vip for svc in self.services], "service address")
        namespaces = {n.name for n in self.namespaces}
        pods = {p.key for p in self.pods}
        for svc in self.services:
            if svc.namespace not in namespaces:
                raise ValueError(f"service {svc.key}: namespace {svc.namespace!r} does not exist")
            for backend in svc.backends:
                if f"{svc.namespace}/{backend.pod}" not in pods:
                    raise ValueError(f"service {svc.key}: backend pod {svc.namespace}/{backend.pod} "
                                     "does not exist")
        return self

    def namespace(self, name: str) -> Namespace:
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        raise ConfigError(f"namespace {name!r} does not exist")

    def pod(self, key: str) -> Pod:
        for pod in self.pods:
            if pod.key == key:
                return pod
        raise ConfigError(f"pod {key!r} does not exist")

    def dump(self) -> dict:
        """The state as the agent stores it: JSON, Kubernetes field names, no nulls."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def attached(self, container_id: str, ifname: str) -> Pod | None:
        """The pod plugged into `container_id`'s namespace as `ifname` (a CNI attachment), if any."""
        for pod in self.pods:
            if pod.sandbox is not None and (pod.sandbox.container_id, pod.sandbox.ifname) == (container_id, ifname):
                return pod
        return None

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(f"node {name!r} does not exist")

    def namespace_labels(self, name: str) -> dict[str, str]:
        return self.namespace(name).effective_labels

    def with_addresses(self) -> PodnetState:
        """Give every pod without an address the lowest free one of its node's pod CIDR, and every
        node without an underlay address the lowest free one of the underlay CIDR."""
        taken = {n.underlay_address for n in self.nodes}
        nodes = []
        for node in self.nodes:
            if node.underlay_address is None:
                free = next((a for a in self.underlay.cidr.hosts() if a not in taken), None)
                if free is None:
                    raise ConfigError(f"node {node.name}: no free underlay address left in "
                                      f"{self.underlay.cidr}")
                taken.add(free)
                node = node.model_copy(update={"underlay_address": free})
            nodes.append(node)
        return self.model_copy(update={"nodes": nodes})._with_pod_addresses()

    def _with_pod_addresses(self) -> PodnetState:
        used = {p.address for p in self.pods if p.address is not None}
        pods = []
        for pod in self.pods:
            if pod.address is None:
                node = self.node(pod.node)
                free = next((a for a in usable_addresses(node) if a not in used), None)
                if free is None:
                    raise ConfigError(f"pod {pod.key}: node {node.name} has no free address "
                                      f"left in {node.pod_cidr}")
                used.add(free)
                pod = pod.model_copy(update={"address": free})
            pods.append(pod)
        return self.model_copy(update={"pods": pods})


def _check_underlay(underlay: Underlay, nodes: list[Node]) -> None:
    seen: dict[IPv4Address, str] = {}
    for node in nodes:
        if node.pod_cidr.overlaps(underlay.cidr):
            raise ValueError(f"node {node.name} pod_cidr {node.pod_cidr} overlaps the underlay "
                             f"cidr {underlay.cidr}")
        address = node.underlay_address
        if address is None:
            continue
        if address not in underlay.cidr or address in (underlay.cidr.network_address,
                                                       underlay.cidr.broadcast_address):
            raise ValueError(f"node {node.name}: underlay address {address} is not a host address "
                             f"of the underlay cidr {underlay.cidr}")
        if address in seen:
            raise ValueError(f"node {node.name}: underlay address {address} is already used by "
                             f"node {seen[address]}")
        seen[address] = node.name


def usable_addresses(node: Node) -> Iterable[IPv4Address]:
    """Pod addresses of a node: the CIDR minus network, router (first) and broadcast addresses."""
    network = node.pod_cidr
    first = int(network.network_address) + 2
    last = int(network.broadcast_address) - 1
    return (IPv4Address(a) for a in range(first, last + 1))


def _unique(names: list[str], what: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name!r} is defined twice")
        seen.add(name)


# --- reading policies and reporting errors -------------------------------------------------------

def load_policies(text: str, source: str = "input") -> list[NetworkPolicy]:
    """NetworkPolicies from YAML (one or many documents) or JSON; `kind: List` is unwrapped."""
    try:
        documents = [d for d in parse_yaml(text, source, all_documents=True) if d is not None]
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    items: list[Any] = []
    for doc in documents:
        if isinstance(doc, dict) and doc.get("kind") in ("List", "NetworkPolicyList"):
            items.extend(doc.get("items") or [])
        else:
            items.append(doc)
    policies = []
    for i, item in enumerate(items):
        where = f"{source}: document {i + 1}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a NetworkPolicy mapping, got {type(item).__name__}")
        if item.get("kind") != "NetworkPolicy":
            raise ConfigError(f"{where}: kind is {item.get('kind')!r}, expected 'NetworkPolicy'")
        name = (item.get("metadata") or {}).get("name", "?")
        try:
            policies.append(NetworkPolicy.model_validate(item))
        except ValidationError as exc:
            raise ConfigError(f"{where} ({name}): {validation_message(exc, bare_root=True)}") from None
    return policies
