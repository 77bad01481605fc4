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
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bpfnet.app.controller import ApplyError, Controller, register
from bpfnet.ebpf import BpfError
from bpfnet.netns import TopologyError, list_netns, netns_cookie
from bpfnet.podnet import pods as podnet_pods
from bpfnet.podnet.config import PODNET_OBJECTS, ConfigError, Node, Pod, PodnetState
from bpfnet.podnet.dataplane import (
    ConntrackTimeouts,
    EndpointLink,
    NodeDataplane,
    Overlay,
    desired_maps,
)
from bpfnet.podnet.flow_collector import FlowCollector
from bpfnet.podnet.flows import (
    Flow,
    FlowFilter,
    FlowRows,
    FlowStore,
    boot_offset,
    decode,
    ipv4_lookup,
    parse_filters,
)
from bpfnet.podnet.identity import HOST, describe
from bpfnet.podnet.policy import CompiledPolicy, Direction, compile_policy
from bpfnet.podnet.services import ServiceTable

CONNTRACK_SWEEP_SECONDS = 10.0
FLOW_STORE_CAPACITY = 65536   # recent flow events kept for `observe --last`
SOCKET_LB = "socket-lb"       # the flow collector's name for the socket LB's ring


@register
class PodnetController(Controller[PodnetState]):
    name = "podnet"
    state_model = PodnetState
    object_kinds = PODNET_OBJECTS

    def __init__(self, pin_root: Path, nodes: Sequence[str] | None = None) -> None:
        """`nodes`: the nodes this agent programs (one agent per host: its own node); None: every
        node of the state (one agent drives them all). The others are remote: their pods are
        reached through the overlay, as the state says."""
        super().__init__(pin_root)
        self.local_nodes = frozenset(nodes) if nodes else None
        self.dead_nodes: frozenset[str] = frozenset()  # nodes whose agent's lease ran out
        self.pin_dir = Path(pin_root) / "podnet"
        self.state = PodnetState()  # what the data plane runs: the desired state without dead nodes' pods
        self.desired = self.state
        self.compiled: CompiledPolicy = compile_policy(self.state)
        self.dataplanes: dict[str, NodeDataplane] = {}
        self.links: dict[str, EndpointLink] = {}
        self.timeouts = ConntrackTimeouts()
        self.services: ServiceTable | None = None  # socket LB, loaded with the first service
        self._next_sweep = 0.0
        self.flows = FlowStore(FLOW_STORE_CAPACITY)
        self._flow_collector = FlowCollector(self.flows)   # its thread runs once started
        self._pods_by_address: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        self._node_of: dict[str, str] = {}       # pod or router address -> node (socket-LB flows)
        self._identity_of: dict[str, int] = {}   # pod address -> identity (socket-LB flows)
        self._boot_offset = boot_offset()

    @classmethod
    def normalize(cls, state: PodnetState) -> PodnetState:
        return state.with_addresses()  # stored with the state: an address never moves to another pod

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, state: PodnetState) -> None:
        self.apply(state)
        self._flow_collector.start()

    def members_changed(self, members: set[str] | None) -> None:
        """The hosts whose agents are alive (from the store's leases; None: no such information).
        Pods of a node whose agent is gone are not reachable: they leave this node's ipcache and
        services until the node comes back. This agent's own nodes always count as alive."""
        dead = frozenset() if members is None else frozenset(
            n.name for n in self.desired.nodes if n.name not in members and not self._is_local(n.name))
        if dead != self.dead_nodes:
            self.dead_nodes = dead
            self.apply(self.desired)

    def _is_local(self, node: str) -> bool:
        return self.local_nodes is None or node in self.local_nodes

    def _reachable(self, state: PodnetState) -> PodnetState:
        """`state` without the pods of dead nodes (and service backends on them)."""
        if not self.dead_nodes:
            return state
        pods = [p for p in state.pods if p.node not in self.dead_nodes]
        kept = {p.key for p in pods}
        services = [s.model_copy(update={"backends": [b for b in s.backends if f"{s.namespace}/{b.pod}" in kept]})
                    for s in state.services]
        return state.model_copy(update={"pods": pods, "services": services})

    def apply(self, state: PodnetState) -> None:
        desired = state
        try:
            state = self._reachable(state.with_addresses())
            compiled = compile_policy(state)
        except ConfigError as err:
            raise ApplyError(str(err)) from None
        try:
            self._apply(state, compiled)
            if state.services or self.services is not None or (self.pin_dir / "services").exists():
                self._service_table().apply(state, self.dataplanes, scope_clients(state, compiled, self._is_local))
        except (podnet_pods.PodNetworkError, BpfError, TopologyError, OSError) as err:
            raise ApplyError(f"podnet: {err}") from None
        self.state, self.compiled, self.desired = state, compiled, desired
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
        # every node has its underlay address once the state is validated (allocated when absent)
        underlay = {n.name: n.underlay_address for n in state.nodes if n.underlay_address is not None}
        for node in self._mine(state.nodes):
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
            self._unplug_replaced_sandboxes(node, state)
            for pod in (p for p in state.pods if p.node == node.name):
                if pod.sandbox is not None and not podnet_pods.netns_exists(pod.sandbox.netns):
                    # the runtime removed its namespace without DEL (the veth went with it): the pod
                    # keeps its address and identity until DEL, but has no endpoint
                    self.links.pop(pod.key, None)
                    continue
                link = podnet_pods.ensure_pod(node, pod)
                self.links[pod.key] = link
                podnet_pods.ensure_attached(node, link.ifindex,
                                            podnet_pods.attachment(self._node_pins(node), pod.key),
                                            dataplane.from_container, dataplane.to_container)
                if podnet_pods.ensure_server(node, pod):
                    started.append(pod)
            dataplane.sync(desired_maps(compiled, node.name, self.links, overlay))
            self._remove_stale_pods(node, state)
            self._remove_stale_links(node, state)
            podnet_pods.wait_for_servers(node, [p for p in started if p.node == node.name])
        for node in self._mine(self.state.nodes):
            if node.name not in {n.name for n in state.nodes}:
                self._remove_node(node, state)

    def _mine(self, nodes: list[Node]) -> list[Node]:
        return [n for n in nodes if self._is_local(n.name)]

    def _service_table(self) -> ServiceTable:
        if self.services is None:
            self.services = ServiceTable(self.pin_dir / "services")
            self._flow_collector.watch(SOCKET_LB, self.services.lb.flow_events, self._place_socket_lb_events, "sock")
        return self.services

    def _retire_fabric(self, state: PodnetState) -> None:
        """Remove the old fabric when the overlay goes away (one node left) or moves elsewhere."""
        old = self.state
        if not has_overlay(old) or (has_overlay(state) and old.underlay == state.underlay):
            return
        if self.local_nodes is None:  # with an agent per host the fabric is the hosts' network
            podnet_pods.remove_fabric(old.underlay)
        for node in self._mine(state.nodes):
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
            self._flow_collector.watch(node.name, self.dataplanes[node.name].flow_events)
        return self.dataplanes[node.name]

    def _remove_stale_pods(self, node: Node, state: PodnetState) -> None:
        wanted = {podnet_pods.pod_netns(node, p) for p in state.pods if p.node == node.name}
        for ns in podnet_pods.pod_namespaces_on(node, list_netns()):
            if ns not in wanted:
                key = podnet_pods.pod_key_of_netns(node, ns)
                assert key is not None  # ns is one of node's pod namespaces
                podnet_pods.remove_pod(node, ns)
                podnet_pods.detach(podnet_pods.attachment(self._node_pins(node), key))
                if not any(p.key == key for p in state.pods):
                    self.links.pop(key, None)

    def _unplug_replaced_sandboxes(self, node: Node, state: PodnetState) -> None:
        """A pod whose sandbox changed (another container, namespace or interface): its old veth
        goes before the new one is made (both carry the name of the pod's key)."""
        new = {p.key: p for p in state.pods if p.node == node.name}
        for old in self.state.pods:
            if old.node == node.name and old.key in new and old.sandbox != new[old.key].sandbox:
                podnet_pods.unplug(node, podnet_pods.host_ifname(old.key))
                podnet_pods.detach(podnet_pods.attachment(self._node_pins(node), old.key))
                self.links.pop(old.key, None)

    def _remove_stale_links(self, node: Node, state: PodnetState) -> None:
        """Pinned pod links whose pod is gone: sandbox pods (their namespace is the runtime's and
        stays; only bpfnet's veth goes), or leftovers of a crash."""
        wanted = {podnet_pods.host_ifname(p.key) for p in state.pods if p.node == node.name}
        for host, pins in podnet_pods.stale_link_pins(self._node_pins(node), wanted).items():
            podnet_pods.unplug(node, host)
            podnet_pods.detach(pins)
        for key in [k for k in self.links if not any(p.key == k for p in state.pods)]:
            self.links.pop(key)

    def _remove_node(self, node: Node, state: PodnetState) -> None:
        self._remove_stale_pods(node, state.model_copy(update={"pods": []}))
        self._remove_stale_links(node, state.model_copy(update={"pods": []}))
        self._flow_collector.forget(node.name)
        dataplane = self.dataplanes.pop(node.name, None)
        if dataplane is not None:
            dataplane.close()
        shutil.rmtree(self._node_pins(node), ignore_errors=True)
        podnet_pods.remove_overlay(node)
        podnet_pods.remove_node(node)

    def stop(self, detach: bool) -> None:
        self._flow_collector.forget(SOCKET_LB)
        if self.services is not None:
            if detach:
                self.services.detach()
            else:
                self.services.close()
            self.services = None
        if detach:
            empty = PodnetState()
            for node in self._mine(self.state.nodes):
                self._remove_node(node, empty)
            if has_overlay(self.state) and self.local_nodes is None:
                podnet_pods.remove_fabric(self.state.underlay)
            shutil.rmtree(self.pin_dir, ignore_errors=True)
            self.state = self.desired = empty
        self._flow_collector.close()
        self._flow_collector = FlowCollector(self.flows)   # a fresh one if started again
        for dataplane in self.dataplanes.values():
            dataplane.close()
        self.dataplanes.clear()

    def tick(self, now: float) -> None:
        """Expire idle conntrack entries every few seconds (`now`: CLOCK_MONOTONIC seconds, the
        clock bpf_ktime_get_ns reads). Flow events are collected by their own thread."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + CONNTRACK_SWEEP_SECONDS
        for dataplane in self.dataplanes.values():
            with contextlib.suppress(BpfError):
                dataplane.expire_flows(int(now * 1e9), self.timeouts)

    # --- flows --------------------------------------------------------------------------------
    def collect_flows(self) -> int:
        """Every flow event waiting now into the store (the collector thread does this on its
        own; queries do it to be up to the moment); -> count."""
        with self._flow_collector.lock:
            return self._flow_collector.collect()

    def recent_flows(self, flow_filter: FlowFilter | None = None, last: int | None = None,
                     after: int = 0) -> list[Flow]:
        """The matching flows still held that arrived as number `after` or later, oldest first
        (only the newest `last` with `last`), as of now."""
        return self._recent_rows(after)[0].select(self._flow, flow_filter, last)

    def _recent_rows(self, after: int) -> tuple[FlowRows, int]:
        with self._flow_collector.lock:
            self._flow_collector.collect()
            return self.flows.rows(after), self.flows.seen

    def _flow(self, raw: bytes, node: str) -> Flow:
        return decode(raw, node, self._boot_offset, self._resolve)

    def _place_socket_lb_events(self, batch: np.ndarray) -> list[str]:
        """Socket-LB TRANSLATED events: the node of each (its client's), with the backend's
        identity filled in (the cgroup hooks have no ipcache)."""
        batch["dst_identity"] = ipv4_lookup(batch["dst_addr"], self._identity_of, 0)
        return ipv4_lookup(batch["src_addr"], self._node_of, "").tolist()

    def _resolve(self, address: str) -> tuple[str, str, tuple[str, ...]]:
        return self._pods_by_address.get(address, ("", "", ()))

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
        after = _non_negative(params, "since_seen") if params.get("since_seen") is not None else 0
        rows, seen = self._recent_rows(after)
        flows = rows.select(self._flow, flow_filter, last or None)
        return {"flows": [asdict(f) for f in flows], "seen": seen, "lost_events": self.lost_flow_events()}

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
        with self._flow_collector.lock:
            counts, by_type = self.flows.counts(), self.flows.counts_by_type()
            seen, buffered = self.flows.seen, len(self.flows)
        for (verdict, reason), count in counts.items():
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
            "flows": {"by_verdict": by_verdict, "by_type": by_type, "drops_by_reason": drops},
            "flow_events": {"seen": seen, "buffered": buffered,
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
        if name == "sandbox":
            return self._sandbox(str(params.get("pod", "")))
        if name == "check":
            pod = self._pod(str(params.get("pod", "")))
            return {"pod": pod.key, "problems": podnet_pods.check_pod(self.state.node(pod.node), pod,
                                                                       self.links.get(pod.key))}
        if name == "conntrack":
            return {node: dp.flows() for node, dp in self.dataplanes.items()}
        raise KeyError(name)

    def _pod(self, key: str) -> Pod:
        for pod in self.state.pods:
            if pod.key == key:
                return pod
        raise KeyError(f"pod {key!r} does not exist")

    def _sandbox(self, key: str) -> dict:
        """How a pod is plugged in: its interfaces with their MACs, its address and gateway (what a
        CNI result reports)."""
        pod = self._pod(key)
        link = self.links.get(key)
        if link is None:
            raise KeyError(f"pod {key!r} has no interface (its network namespace is gone)")
        return {"pod": key, "node": pod.node, "address": str(pod.address), "prefixlen": 32,
                "gateway": podnet_pods.GATEWAY,
                "host": {"name": podnet_pods.host_ifname(key), "mac": _mac(link.node_mac)},
                "pod_interface": {"name": podnet_pods.pod_ifname(pod), "mac": _mac(link.mac),
                                  "sandbox": podnet_pods.pod_netns(self.state.node(pod.node), pod)},
                "identity": self.compiled.identities.get(key)}

    def _service_rows(self) -> list[dict]:
        return self.services.rows(self.state, self.dataplanes) if self.services is not None else []

    def _endpoint(self, key: str) -> dict:
        endpoint = self.compiled.endpoints.get(key)
        if endpoint is None:
            raise KeyError(f"pod {key!r} does not exist")
        dataplane = self.dataplanes.get(endpoint.node)
        hits = dataplane.policy_hits() if dataplane else {}
        return describe_endpoint(self.compiled, key, hits)


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _non_negative(params: dict, name: str) -> int:
    try:
        value = int(params.get(name) or 0)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {params.get(name)!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{name}: {value} is negative")
    return value


def scope_clients(state: PodnetState, compiled: CompiledPolicy,
                  local: Callable[[str], bool] = lambda node: True) -> dict[int, tuple[str, int]]:
    """The network namespaces of the nodes this agent programs (`local`) and of their pods, whose
    sockets its socket LB translates: netns cookie -> the address and identity their TRANSLATED
    flow events carry. (Another node's agent translates the sockets of its own pods.)"""
    clients = {netns_cookie(n.netns): (str(n.router_address), HOST) for n in state.nodes if local(n.name)}
    for pod in (p for p in state.pods if local(p.node)):
        ns = podnet_pods.pod_netns(state.node(pod.node), pod)
        if pod.sandbox is not None and not podnet_pods.netns_exists(ns):
            continue
        clients[netns_cookie(ns)] = (
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
