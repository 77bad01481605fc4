"""Kubernetes objects in and out of the podnet state: `bpfnet apply -f` and `bpfnet get`.

The objects users already write: Node (v1), Namespace (v1), Pod (v1), Service (v1) with a
selector or an EndpointSlice (discovery.k8s.io/v1), NetworkPolicy (networking.k8s.io/v1), several
documents in one file and `kind: List`. Each document is checked whole before anything changes,
with kubectl's field paths (`spec.containers[0].ports[0].containerPort`); an unknown kind or field
is refused. Fields that describe what bpfnet does not run (a container's image, command, env,
resources) are accepted and ignored, as are `status` and the server-set metadata (uid,
resourceVersion, ...) that `kubectl get -o yaml` prints; `apply` sets each object as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bpfnet.configfile import ConfigFileError, parse_yaml
from bpfnet.podnet.config import (
    NAMESPACE_NAME_LABEL,
    ConfigError,
    ContainerPort,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    PodnetState,
    Protocol,
    Service,
    ServiceBackend,
)
from bpfnet.schema import Port

NETNS_ANNOTATION = "bpfnet.io/netns"        # a Node's network namespace (default bpfnet-NAME; "" the root one)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_CIDR = IPv4Network("10.96.0.0/12")  # where a Service without clusterIP gets its address
_SERVER_SET = {"uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "selfLink",
               "ownerReferences", "finalizers", "generateName", "deletionTimestamp"}


class KubeError(ConfigError):
    """A document that is not an object bpfnet takes; the message names the document and field."""


class _Kube(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)


class Meta(_Kube):
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels", "annotations", mode="before")
    @classmethod
    def _none(cls, value: Any) -> Any:
        return {} if value is None else value


class ContainerPortSpec(_Kube):
    name: str | None = None
    container_port: int = Field(alias="containerPort")
    protocol: Protocol = Protocol.TCP


class Container(_Kube):
    name: str
    image: str | None = None
    ports: list[ContainerPortSpec] = Field(default_factory=list)
    # what bpfnet does not run, accepted as Kubernetes has them
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[dict[str, Any]] | None = None
    resources: dict[str, Any] | None = None
    image_pull_policy: str | None = Field(None, alias="imagePullPolicy")
    working_dir: str | None = Field(None, alias="workingDir")


class PodSpec(_Kube):
    node_name: str | None = Field(None, alias="nodeName")
    containers: list[Container] = Field(default_factory=list)
    restart_policy: str | None = Field(None, alias="restartPolicy")
    termination_grace_period_seconds: int | None = Field(None, alias="terminationGracePeriodSeconds")


class NodeSpec(_Kube):
    pod_cidr: str = Field(alias="podCIDR")


class ServicePort(_Kube):
    name: str | None = None
    port: Port
    target_port: int | str | None = Field(None, alias="targetPort")
    protocol: Literal["TCP", "UDP"] = "TCP"


class ServiceSpec(_Kube):
    selector: dict[str, str] | None = None
    ports: list[ServicePort]
    cluster_ip: str | None = Field(None, alias="clusterIP")
    cluster_ips: list[str] | None = Field(None, alias="clusterIPs")
    type: Literal["ClusterIP"] = "ClusterIP"
    session_affinity: Literal["None", "ClientIP"] = Field("None", alias="sessionAffinity")


class ObjectReference(_Kube):
    kind: Literal["Pod"]
    name: str
    namespace: str | None = None
    uid: str | None = None


class Endpoint(_Kube):
    addresses: list[str]
    target_ref: ObjectReference | None = Field(None, alias="targetRef")
    conditions: dict[str, Any] | None = None
    node_name: str | None = Field(None, alias="nodeName")


class EndpointPort(_Kube):
    name: str | None = None
    port: Port
    protocol: Literal["TCP", "UDP"] = "TCP"


@dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service: str
    backends: list[ServiceBackend]


KINDS = {("v1", "Node"), ("v1", "Namespace"), ("v1", "Pod"), ("v1", "Service"),
         ("discovery.k8s.io/v1", "EndpointSlice"), ("networking.k8s.io/v1", "NetworkPolicy")}
_TOP = {"apiVersion", "kind", "metadata", "spec", "status"}
_SLICE_FIELDS = {"addressType", "endpoints", "ports"}   # an EndpointSlice has them at the top


@dataclass
class Objects:
    """What one file holds, by kind, in file order."""

    nodes: list[Node]
    namespaces: list[Namespace]
    pods: list[Pod]
    services: list[tuple[Service, bool]]   # with "no clusterIP given" (allocated on apply)
    slices: list[EndpointSlice]
    policies: list[NetworkPolicy]


def load_objects(text: str, source: str = "input") -> Objects:
    """Every object of a YAML/JSON file (documents, `kind: List`), checked; KubeError names the
    document and the field of the first problem."""
    try:
        documents = [d for d in parse_yaml(text, source, all_documents=True) if d is not None]
    except ConfigFileError as err:
        raise KubeError(str(err)) from None
    items: list[Any] = []
    for doc in documents:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items.extend(doc.get("items") or [])
        else:
            items.append(doc)
    objects = Objects([], [], [], [], [], [])
    for i, item in enumerate(items):
        where = f"{source}: document {i + 1}"
        if not isinstance(item, dict):
            raise KubeError(f"{where}: expected an object (mapping), got {type(item).__name__}")
        kind, version = item.get("kind"), item.get("apiVersion")
        name = (item.get("metadata") or {}).get("name") if isinstance(item.get("metadata"), dict) else None
        if name:
            where += f" ({kind} {name})"
        if (version, kind) not in KINDS:
            known = ", ".join(f"{k} ({v})" for v, k in sorted(KINDS, key=lambda p: p[1]))
            raise KubeError(f"{where}: kind {kind!r} of apiVersion {version!r} is not taken; known: {known}")
        unknown = sorted(set(item) - _TOP - (_SLICE_FIELDS if kind == "EndpointSlice" else set()))
        if unknown:
            raise KubeError(f'{where}: unknown field "{unknown[0]}"')
        try:
            _load_one(item, str(kind), objects)
        except ValidationError as err:
            raise KubeError(f"{where}: {_kubectl_message(err)}") from None
        except ValueError as err:
            raise KubeError(f"{where}: {err}") from None
    return objects


def _load_one(item: dict, kind: str, objects: Objects) -> None:
    raw_meta = dict(item.get("metadata") or {})
    for key in _SERVER_SET & set(raw_meta):
        raw_meta.pop(key)
    meta = _validate(Meta, raw_meta, "metadata")
    if kind == "NetworkPolicy":
        objects.policies.append(NetworkPolicy.model_validate({**item, "metadata": {
            "name": meta.name, "namespace": meta.namespace or "default"}}))
        return
    spec = item.get("spec") or {}
    if kind == "Namespace":  # kubernetes.io/metadata.name is the name, as Kubernetes sets it
        if meta.labels.get(NAMESPACE_NAME_LABEL, meta.name) != meta.name:
            raise ValueError(f"metadata.labels: {NAMESPACE_NAME_LABEL} must be the namespace's name {meta.name!r}")
        labels = {k: v for k, v in meta.labels.items() if k != NAMESPACE_NAME_LABEL}
        objects.namespaces.append(Namespace(name=meta.name, labels=labels))
    elif kind == "Node":
        node_spec = _validate(NodeSpec, spec, "spec")
        netns = meta.annotations.get(NETNS_ANNOTATION, f"bpfnet-{meta.name}")
        objects.nodes.append(Node(name=meta.name, pod_cidr=node_spec.pod_cidr, netns=netns or None))
    elif kind == "Pod":
        pod_spec = _validate(PodSpec, spec, "spec")
        ports = [ContainerPort(name=p.name, port=p.container_port, protocol=p.protocol)
                 for c in pod_spec.containers for p in c.ports]
        objects.pods.append(Pod(namespace=meta.namespace or "default", name=meta.name, labels=meta.labels,
                                node=pod_spec.node_name or "", ports=ports))
    elif kind == "Service":
        objects.services.append(_service(meta, _validate(ServiceSpec, spec, "spec")))
    else:
        objects.slices.append(_endpoint_slice(meta, item))


def _validate(model: type[BaseModel], data: Any, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ValueError(_kubectl_message(err, prefix)) from None


def _service(meta: Meta, spec: ServiceSpec) -> tuple[Service, bool]:
    if len(spec.ports) != 1:
        raise ValueError(f"spec.ports: a bpfnet service has exactly one port (got {len(spec.ports)})")
    port = spec.ports[0]
    address = spec.cluster_ip or (spec.cluster_ips[0] if spec.cluster_ips else None)
    target = port.target_port if spec.selector is not None else None
    service = Service(namespace=meta.namespace or "default", name=meta.name,
                      address=IPv4Address(address or SERVICE_CIDR.network_address + 1),
                      port=port.port, protocol=port.protocol, selector=spec.selector,
                      target_port=(target if target is not None else port.port) if spec.selector is not None else None,
                      affinity="client-ip" if spec.session_affinity == "ClientIP" else "none")
    return service, address is None


def _endpoint_slice(meta: Meta, item: dict) -> EndpointSlice:
    service = meta.labels.get(SERVICE_NAME_LABEL)
    if not service:
        raise ValueError(f"metadata.labels: an EndpointSlice needs the label {SERVICE_NAME_LABEL}")
    if item.get("addressType", "IPv4") != "IPv4":
        raise ValueError(f"addressType: only IPv4 is supported (got {item.get('addressType')!r})")
    endpoints = [_validate(Endpoint, e, f"endpoints[{i}]") for i, e in enumerate(item.get("endpoints") or [])]
    ports = [_validate(EndpointPort, p, f"ports[{i}]") for i, p in enumerate(item.get("ports") or [])]
    if len(ports) != 1:
        raise ValueError(f"ports: a bpfnet service has exactly one port (got {len(ports)})")
    backends = []
    for i, endpoint in enumerate(endpoints):
        if endpoint.target_ref is None:
            raise ValueError(f"endpoints[{i}].targetRef: bpfnet backends are pods: give targetRef (kind Pod)")
        backends.append(ServiceBackend(pod=endpoint.target_ref.name, port=ports[0].port))
    return EndpointSlice(meta.namespace or "default", meta.name, service, backends)


def _kubectl_message(err: ValidationError, prefix: str = "") -> str:
    first = err.errors(include_url=False)[0]
    path = prefix
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f'unknown field "{path}"'
    if first["type"] == "missing":
        return f"{path}: Required value"
    shown = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict) else ""
    return f"{path}: {message}{shown}" if path else message + shown


# --- apply ----------------------------------------------------------------------------------------

def apply_objects(state: PodnetState, objects: Objects) -> tuple[PodnetState, list[str]]:
    """`state` with every object created or replaced (kubectl apply: nothing else is removed), and
    kubectl's line for each: `pod/a created|configured|unchanged`."""
    lines: list[str] = []
    nodes = _upsert(state.nodes, objects.nodes, lambda n: n.name, "node", lines,
                    keep=lambda old, new: new.model_copy(update={"underlay_address": old.underlay_address}))
    namespaces = _upsert(state.namespaces, objects.namespaces, lambda n: n.name, "namespace", lines)
    default_node = nodes[0].name if nodes else ""
    pods = [p if p.node else p.model_copy(update={"node": default_node}) for p in objects.pods]
    pods_now = _upsert(state.pods, pods, lambda p: p.key, "pod", lines,
                       keep=lambda old, new: new.model_copy(update={"address": old.address, "sandbox": old.sandbox}))
    used = {s.address for s in state.services}
    services = []
    for service, allocate in objects.services:
        existing = next((s for s in state.services if s.key == service.key), None)
        if allocate:
            address = existing.address if existing else next(a for a in SERVICE_CIDR.hosts() if a not in used)
            used.add(address)
            service = service.model_copy(update={"address": address})
        if service.selector is None and existing is not None:   # its EndpointSlices keep their backends
            service = service.model_copy(update={"backends": existing.backends})
        services.append(service)
    sliced: dict[str, list[ServiceBackend]] = {}
    for piece in objects.slices:
        key = f"{piece.namespace}/{piece.service}"
        owner = next((s for s in services if s.key == key), None) or next(
            (s for s in state.services if s.key == key), None)
        if owner is None:
            raise KubeError(f"endpointslice {piece.namespace}/{piece.name}: service {key} does not exist")
        if owner.selector is not None:
            raise KubeError(f"endpointslice {piece.namespace}/{piece.name}: service {owner.key} has a selector; "
                            "its backends follow the pods")
        sliced.setdefault(key, []).extend(piece.backends)   # the slices of one service add up
        backends = sliced[key]
        lines.append(f"endpointslice.discovery.k8s.io/{piece.name} "
                     f"{'unchanged' if backends == owner.backends else 'configured'}")
        services = [s for s in services if s.key != owner.key] + [owner.model_copy(update={"backends": backends})]
    services_now = _upsert(state.services, services, lambda s: s.key, "service", lines)
    policies = _upsert(state.policies, objects.policies, lambda p: p.key, "networkpolicy.networking.k8s.io", lines)
    try:
        new = PodnetState.model_validate(state.model_copy(update={
            "nodes": nodes, "namespaces": namespaces, "pods": pods_now, "services": services_now,
            "policies": policies}).dump()).with_addresses()
    except ValidationError as err:
        raise KubeError(_kubectl_message(err) or str(err)) from None
    return new, lines


