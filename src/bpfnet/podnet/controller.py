"""The podnet app inside the agent: nodes, pods and policies made real.

`apply` validates and compiles the whole state first (nothing is touched if that fails), then per
node: namespaces and veths for new pods, tcx links on their host veths, the pods' servers, the map
contents (NodeDataplane.sync), and last the removal of pods and nodes that are gone. Each node has
its own pod.o with maps pinned under pin_root/podnet/<node>/, so the data plane keeps forwarding
while the agent restarts and is adopted on start.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bpfnet.agent.controller import ApplyError, Controller, register
from bpfnet.ebpf import BpfError
from bpfnet.ebpf.ringbuf import RingBuffer
from bpfnet.netns import TopologyError, list_netns, netns_cookie
from bpfnet.podnet import pods as podnet_pods
from bpfnet.podnet.config import ConfigError, Node, PodnetState
from bpfnet.podnet.dataplane import (
    ConntrackTimeouts, EndpointLink, NodeDataplane, Overlay, desired_maps,
)
from bpfnet.podnet.flows import Flow, FlowRing, boot_offset, decode, parse_filters
from bpfnet.podnet.identity import HOST, describe
from bpfnet.podnet.policy import CompiledPolicy, Direction, compile_policy
from bpfnet.podnet.services import ServiceTable

CONNTRACK_SWEEP_SECONDS = 10.0
FLOW_RING_CAPACITY = 8192   # recent flows kept for `observe --last`


@register
class PodnetController(Controller):
    name = "podnet"
    state_model = PodnetState

    def __init__(self, pin_root: Path) -> None:
        super().__init__(pin_root)
        self.pin_dir = Path(pin_root) / "podnet"
        self.state = PodnetState()
        self.compiled: CompiledPolicy = compile_policy(self.state)
        self.dataplanes: dict[str, NodeDataplane] = {}
        self.links: dict[str, EndpointLink] = {}
        self.timeouts = ConntrackTimeouts()
        self.services: ServiceTable | None = None  # socket LB, loaded with the first service
        self._next_sweep = 0.0
        self.flows = FlowRing(FLOW_RING_CAPACITY)
        self.flow_counts: dict[tuple[str, str], int] = {}   # (verdict, drop reason) -> flows
        self._flow_readers: dict[str, RingBuffer] = {}
        self._pods_by_address: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        self._socket_lb_reader: RingBuffer | None = None
        self._node_of: dict[str, str] = {}       # pod or router address -> node (socket-LB flows)
        self._identity_of: dict[str, int] = {}   # pod address -> identity (socket-LB flows)
        self._boot_offset = boot_offset()

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, state: PodnetState) -> None:
        self.apply(state)

    def apply(self, state: PodnetState) -> None:
        try:
            state = state.with_addresses()
            compiled = compile_policy(state)
        except ConfigError as err:
            raise ApplyError(str(err)) from None
        try:
            self._apply(state, compiled)
            if state.services or self.services is not None or (self.pin_dir / "services").exists():
                self._service_table().apply(state, self.dataplanes, scope_clients(state, compiled))
        except (podnet_pods.PodNetworkError, BpfError, TopologyError, OSError) as err:
            raise ApplyError(f"podnet: {err}") from None
        self.state, self.compiled = state, compiled
        self._pods_by_address = {
            str(p.address): (p.namespace, p.name, tuple(f"{k}={v}" for k, v in {
                **p.labels, **state.namespace_labels(p.namespace)}.items()))
            for p in state.pods}
        self._node_of = {**{str(n.router_address): n.name for n in state.nodes},
                         **{str(p.address): p.node for p in state.pods}}
        self._identity_of = {str(p.address): compiled.identities[p.key] for p in state.pods}

    def _apply(self, state: PodnetState, compiled: CompiledPolicy) -> None:
        started = []
        self._retire_fabric(state)
        if has_overlay(state):
            podnet_pods.ensure_fabric(state.underlay)
        underlay = {n.name: n.underlay_address for n in state.nodes}
        for node in state.nodes:
            podnet_pods.ensure_node(node)
            dataplane = self._dataplane(node)
            overlay = None
            if has_overlay(state):
                overlay = Overlay(podnet_pods.ensure_overlay(node, state.underlay), underlay)
                podnet_pods.ensure_link(node, overlay.tunnel_ifindex,
                                        podnet_pods.overlay_attachment(self._node_pins(node)),
                                        dataplane.from_overlay, "ingress")
                podnet_pods.ensure_link(node, podnet_pods.underlay_ifindex(node),
                                        podnet_pods.netdev_attachment(self._node_pins(node)),
                                        dataplane.from_netdev, "ingress")
            for pod in (p for p in state.pods if p.node == node.name):
                link = podnet_pods.ensure_pod(node, pod)
                self.links[pod.key] = link
                podnet_pods.ensure_attached(node, link.ifindex,
                                            podnet_pods.attachment(self._node_pins(node), pod.key),
                                            dataplane.from_container, dataplane.to_container)
                if podnet_pods.ensure_server(node, pod):
                    started.append(pod)
            dataplane.sync(desired_maps(compiled, node.name, self.links, overlay))
            self._remove_stale_pods(node, state)
            podnet_pods.wait_for_servers(node, [p for p in started if p.node == node.name])
        for node in self.state.nodes:
            if node.name not in {n.name for n in state.nodes}:
                self._remove_node(node, state)

    def _service_table(self) -> ServiceTable:
        if self.services is None:
            self.services = ServiceTable(self.pin_dir / "services")
        return self.services

    def _retire_fabric(self, state: PodnetState) -> None:
        """Remove the old fabric when the overlay goes away (one node left) or moves elsewhere."""
        old = self.state
        if not has_overlay(old) or (has_overlay(state) and old.underlay == state.underlay):
            return
        podnet_pods.remove_fabric(old.underlay)
        for node in state.nodes:
            podnet_pods.remove_overlay(node)
            for pin in (podnet_pods.overlay_attachment(self._node_pins(node)),
                        podnet_pods.netdev_attachment(self._node_pins(node))):
                with contextlib.suppress(FileNotFoundError):
                    pin.unlink()

    def _node_pins(self, node: Node) -> Path:
        return self.pin_dir / node.name

    def _dataplane(self, node: Node) -> NodeDataplane:
        if node.name not in self.dataplanes:
            pins = self._node_pins(node)
            pins.mkdir(parents=True, exist_ok=True)
            self.dataplanes[node.name] = NodeDataplane.load(pin_dir=pins)
        return self.dataplanes[node.name]

    def _remove_stale_pods(self, node: Node, state: PodnetState) -> None:
        wanted = {podnet_pods.pod_netns(node, p) for p in state.pods if p.node == node.name}
        for ns in podnet_pods.pod_namespaces_on(node, list_netns()):
            if ns not in wanted:
                key = podnet_pods.pod_key_of_netns(node, ns)
                podnet_pods.remove_pod(node, ns)
                podnet_pods.detach(podnet_pods.attachment(self._node_pins(node), key))
                if not any(p.key == key for p in state.pods):
                    self.links.pop(key, None)

    def _remove_node(self, node: Node, state: PodnetState) -> None:
        self._remove_stale_pods(node, state.model_copy(update={"pods": []}))
        self._close_flow_reader(node.name)
        dataplane = self.dataplanes.pop(node.name, None)
        if dataplane is not None:
            dataplane.close()
        shutil.rmtree(self._node_pins(node), ignore_errors=True)
        podnet_pods.remove_overlay(node)
        podnet_pods.remove_node(node)

    def stop(self, detach: bool) -> None:
        if self._socket_lb_reader is not None:
            self._socket_lb_reader.close()
            self._socket_lb_reader = None
        if self.services is not None:
            if detach:
                self.services.detach()
            else:
                self.services.close()
            self.services = None
        if detach:
            empty = PodnetState()
            for node in self.state.nodes:
                self._remove_node(node, empty)
            if has_overlay(self.state):
                podnet_pods.remove_fabric(self.state.underlay)
            shutil.rmtree(self.pin_dir, ignore_errors=True)
            self.state = empty
        for name in list(self._flow_readers):
            self._close_flow_reader(name)
        for dataplane in self.dataplanes.values():
            dataplane.close()
        self.dataplanes.clear()

    def tick(self, now: float) -> None:
        """Collect the nodes' flow events; expire idle conntrack entries every few seconds
        (`now`: CLOCK_MONOTONIC seconds, the clock bpf_ktime_get_ns reads)."""
        self.collect_flows()
        if now < self._next_sweep:
            return
        self._next_sweep = now + CONNTRACK_SWEEP_SECONDS
        for dataplane in self.dataplanes.values():
            with contextlib.suppress(BpfError):
                dataplane.expire_flows(int(now * 1e9), self.timeouts)

    # --- flows --------------------------------------------------------------------------------
    def collect_flows(self) -> int:
        """Move every event waiting in the nodes' pod_flows rings into the flow ring; -> count."""
        collected = 0
        for node, dataplane in self.dataplanes.items():
            reader = self._flow_readers.get(node)
            if reader is None:
                reader = self._flow_readers[node] = RingBuffer(dataplane.flow_events)
            for raw in reader.consume():
                self._record(decode(raw, node, self._boot_offset, self._resolve))
                collected += 1
        if self.services is not None:
            if self._socket_lb_reader is None:
                self._socket_lb_reader = RingBuffer(self.services.lb.flow_events)
            for raw in self._socket_lb_reader.consume():
                self._record(self._socket_lb_flow(raw))
                collected += 1
        return collected

    def _socket_lb_flow(self, raw: bytes) -> Flow:
        """A socket-LB TRANSLATED event, placed on the client's node, with the backend's identity
        filled in (the cgroup hooks have no ipcache)."""
        flow = decode(raw, "", self._boot_offset, self._resolve)
        backend = replace(flow.destination, identity=self._identity_of.get(flow.destination.address, 0))
        return replace(flow, node=self._node_of.get(flow.source.address, ""), destination=backend)

    def _record(self, flow: Flow) -> None:
        self.flows.add(flow)
        key = (flow.verdict, flow.drop_reason)
        self.flow_counts[key] = self.flow_counts.get(key, 0) + 1

    def _resolve(self, address: str) -> tuple[str, str, tuple[str, ...]]:
        return self._pods_by_address.get(address, ("", "", ()))

    def _close_flow_reader(self, node: str) -> None:
        reader = self._flow_readers.pop(node, None)
        if reader is not None:
            reader.close()

    def lost_flow_events(self) -> int:
        total = 0
        for dataplane in self.dataplanes.values():
            with contextlib.suppress(BpfError):
                total += dataplane.lost_flow_events()
        if self.services is not None:
            with contextlib.suppress(BpfError):
                total += self.services.lb.lost_flow_events()
        return total

    def _flows_query(self, params: dict) -> dict:
        """Recent flows, oldest first: `filters` (observe tokens, a list or its JSON text), `last`
        N matching flows, or with `since_seen` only those added after the ring had seen that many
        (follow by polling with the returned `seen`)."""
        tokens = params.get("filters") or []
        if isinstance(tokens, str):
            try:
                tokens = json.loads(tokens)
            except json.JSONDecodeError:
                raise ValueError("filters: expected a JSON list of observe arguments") from None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("filters: expected a list of observe arguments")
        flow_filter = parse_filters(tokens)
        last = _non_negative(params, "last")
        self.collect_flows()
        if params.get("since_seen") is not None:
            flows = list(flow_filter(self.flows.after(_non_negative(params, "since_seen"))))
            flows = flows[-last:] if last else flows
        else:
            flows = self.flows.last(last or None, flow_filter)
        return {"flows": [asdict(f) for f in flows], "seen": self.flows.seen,
                "lost_events": self.lost_flow_events()}

    # --- observation --------------------------------------------------------------------------
    def stats(self) -> dict:
        packets: dict[str, int] = {}
        for dataplane in self.dataplanes.values():
            for (outcome, direction), (count, _) in dataplane.counters().items():
                key = f"{outcome.name.lower()}_{direction.name.lower()}"
                packets[key] = packets.get(key, 0) + count
        by_verdict: dict[str, int] = {}
        drops: dict[str, int] = {}
        service_rows = self._service_rows()
        for (verdict, reason), count in self.flow_counts.items():
            by_verdict[verdict] = by_verdict.get(verdict, 0) + count
            if reason:
                drops[reason] = drops.get(reason, 0) + count
        return {
            "nodes": len(self.state.nodes),
            "namespaces": len(self.state.namespaces),
            "pods": len(self.state.pods),
            "policies": len(self.state.policies),
            "identities": len(set(self.compiled.identities.values())),
            "policy_entries": sum(len(e.entries) for e in self.compiled.endpoints.values()),
            "packets": packets,
            "flows": {"by_verdict": by_verdict, "drops_by_reason": drops},
            "flow_events": {"seen": self.flows.seen, "buffered": len(self.flows.flows),
                            "lost": self.lost_flow_events()},
            "service_connections": {row["namespace"] + "/" + row["name"]: row["connects"] + row["datagrams"]
                                    for row in service_rows},
            "service_fallback_flows": {row["namespace"] + "/" + row["name"]: row["fallback_flows"]
                                       for row in service_rows},
        }

    def query(self, name: str, params: dict) -> Any:
        if name == "endpoints":
            return endpoint_rows(self.state, self.compiled)
        if name == "endpoint":
            return self._endpoint(str(params.get("pod", "")))
        if name == "services":
            return self._service_rows()
        if name == "flows":
            return self._flows_query(params)
        if name == "conntrack":
            return {node: dp.flows() for node, dp in self.dataplanes.items()}
        raise KeyError(name)

    def _service_rows(self) -> list[dict]:
        return self.services.rows(self.state, self.dataplanes) if self.services is not None else []

    def _endpoint(self, key: str) -> dict:
        endpoint = self.compiled.endpoints.get(key)
        if endpoint is None:
            raise KeyError(f"pod {key!r} does not exist")
        dataplane = self.dataplanes.get(endpoint.node)
        hits = dataplane.policy_hits() if dataplane else {}
        return describe_endpoint(self.compiled, key, hits)


