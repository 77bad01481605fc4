"""Pods in namespaces a container runtime made (CNI): the state changes that plug one in and take
it out. Pure functions over PodnetState; the controller makes the veth, address, routes and tcx
links of the result, and removes only those when the pod goes.

An attachment is identified as CNI does, by the container id and the interface name; the pod's
key (NAMESPACE/NAME) comes from the runtime (K8S_POD_NAMESPACE, K8S_POD_NAME) or the network's
configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from bpfnet.app.validation import validation_message
from bpfnet.podnet.config import ConfigError, Namespace, Pod, PodnetState, Sandbox


@dataclass(frozen=True)
class SandboxPod:
    """What a runtime asks for: pod `namespace/name` with `labels` in `sandbox`, on `node` (None:
    the only node, or the first)."""

    namespace: str
    name: str
    sandbox: Sandbox
    labels: dict[str, str] = field(default_factory=dict)
    node: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class AttachmentConflict(ConfigError):
    """The pod or the attachment exists already, for something else."""


def plug(state: PodnetState, request: SandboxPod) -> PodnetState:
    """`state` with the pod plugged into its sandbox (its namespace added when missing), with its
    address assigned; `state` itself when the same attachment exists already (an ADD repeated)."""
    sandbox = request.sandbox
    existing = state.attached(sandbox.container_id, sandbox.ifname)
    if existing is not None:
        if existing.key == request.key and existing.sandbox == sandbox:
            return state
        raise AttachmentConflict(f"container {sandbox.container_id} interface {sandbox.ifname} is "
                                 f"already attached as pod {existing.key}")
    for pod in state.pods:
        if pod.key == request.key:
            owner = (f"container {pod.sandbox.container_id}" if pod.sandbox is not None
                     else "a pod made by bpfnet")
            raise AttachmentConflict(f"pod {request.key} already exists ({owner})")
    if not state.nodes:
        raise ConfigError("no node to plug the pod into: add one with `bpfnet node add`")
    node = request.node or state.nodes[0].name
    state.node(node)  # refuses an unknown node by name
    try:
        pod = Pod(namespace=request.namespace, name=request.name, labels=request.labels, node=node,
                  sandbox=sandbox)
        namespaces = state.namespaces
        if not any(ns.name == request.namespace for ns in namespaces):
            namespaces = [*namespaces, Namespace(name=request.namespace)]
        new = state.model_copy(update={"namespaces": namespaces, "pods": [*state.pods, pod]})
        return PodnetState.model_validate(new.model_dump(mode="json", by_alias=True)).with_addresses()
    except ValidationError as err:
        raise ConfigError(validation_message(err, prefix="pod", bare_root=True)) from None


def unplug(state: PodnetState, container_id: str, ifname: str) -> PodnetState | None:
    """`state` without the pod attached to `container_id` as `ifname`; None when there is none
    (a DEL repeated, or of a container bpfnet never saw)."""
    pod = state.attached(container_id, ifname)
    if pod is None:
        return None
    return state.model_copy(update={"pods": [p for p in state.pods if p.key != pod.key]})