def _upsert(current: list, given: list, key, kind: str, lines: list[str], keep=None) -> list:
    result = list(current)
    for obj in given:
        index = next((i for i, old in enumerate(result) if key(old) == key(obj)), None)
        name = key(obj).rsplit("/", 1)[-1]
        if index is None:
            result.append(obj)
            lines.append(f"{kind}/{name} created")
            continue
        new = keep(result[index], obj) if keep else obj
        lines.append(f"{kind}/{name} {'unchanged' if new == result[index] else 'configured'}")
        result[index] = new
    return result


# --- get ------------------------------------------------------------------------------------------

GET_KINDS = {"nodes": "Node", "namespaces": "Namespace", "pods": "Pod", "services": "Service",
             "endpointslices": "EndpointSlice", "networkpolicies": "NetworkPolicy"}
_ALIASES = {"node": "nodes", "no": "nodes", "namespace": "namespaces", "ns": "namespaces", "pod": "pods",
            "po": "pods", "service": "services", "svc": "services", "networkpolicy": "networkpolicies",
            "netpol": "networkpolicies", "endpointslice": "endpointslices"}


def kind_name(text: str) -> str:
    name = _ALIASES.get(text.lower(), text.lower())
    if name not in GET_KINDS:
        raise KubeError(f"the server doesn't have a resource type {text!r} "
                        f"(bpfnet has: {', '.join(GET_KINDS)})")
    return name


