"""Kubernetes objects in and out of the pod network: `bpfnet apply -f` and `bpfnet get`.

The objects users already write — Node, Namespace, Pod, Service, EndpointSlice, NetworkPolicy,
several documents in one file or a `List` — become the podnet state, and the state can be shown
as those objects again. Decoding is strict as `kubectl apply` (server-side field validation
Strict) is: an unknown kind or field is an error naming it by its path (`spec.containers[0].imag`);
fields of the Kubernetes schema that mean nothing to a pod network (images, commands, resources...)
are accepted and left aside. bpfnet specifics travel as annotations (`bpfnet.io/netns` on a Node).

What maps to what:
- Node: metadata.name, spec.podCIDR (+ annotations bpfnet.io/netns, bpfnet.io/underlay-address)
- Namespace: metadata.name, metadata.labels
- Pod: metadata (name, namespace, labels), spec.nodeName, spec.containers[].ports, status.podIP
- Service (type ClusterIP): spec.clusterIP, one bpfnet service per entry of spec.ports (named
  NAME, or NAME-PORTNAME when there are several), spec.selector + targetPort, or the pods of its
  EndpointSlices when it has no selector; sessionAffinity ClientIP
- EndpointSlice (discovery.k8s.io/v1): endpoints[].targetRef (kind Pod) of the service named by
  the label kubernetes.io/service-name
- NetworkPolicy (networking.k8s.io/v1): as it is
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bpfnet.configfile import parse_yaml
from bpfnet.errors import BpfnetError
from bpfnet.podnet.config import (
    ContainerPort,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    PodnetState,
    Service,
    ServiceBackend,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NETNS_ANNOTATION = "bpfnet.io/netns"
UNDERLAY_ANNOTATION = "bpfnet.io/underlay-address"
KINDS = {"Node": "v1", "Namespace": "v1", "Pod": "v1", "Service": "v1",
         "EndpointSlice": "discovery.k8s.io/v1", "NetworkPolicy": "networking.k8s.io/v1"}
# what `bpfnet get` accepts, as kubectl does: plural, singular and short names
RESOURCES = {"nodes": "Node", "node": "Node", "no": "Node",
             "namespaces": "Namespace", "namespace": "Namespace", "ns": "Namespace",
             "pods": "Pod", "pod": "Pod", "po": "Pod",
             "services": "Service", "service": "Service", "svc": "Service",
             "networkpolicies": "NetworkPolicy", "networkpolicy": "NetworkPolicy", "netpol": "NetworkPolicy"}


class KubeError(BpfnetError, ValueError):
    """A document that is not a Kubernetes object bpfnet can take; the message names it and the field."""


class _Object(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Lenient(BaseModel):
    """Parts of the Kubernetes schema that mean nothing to a pod network: kept out of the way."""

    model_config = ConfigDict(extra="allow")


class Meta(_Object):
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # written by the API server; accepted so that `kubectl get -o yaml` output applies as it is
    uid: str | None = None
    resource_version: str | None = Field(None, alias="resourceVersion")
    generation: int | None = None
    creation_timestamp: str | None = Field(None, alias="creationTimestamp")
    managed_fields: list[Any] | None = Field(None, alias="managedFields")
    owner_references: list[Any] | None = Field(None, alias="ownerReferences")
    finalizers: list[str] | None = None


class _Kind(_Object):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: Meta


# --- Node, Namespace ----------------------------------------------------------------------------

class NodeSpec(_Object):
    pod_cidr: str | None = Field(None, alias="podCIDR")
    pod_cidrs: list[str] | None = Field(None, alias="podCIDRs")
    provider_id: str | None = Field(None, alias="providerID")
    unschedulable: bool | None = None
    taints: list[Any] | None = None


class KubeNode(_Kind):
    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: _Lenient | None = None


class KubeNamespace(_Kind):
    spec: _Lenient | None = None
    status: _Lenient | None = None


# --- Pod ----------------------------------------------------------------------------------------

class KubeContainerPort(_Object):
    container_port: int = Field(alias="containerPort")
    name: str | None = None
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    host_port: int | None = Field(None, alias="hostPort")
    host_ip: str | None = Field(None, alias="hostIP")


class Container(_Object):
    name: str
    image: str | None = None
    command: list[str] | None = None
    args: list[str] | None = None
    working_dir: str | None = Field(None, alias="workingDir")
    ports: list[KubeContainerPort] = Field(default_factory=list)
    env: list[Any] | None = None
    env_from: list[Any] | None = Field(None, alias="envFrom")
    resources: _Lenient | None = None
    volume_mounts: list[Any] | None = Field(None, alias="volumeMounts")
    liveness_probe: _Lenient | None = Field(None, alias="livenessProbe")
    readiness_probe: _Lenient | None = Field(None, alias="readinessProbe")
    startup_probe: _Lenient | None = Field(None, alias="startupProbe")
    image_pull_policy: str | None = Field(None, alias="imagePullPolicy")
    security_context: _Lenient | None = Field(None, alias="securityContext")
    stdin: bool | None = None
    tty: bool | None = None


class PodSpec(_Object):
    containers: list[Container] = Field(min_length=1)
    node_name: str | None = Field(None, alias="nodeName")
    init_containers: list[Any] | None = Field(None, alias="initContainers")
    volumes: list[Any] | None = None
    restart_policy: str | None = Field(None, alias="restartPolicy")
    service_account_name: str | None = Field(None, alias="serviceAccountName")
    termination_grace_period_seconds: int | None = Field(None, alias="terminationGracePeriodSeconds")
    dns_policy: str | None = Field(None, alias="dnsPolicy")
    security_context: _Lenient | None = Field(None, alias="securityContext")
    node_selector: dict[str, str] | None = Field(None, alias="nodeSelector")
    tolerations: list[Any] | None = None
    affinity: _Lenient | None = None
    host_network: bool | None = Field(None, alias="hostNetwork")


class PodStatus(_Lenient):
    pod_ip: str | None = Field(None, alias="podIP")


class KubePod(_Kind):
    spec: PodSpec
    status: PodStatus | None = None


# --- Service, EndpointSlice --------------------------------------------------------------------

class ServicePort(_Object):
    port: int
    name: str | None = None
    protocol: Literal["TCP", "UDP"] = "TCP"
    target_port: int | str | None = Field(None, alias="targetPort")
    app_protocol: str | None = Field(None, alias="appProtocol")


class ServiceSpec(_Object):
    type: Literal["ClusterIP"] = "ClusterIP"
    cluster_ip: IPv4Address = Field(alias="clusterIP")
    cluster_ips: list[str] | None = Field(None, alias="clusterIPs")
    ports: list[ServicePort] = Field(min_length=1)
    selector: dict[str, str] | None = None
    session_affinity: Literal["None", "ClientIP"] = Field("None", alias="sessionAffinity")
    ip_families: list[str] | None = Field(None, alias="ipFamilies")
    ip_family_policy: str | None = Field(None, alias="ipFamilyPolicy")
    internal_traffic_policy: str | None = Field(None, alias="internalTrafficPolicy")


class KubeService(_Kind):
    spec: ServiceSpec
    status: _Lenient | None = None


class ObjectReference(_Object):
    kind: Literal["Pod"] = "Pod"
    name: str
    namespace: str | None = None
    uid: str | None = None


class Endpoint(_Object):
    addresses: list[str] = Field(default_factory=list)
    target_ref: ObjectReference | None = Field(None, alias="targetRef")
    conditions: _Lenient | None = None
    node_name: str | None = Field(None, alias="nodeName")


class EndpointPort(_Object):
    port: int | None = None  # bpfnet: absent when the backends use a named container port (`name`)
    name: str | None = None
    protocol: Literal["TCP", "UDP"] = "TCP"
    app_protocol: str | None = Field(None, alias="appProtocol")


class KubeEndpointSlice(_Kind):
    address_type: Literal["IPv4"] = Field(alias="addressType")
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] = Field(default_factory=list)


MODELS: dict[str, type[_Kind]] = {"Node": KubeNode, "Namespace": KubeNamespace, "Pod": KubePod,
                                  "Service": KubeService, "EndpointSlice": KubeEndpointSlice}


def kube_path(loc: Iterable[Any]) -> str:
    """pydantic's location as kubectl names fields: ('spec', 'containers', 0, 'name') ->
    spec.containers[0].name."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(err: ValidationError, what: str) -> str:
    parts = []
    for e in err.errors(include_url=False)[:5]:
        path = kube_path(e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f'unknown field "{path}"')
        elif e["type"] == "missing":
            parts.append(f"{path}: Required value")
        else:
            message = e["msg"].removeprefix("Value error, ")
            shown = repr(e.get("input"))[:80]
            parts.append(f"{path}: Invalid value: {shown}: {message}" if path else message)
    return f"{what}: " + "; ".join(parts)


