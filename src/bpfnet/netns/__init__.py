"""Network namespaces: building them (`topology`: namespaces, veth pairs, bridges, addresses,
routes, with pyroute2) and running code and commands in them (`runtime`)."""

from bpfnet.netns.runtime import (
    TopologyError,
    inside,
    list_netns,
    namespace_pids,
    netns_cookie,
    ping,
    popen,
    run,
)
from bpfnet.netns.topology import (
    Topology,
    cleanup,
    namespace_owner,
    owned_root_links,
)

__all__ = ["Topology", "TopologyError", "cleanup", "inside", "list_netns", "namespace_owner",
           "namespace_pids", "netns_cookie", "owned_root_links", "ping", "popen", "run"]