def get_objects(state: PodnetState, kind: str) -> dict:
    """`kind: List` of the state's objects of `kind` as Kubernetes manifests (apply takes them back)."""
    items: list[dict] = []
    if kind == "nodes":
        items = [{"apiVersion": "v1", "kind": "Node",
                  "metadata": {"name": n.name, "annotations": {NETNS_ANNOTATION: n.netns or ""}},
                  "spec": {"podCIDR": str(n.pod_cidr)}} for n in state.nodes]
    elif kind == "namespaces":
        items = [{"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": n.name, "labels": n.effective_labels}} for n in state.namespaces]
    elif kind == "pods":
        items = [_pod_manifest(p) for p in state.with_addresses().pods]
    elif kind == "services":
        items = [_service_manifest(s) for s in state.services]
    elif kind == "endpointslices":
        items = [_slice_manifest(state, s, port, backends) for s in state.services
                 for port, backends in _backends_by_port(state, s).items()]
    elif kind == "networkpolicies":
        items = [p.dump() for p in state.policies]
    return {"apiVersion": "v1", "kind": "List", "items": items}


def _pod_manifest(pod: Pod) -> dict:
    container: dict[str, Any] = {"name": pod.name}
    if pod.ports:
        container["ports"] = [{**({"name": p.name} if p.name else {}), "containerPort": p.port,
                               "protocol": p.protocol.value} for p in pod.ports]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
            "spec": {"nodeName": pod.node, "containers": [container]},
            "status": {"podIP": str(pod.address) if pod.address else None}}