# --- reading documents ---------------------------------------------------------------------------

def documents(docs: Iterable[Any], source: str) -> list[tuple[str, dict]]:
    """Every object of YAML/JSON documents (a `List` unfolded) with where it comes from."""
    out: list[tuple[str, dict]] = []
    for number, doc in enumerate(docs, start=1):
        where = f"{source}: document {number}"
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise KubeError(f"{where}: not a Kubernetes object (a {type(doc).__name__})")
        if doc.get("kind") == "List" or str(doc.get("kind", "")).endswith("List"):
            items = doc.get("items")
            if not isinstance(items, list):
                raise KubeError(f"{where}: a List needs items")
            out += [(f"{where} item {i}", item) for i, item in enumerate(items)]
        else:
            out.append((where, doc))
    return out


def load_objects(text: str, source: str) -> list[tuple[str, _Kind | NetworkPolicy]]:
    """Every object of a YAML/JSON text, parsed; ConfigFileError or KubeError naming what is wrong."""
    return [(where, parse_object(where, doc))
            for where, doc in documents(parse_yaml(text, source, all_documents=True), source)]


def _describe(where: str, doc: dict) -> str:
    meta = doc["metadata"] if isinstance(doc.get("metadata"), dict) else {}
    name = "/".join(str(p) for p in (meta.get("namespace"), meta.get("name")) if p)
    return f"{where} ({doc.get('kind', '?')}{' ' + name if name else ''})"


