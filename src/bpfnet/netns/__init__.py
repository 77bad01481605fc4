"""Topology helpers: network namespaces, veth pairs, bridges, addresses, routes (pyroute2)."""

from bpfnet.netns.topology import (
    Topology,
    TopologyError,
    cleanup,
    inside,
    list_netns,
    namespace_owner,
    namespace_pids,
    netns_cookie,
    owned_root_links,
    ping,
    popen,
    run,
)

__all__ = ["Topology", "TopologyError", "cleanup", "inside", "list_netns", "namespace_owner",
           "namespace_pids", "netns_cookie", "owned_root_links", "ping", "popen", "run"]