def _service_manifest(service: Service) -> dict:
    port: dict[str, Any] = {"port": service.port, "protocol": service.protocol}
    spec: dict[str, Any] = {"clusterIP": str(service.address), "ports": [port],
                            "sessionAffinity": "ClientIP" if service.affinity == "client-ip" else "None"}
    if service.selector is not None:
        spec["selector"] = service.selector
        port["targetPort"] = service.target_port
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": service.name, "namespace": service.namespace}, "spec": spec}


def _backends_by_port(state: PodnetState, service: Service) -> dict[int, list[Pod]]:
    """A service's explicit backends grouped by port number (a named port resolved on its pod)."""
    groups: dict[int, list[Pod]] = {}
    for backend in service.backends:
        pod = state.pod(f"{service.namespace}/{backend.pod}")
        port = (backend.port if isinstance(backend.port, int)
                else pod.named_port(backend.port, Protocol(service.protocol)))
        if port is not None:
            groups.setdefault(port, []).append(pod)
    return groups


def _slice_manifest(state: PodnetState, service: Service, port: int, pods: list[Pod]) -> dict:
    addressed = {p.key: p.address for p in state.with_addresses().pods}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service.name}-{port}", "namespace": service.namespace,
                         "labels": {SERVICE_NAME_LABEL: service.name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [str(addressed[p.key])], "targetRef": {"kind": "Pod", "name": p.name}}
                          for p in pods],
            "ports": [{"port": port, "protocol": service.protocol}]}
