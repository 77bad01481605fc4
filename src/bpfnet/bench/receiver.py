"""CPU time per packet on the receiving side of a veth, for benchmarks whose traffic source is
slower than the receiver (then packets per second only measure the source).

A veth receives through NAPI once GRO is on or an XDP program is attached. With
`/sys/class/net/DEV/threaded` set, that NAPI runs in its own kernel thread (`napi/DEV-<id>`): pinned
to one CPU while the generator runs on another, everything the receiver does per packet — XDP, tc,
netfilter, forwarding — is charged to that thread, and /proc/PID/schedstat gives its CPU time in
nanoseconds. The sending veth gets TSO off: veth hands a TSO-capable sender's skbs to the backlog of
the sending CPU instead of the receiver's NAPI.
"""

from __future__ import annotations

import os
from pathlib import Path

from bpfnet.netns import Topology

RECEIVER_CPU, SENDER_CPU = 1, 0


def napi_threads(dev: str) -> set[int]:
    """PIDs of the threaded-NAPI kernel threads of devices named `dev` (in any namespace)."""
    found = set()
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().startswith(f"napi/{dev}-"):
                found.add(int(comm.parent.name))
        except OSError:
            continue  # the process ended meanwhile
    return found


def thread_cpu_ns(pid: int) -> int:
    """CPU time the thread has run, in ns (the first field of /proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


class ReceiverCpu:
    """The CPU cost of `dev`'s receive path in namespace `ns`, fed by `peer_dev` in `peer_ns`."""

    def __init__(self, topology: Topology, ns: str, dev: str, peer_ns: str, peer_dev: str,
                 cpu: int = RECEIVER_CPU, sender_cpu: int = SENDER_CPU) -> None:
        self.topology, self.ns, self.dev = topology, ns, dev
        cpus = os.cpu_count() or 1
        self.cpu, self.sender_cpu = cpu % cpus, sender_cpu % cpus
        topology.run(peer_ns, ["ethtool", "-K", peer_dev, "tso", "off"])
        topology.run(ns, ["ethtool", "-K", dev, "gro", "on"])  # NAPI with or without XDP
        before = napi_threads(dev)
        # `ip netns exec` mounts the namespace's own /sys: the file of this namespace's device
        topology.run(ns, ["sh", "-c", f"echo 1 > /sys/class/net/{dev}/threaded"])
        found = napi_threads(dev) - before or napi_threads(dev)
        if len(found) != 1:
            raise RuntimeError(f"threaded NAPI of {dev} in {ns}: expected one kernel thread, found "
                               f"{sorted(found) or 'none'}")
        self.pid = found.pop()
        os.sched_setaffinity(self.pid, {self.cpu})

    def pin_sender(self) -> None:
        """Run the calling thread (the generator's) on the other CPU than the receiver."""
        os.sched_setaffinity(0, {self.sender_cpu})

    def read(self) -> int:
        return thread_cpu_ns(self.pid)