def parse_object(where: str, doc: dict) -> _Kind | NetworkPolicy:
    """One document as its model, or KubeError naming the document, kind, name and field."""
    what = _describe(where, doc)
    kind = doc.get("kind")
    if kind not in KINDS:
        known = ", ".join(KINDS)
        raise KubeError(f"{what}: bpfnet does not take kind {str(kind)[:60]!r} (kinds: {known}, List)")
    if doc.get("apiVersion") != KINDS[kind]:
        raise KubeError(f"{what}: apiVersion must be {KINDS[kind]}, not {str(doc.get('apiVersion'))[:60]!r}")
    try:
        if kind == "NetworkPolicy":
            return NetworkPolicy.model_validate(doc)
        return MODELS[kind].model_validate(doc)
    except ValidationError as err:
        raise KubeError(_explain(err, what)) from None


# --- objects -> state ----------------------------------------------------------------------------

def merge(state: PodnetState, objects: list[tuple[str, _Kind | NetworkPolicy]]) -> tuple[PodnetState, list[str]]:
    """`state` with the objects created or replaced (by kind and name); returns the new state and
    what happened to each object ('pod/shop/db created'). KubeError if the result does not hold
    together (the message names the object)."""
    nodes = {n.name: n for n in state.nodes}
    namespaces = {n.name: n for n in state.namespaces}
    pods = {p.key: p for p in state.pods}
    policies = {p.key: p for p in state.policies}
    services = {s.key: s for s in state.services}
    slices: list[tuple[str, KubeEndpointSlice]] = []
    kube_services: list[tuple[str, KubeService]] = []
    changes: list[str] = []

    def put(table: dict, key: str, value: Any, kind: str) -> None:
        old = table.get(key)
        changes.append(f"{kind}/{key} " + ("created" if old is None else "unchanged" if old == value else "configured"))
        table[key] = value

    try:
        for where, obj in objects:
            if isinstance(obj, NetworkPolicy):
                put(policies, obj.key, obj, "networkpolicy")
            elif isinstance(obj, KubeNode):
                put(nodes, obj.metadata.name, _node(obj, nodes.get(obj.metadata.name)), "node")
            elif isinstance(obj, KubeNamespace):
                put(namespaces, obj.metadata.name, Namespace(name=obj.metadata.name, labels=obj.metadata.labels),
                    "namespace")
            elif isinstance(obj, KubePod):
                pod = _pod(obj, list(nodes), pods.get(f"{obj.metadata.namespace or 'default'}/{obj.metadata.name}"))
                put(pods, pod.key, pod, "pod")
            elif isinstance(obj, KubeService):
                kube_services.append((where, obj))
            elif isinstance(obj, KubeEndpointSlice):
                slices.append((where, obj))
        for where, svc in kube_services:
            for service in _services(where, svc, slices):
                put(services, service.key, service, "service")
        new = PodnetState.model_validate({
            **state.model_dump(mode="json", by_alias=True, exclude_none=True),
            "nodes": [n.model_dump(mode="json") for n in nodes.values()],
            "namespaces": [n.model_dump(mode="json") for n in namespaces.values()],
            "pods": [p.model_dump(mode="json") for p in pods.values()],
            "policies": [p.model_dump(mode="json", by_alias=True, exclude_none=True) for p in policies.values()],
            "services": [s.model_dump(mode="json") for s in services.values()]})
    except ValidationError as err:
        raise KubeError(_explain(err, "the objects together")) from None
    return new, changes


