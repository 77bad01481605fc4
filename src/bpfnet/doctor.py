"""`bpfnet doctor`: checks, with real probes, that this machine can run every bpfnet app."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bpfnet.ebpf import MapType, ObjectSpec, ProgType, _libbpf, cgroup2_root, pins

# BPF helper ids (include/uapi/linux/bpf.h) the data planes call.
HELPERS = {"fib_lookup": 69, "redirect_peer": 155, "redirect_neigh": 152, "ringbuf_reserve": 131,
           "xdp_adjust_head": 44, "skb_adjust_room": 50, "get_netns_cookie": 122,
           "tail_call": 12, "ktime_get_ns": 5}
# the last two: bench peers
TOOLS = ["clang-16", "bpftool", "tcpdump", "nft", "iptables", "ip", "ethtool", "xdp-filter", "iperf3"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _check(name: str, probe: Callable[[], str], required: bool = True) -> Check:
    try:
        return Check(name, True, probe() or "ok", required)
    except Exception as error:  # a failed probe is a result, not a crash
        return Check(name, False, str(error).splitlines()[0], required)


def _kernel() -> str:
    release = platform.release()
    major, minor = (int(x) for x in release.split(".")[:2])
    if (major, minor) < (6, 6):
        raise RuntimeError(f"Linux {release}: bpfnet needs 6.6 or later (tcx links)")
    return release


def _jit() -> str:
    value = Path("/proc/sys/net/core/bpf_jit_enable").read_text().strip()
    if value == "0":
        raise RuntimeError("BPF JIT is off: sysctl net.core.bpf_jit_enable=1")
    return "enabled"


def _root() -> str:
    if os.geteuid() != 0:
        raise RuntimeError("not root: the kernel requires CAP_BPF and CAP_NET_ADMIN")
    return "uid 0"


def _map_types() -> str:
    wanted = [MapType.HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH, MapType.LPM_TRIE,
              MapType.PROG_ARRAY, MapType.RINGBUF, MapType.DEVMAP_HASH]
    missing = [t.name for t in wanted if _libbpf.lib.libbpf_probe_bpf_map_type(int(t), None) != 1]
    if missing:
        raise RuntimeError(f"missing map types: {', '.join(missing)}")
    return f"{len(wanted)} types"


def _helpers() -> str:
    missing = [name for name, helper in HELPERS.items()
               if _libbpf.lib.libbpf_probe_bpf_helper(int(ProgType.XDP if name != "redirect_peer"
                                                           else ProgType.SCHED_CLS), helper, None) != 1
               and name not in ("skb_adjust_room", "redirect_neigh", "get_netns_cookie")]
    if missing:
        raise RuntimeError(f"missing helpers: {', '.join(missing)}")
    return f"{len(HELPERS)} helpers"


def _objects() -> str:
    names = ["bench_sink", "trafficgen", "runtime_check"]
    for name in names:
        ObjectSpec.builtin(name).load().close()
    built = sorted(p.stem for p in (Path(__file__).parent / "bpf" / "build").glob("*.o"))
    return f"{len(built)} objects load ({', '.join(built)})"


@contextmanager
def _veth_pair() -> Iterator[tuple[int, int]]:
    """A throwaway veth pair in this namespace: (ifindex, peer ifindex); removed afterwards."""
    name = f"doc{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"],
                   check=True, capture_output=True)
    try:
        for dev in (name, name + "p"):  # no IPv6: its neighbour discovery would add frames
            Path(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6").write_text("1")
            subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        yield socket.if_nametoindex(name), socket.if_nametoindex(name + "p")
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


def _attach() -> str:
    """XDP native and tcx on a throwaway veth pair."""
    with _veth_pair() as (_, peer), ObjectSpec.builtin("runtime_check").load() as obj, \
            obj.programs["xdp_check"].attach_xdp(peer, "native"), obj.programs["tc_check"].attach_tcx(peer, "ingress"):
        return "XDP native and tcx on veth"


GENERATOR_FRAMES = 100


def _generator() -> str:
    """The traffic generator (the backend this kernel allows) sends through a veth into XDP."""
    from bpfnet.bench.trafficgen import Flows, TrafficGenerator, udp_frame

    with _veth_pair() as (ifindex, peer), ObjectSpec.builtin("bench_sink").load() as sink, \
            sink.programs["xdp_count_drop"].attach_xdp(peer, "native"):
        frame = udp_frame(b"\x02" * 6, b"\x02" * 6, "192.0.2.1", "192.0.2.2", 1024, 9)
        with TrafficGenerator(frame, Flows("192.0.2.1", addresses=10)) as generator:
            generator.send(ifindex, GENERATOR_FRAMES)
            backend = generator.backend.value
        deadline = time.monotonic() + 1
        while (seen := sum(struct.unpack("<Q", v)[0] for v in sink.maps["seen"].lookup(b"\0" * 4))) \
                < GENERATOR_FRAMES and time.monotonic() < deadline:
            time.sleep(0.01)
    if seen < GENERATOR_FRAMES:
        raise RuntimeError(f"{backend} generator: {seen} of {GENERATOR_FRAMES} frames reached XDP on the peer")
    return f"{backend} backend: {seen}/{GENERATOR_FRAMES} frames reached XDP through a veth"


def _live_frames() -> str:
    """XDP live frames (BPF_PROG_TEST_RUN sending for real): the fastest generator, optional."""
    from bpfnet.bench.trafficgen import live_frames_denied

    reason = live_frames_denied()
    if reason:
        raise RuntimeError(f"denied ({reason}): the lab and benchmarks send with AF_PACKET sendmmsg() batches "
                           "instead, at a lower rate; benchmarks compare CPU time per packet")
    return "allowed: the traffic generator sends with live frames"


def _syn_cookies() -> str:
    """What syncookie rules need (docs/ddos.md): the ddos object with its cookie helpers and
    conntrack kfuncs loads, nftables accepts the SYNPROXY table (checked, not applied), conntrack
    answers over netlink; and the window scale this namespace's servers use."""
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket

    from bpfnet.ddos.dataplane import DdosDataplane
    from bpfnet.ddos.synproxy import Advertised, Synproxy, ruleset

    DdosDataplane.load().close()
    table = ruleset({"lo": Advertised()}, frozenset({80}), "1")
    checked = subprocess.run(["nft", "-c", "-f", "-"], input=table, capture_output=True, text=True)
    if checked.returncode:
        raise RuntimeError(f"nftables refuses the SYNPROXY table: {checked.stderr.strip()}")
    with NFCTSocket() as conntrack:
        conntrack.count()
    scale = Synproxy().measure(["lo"])["lo"].wscale
    return (f"cookie helpers and conntrack kfuncs load, nftables SYNPROXY and ctnetlink answer; "
            f"servers here use window scale {scale}")


def _bpffs() -> str:
    pins.ensure_bpffs()
    return str(pins.BPFFS)


def _tools() -> str:
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        raise RuntimeError(f"missing: {', '.join(missing)} (run scripts/setup.sh)")
    return ", ".join(TOOLS)


def run_checks() -> list[Check]:
    return [
        _check("root", _root),
        _check("kernel", _kernel),
        _check("BPF JIT", _jit),
        _check("bpffs", _bpffs),
        _check("cgroup v2", lambda: str(cgroup2_root())),
        _check("map types", _map_types),
        _check("helpers", _helpers),
        _check("BPF objects", _objects),
        _check("attach", _attach),
        _check("traffic generator", _generator),
        _check("XDP live frames", _live_frames, required=False),
        _check("tools", _tools, required=False),
        _check("SYN cookies", _syn_cookies, required=False),
    ]