def _non_negative(params: dict, name: str) -> int:
    try:
        value = int(params.get(name) or 0)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {params.get(name)!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{name}: {value} is negative")
    return value


def scope_clients(state: PodnetState, compiled: CompiledPolicy) -> dict[int, tuple[str, int]]:
    """The nodes' and pods' network namespaces, whose sockets the socket LB translates: netns
    cookie -> the address and identity their TRANSLATED flow events carry."""
    clients = {netns_cookie(n.netns): (str(n.router_address), HOST) for n in state.nodes}
    for pod in state.pods:
        clients[netns_cookie(podnet_pods.pod_netns(state.node(pod.node), pod))] = (
            str(pod.address), compiled.identities[pod.key])
    return clients


def has_overlay(state: PodnetState) -> bool:
    """Nodes are joined by VXLAN over the underlay as soon as there are two of them."""
    return len(state.nodes) > 1


def endpoint_rows(state: PodnetState, compiled: CompiledPolicy) -> list[dict]:
    """`pod list -o json`: namespace, name, labels, node, address, identity of every pod."""
    return [{"namespace": p.namespace, "name": p.name, "labels": p.labels, "node": p.node,
             "address": str(p.address) if p.address else None,
             "identity": compiled.identities.get(p.key)} for p in state.pods]


def describe_endpoint(compiled: CompiledPolicy, key: str, hits: dict) -> dict:
    """`endpoint show`: identity, selecting policies and the compiled entries with their hits."""
    endpoint = compiled.endpoints[key]
    labels = compiled.label_sets[endpoint.identity]

    def remote(identity: int) -> str:
        """Who an identity stands for: pods by labels, or the address/prefix of a local one."""
        if identity in compiled.label_sets:
            peer = compiled.label_sets[identity]
            namespace = peer.namespace.get("kubernetes.io/metadata.name")
            return f"{namespace}: " + (",".join(f"{k}={v}" for k, v in peer.pod_labels) or "-")
        for prefix, entry in compiled.ipcache.items():
            if entry.local_identity == identity:
                return str(prefix)
        return describe(identity)

    return {
        "pod": key, "node": endpoint.node, "address": str(endpoint.address),
        "identity": endpoint.identity, "labels": labels.pod,
        "namespace_labels": labels.namespace,
        "ingress_isolated": endpoint.ingress_isolated, "egress_isolated": endpoint.egress_isolated,
        "selected_by": {d.policy_type: endpoint.selected_by.get(d, []) for d in Direction},
        "entries": [{"direction": e.direction.policy_type, "identity": e.identity,
                     "remote": remote(e.identity), "ports": e.describe_ports(),
                     "prefixlen": e.prefixlen, "hits": hits.get(e, 0)}
                    for e in sorted(endpoint.entries)],
    }