def _validated(model: type[BaseModel], data: dict, what: str, paths: dict[str, str]) -> Any:
    """`model` from `data` built out of a Kubernetes object; errors name the object's own fields
    (`paths`: bpfnet field -> Kubernetes path)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        e = err.errors(include_url=False)[0]
        head = str(e["loc"][0]) if e["loc"] else ""
        path = paths.get(head, head)
        message = e["msg"].removeprefix("Value error, ")
        shown = repr(e.get("input"))[:80]
        raise KubeError(f"{what}: {path}: Invalid value: {shown}: {message}" if path else f"{what}: {message}") \
            from None


def _node(obj: KubeNode, old: Node | None) -> Node:
    cidr = obj.spec.pod_cidr or next(iter(obj.spec.pod_cidrs or []), None)
    if cidr is None:
        raise KubeError(f"node {obj.metadata.name}: spec.podCIDR: Required value (the node's pod addresses)")
    underlay = obj.metadata.annotations.get(UNDERLAY_ANNOTATION) or (old.underlay_address if old else None)
    return _validated(Node, {"name": obj.metadata.name, "pod_cidr": cidr,
                             "netns": obj.metadata.annotations.get(NETNS_ANNOTATION),
                             "underlay_address": str(underlay) if underlay else None},
                      f"Node {obj.metadata.name}",
                      {"name": "metadata.name", "pod_cidr": "spec.podCIDR",
                       "netns": f"metadata.annotations[{NETNS_ANNOTATION}]",
                       "underlay_address": f"metadata.annotations[{UNDERLAY_ANNOTATION}]"})


def _pod(obj: KubePod, nodes: list[str], old: Pod | None) -> Pod:
    namespace = obj.metadata.namespace or "default"
    node = obj.spec.node_name or (old.node if old else None) or (nodes[0] if nodes else None)
    if node is None:
        raise KubeError(f"pod {namespace}/{obj.metadata.name}: spec.nodeName: Required value (no node exists yet)")
    ports = [_validated(ContainerPort, {"name": p.name, "port": p.container_port, "protocol": p.protocol},
                        f"Pod {namespace}/{obj.metadata.name}",
                        {"name": f"spec.containers[{i}].ports[{j}].name",
                         "port": f"spec.containers[{i}].ports[{j}].containerPort",
                         "protocol": f"spec.containers[{i}].ports[{j}].protocol"})
             for i, c in enumerate(obj.spec.containers) for j, p in enumerate(c.ports)]
    address = (obj.status.pod_ip if obj.status and obj.status.pod_ip else None) or (old.address if old else None)
    return _validated(Pod, {"namespace": namespace, "name": obj.metadata.name, "labels": obj.metadata.labels,
                            "node": node, "ports": [p.model_dump(mode="json") for p in ports],
                            "address": str(address) if address else None},
                      f"Pod {namespace}/{obj.metadata.name}",
                      {"namespace": "metadata.namespace", "name": "metadata.name", "labels": "metadata.labels",
                       "node": "spec.nodeName", "ports": "spec.containers[].ports", "address": "status.podIP"})


def _services(where: str, svc: KubeService, slices: list[tuple[str, KubeEndpointSlice]]) -> list[Service]:
    namespace = svc.metadata.namespace or "default"
    several = len(svc.spec.ports) > 1
    out = []
    for index, port in enumerate(svc.spec.ports):
        if several and not port.name:
            raise KubeError(f"{where} (Service {namespace}/{svc.metadata.name}): spec.ports[{index}].name: "
                            "Required value (a Service with several ports names each)")
        name = f"{svc.metadata.name}-{port.name}" if several else svc.metadata.name
        common = {"namespace": namespace, "name": name, "address": str(svc.spec.cluster_ip), "port": port.port,
                  "protocol": port.protocol,
                  "affinity": "client-ip" if svc.spec.session_affinity == "ClientIP" else "none"}
        what = f"{where} (Service {namespace}/{svc.metadata.name})"
        paths = {"name": "metadata.name", "namespace": "metadata.namespace", "address": "spec.clusterIP",
                 "port": f"spec.ports[{index}].port", "protocol": f"spec.ports[{index}].protocol",
                 "target_port": f"spec.ports[{index}].targetPort", "selector": "spec.selector",
                 "backends": "EndpointSlice endpoints"}
        if svc.spec.selector is not None:
            out.append(_validated(Service, {**common, "selector": svc.spec.selector,
                                            "target_port": port.target_port or port.port}, what, paths))
            continue
        backends = []
        for _slice_where, piece in slices:
            if (piece.metadata.labels.get(SERVICE_NAME_LABEL) != svc.metadata.name
                    or (piece.metadata.namespace or "default") != namespace):
                continue
            slice_port = next((p.port if p.port is not None else p.name for p in piece.ports
                               if p.name == port.name or not several or p.port is None), None)
            for endpoint in piece.endpoints:
                if endpoint.target_ref is not None and slice_port is not None:
                    backends.append(ServiceBackend(pod=endpoint.target_ref.name, port=slice_port))
        out.append(_validated(Service, {**common, "backends": [b.model_dump(mode="json") for b in backends]},
                              what, paths))
    return out


# --- state -> objects ---------------------------------------------------------------------------

def _meta(name: str, namespace: str | None = None, labels: dict | None = None,
          annotations: dict | None = None) -> dict:
    meta: dict = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def to_objects(state: PodnetState, kind: str) -> list[dict]:
    """The state's objects of one kind, as Kubernetes would show them."""
    if kind == "Node":
        return [{"apiVersion": "v1", "kind": "Node",
                 "metadata": _meta(n.name, annotations={k: str(v) for k, v in (
                     (NETNS_ANNOTATION, n.netns), (UNDERLAY_ANNOTATION, n.underlay_address)) if v}),
                 "spec": {"podCIDR": str(n.pod_cidr)}} for n in state.nodes]
    if kind == "Namespace":
        return [{"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(n.name, labels=n.labels)}
                for n in state.namespaces]
    if kind == "Pod":
        return [{"apiVersion": "v1", "kind": "Pod", "metadata": _meta(p.name, p.namespace, p.labels),
                 "spec": {"nodeName": p.node, "containers": [{"name": p.name, "ports": [
                     {k: v for k, v in (("name", port.name), ("containerPort", port.port),
                                        ("protocol", port.protocol.value)) if v is not None}
                     for port in p.ports]}]},
                 **({"status": {"podIP": str(p.address)}} if p.address else {})} for p in state.pods]
    if kind == "Service":
        return [o for s in state.services for o in (_service_object(s), *_endpoint_slices(s))]
    if kind == "NetworkPolicy":
        return [p.model_dump(mode="json", by_alias=True, exclude_none=True) for p in state.policies]
    raise KubeError(f"unknown kind {kind!r} (kinds: {', '.join(k for k in KINDS if k != 'EndpointSlice')})")


def _service_object(s: Service) -> dict:
    port: dict = {"port": s.port, "protocol": s.protocol}
    spec: dict = {"type": "ClusterIP", "clusterIP": str(s.address), "ports": [port],
                  "sessionAffinity": "ClientIP" if s.affinity == "client-ip" else "None"}
    if s.selector is not None:
        spec["selector"] = dict(s.selector)
        port["targetPort"] = s.target_port
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(s.name, s.namespace), "spec": spec}


def _endpoint_slices(s: Service) -> list[dict]:
    """A service with explicit backends: one EndpointSlice per backend port (selector: none)."""
    by_port: dict[int | str, list[str]] = {}
    for backend in s.backends:
        by_port.setdefault(backend.port, []).append(backend.pod)
    return [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
             "metadata": _meta(f"{s.name}-{port}", s.namespace, {SERVICE_NAME_LABEL: s.name}),
             "ports": [{"port": port, "protocol": s.protocol} if isinstance(port, int) else {"name": port}],
             "endpoints": [{"targetRef": {"kind": "Pod", "name": pod}} for pod in pods]}
            for port, pods in by_port.items()]


def as_list(items: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "List", "items": items}
