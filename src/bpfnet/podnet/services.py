"""Services of the pod network: which backends each service has now (pure), and what serves them,
kept in step by the podnet controller: the socket load balancer (servicelb.py) for the cluster's
own sockets, and every node's tc fallback (pod/service.h) for the rest."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from bpfnet.ebpf import cgroup2_root
from bpfnet.podnet.config import PodnetState, Protocol, Service
from bpfnet.podnet.dataplane import NodeDataplane
from bpfnet.podnet.servicelb import Backend, ServiceEntry, SocketLoadBalancer

MAX_SERVICE_IDS = 4096  # sock_lb.bpf.c's counters array


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _port(state: PodnetState, svc: Service, pod_key: str, port: int | str | None) -> int | None:
    if port is None:  # a selector without target_port: the config refuses it
        return None
    if isinstance(port, int):
        return port
    return state.pod(pod_key).named_port(port, Protocol(svc.protocol))


def backends(state: PodnetState, svc: Service) -> tuple[Backend, ...]:
    """The service's backends as they are now: explicit ones, or the pods its selector matches
    (in name order, pods without an address yet or without the named port left out)."""
    wanted: list[tuple[str, int | str | None]]
    if svc.selector is None:
        wanted = [(f"{svc.namespace}/{b.pod}", b.port) for b in svc.backends]
    else:
        wanted = [(p.key, svc.target_port) for p in sorted(state.pods, key=lambda p: p.key)
                  if p.namespace == svc.namespace and _selects(svc.selector, p.labels)]
    found = []
    for key, port in wanted:
        pod = state.pod(key)
        number = _port(state, svc, key, port)
        if pod.address is not None and number is not None:
            found.append(Backend(str(pod.address), number))
    return tuple(found)


def service_ids(state: PodnetState) -> dict[str, int]:
    """A stable counter slot per service: a hash of its name, probing past collisions."""
    ids: dict[str, int] = {}
    taken: set[int] = set()
    for key in sorted(svc.key for svc in state.services):
        slot = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % MAX_SERVICE_IDS
        while slot in taken:
            slot = (slot + 1) % MAX_SERVICE_IDS
        taken.add(slot)
        ids[key] = slot
    return ids


def entries(state: PodnetState) -> list[ServiceEntry]:
    ids = service_ids(state)
    return [ServiceEntry(ids[svc.key], str(svc.address), svc.port, svc.protocol.lower(),
                         backends(state, svc), svc.affinity == "client-ip") for svc in state.services]


class ServiceTable:
    """The services of one agent: the socket load balancer (maps pinned in `pin_dir`, hooks on the
    cgroup v2 root, adopted after a restart), scoped to the cluster's network namespaces, and the
    service maps of every node's data plane."""

    def __init__(self, pin_dir: Path) -> None:
        pin_dir.mkdir(parents=True, exist_ok=True)
        self.pin_dir = pin_dir
        self.lb = SocketLoadBalancer.load(pin_dir=pin_dir, scoped=True)
        self.lb.attach(cgroup2_root(), pin_dir=pin_dir)

    def apply(self, state: PodnetState, dataplanes: Mapping[str, NodeDataplane],
              clients: Mapping[int, tuple[str, int]]) -> None:
        """Write the services everywhere; `clients`: the nodes' and pods' namespaces (netns cookie
        -> address, identity), whose sockets the socket LB translates (any other client is served
        by the tc fallback)."""
        wanted = entries(state)
        for dataplane in dataplanes.values():
            dataplane.apply_services(wanted)
        self.lb.set_scope(clients)
        self.lb.apply(wanted)

    def rows(self, state: PodnetState, dataplanes: Mapping[str, NodeDataplane]) -> list[dict]:
        """`service list`: each service with its backends, the socket LB's counters and the tc
        fallback's (flows and packets, summed over the nodes)."""
        ids = service_ids(state)
        rows = []
        for svc in state.services:
            fallback = [dp.service_counters(ids[svc.key]) for dp in dataplanes.values()]
            rows.append({"namespace": svc.namespace, "name": svc.name, "vip": svc.vip,
                         "backends": [f"{b.address}:{b.port}" for b in backends(state, svc)],
                         "affinity": svc.affinity, **self.lb.counters(ids[svc.key]),
                         "fallback_flows": sum(c["flows"] for c in fallback),
                         "fallback_packets": sum(c["packets"] for c in fallback)})
        return rows

    def close(self) -> None:
        self.lb.close()

    def detach(self) -> None:
        self.lb.detach()
