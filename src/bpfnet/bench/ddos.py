"""DDoS rule throughput: bpfnet's compiled tcpdump rules in XDP against the XDP_DROP ceiling and
the peers an operator would reach for instead: xdp-filter (xdp-tools' XDP filter), nftables
netdev ingress rules and iptables raw PREROUTING rules, with the matching rule last.

Each peer is configured as its own users would for the rule set at hand: xdp-filter with the
narrowest feature set that covers it (`-f udp` for UDP ports: its UDP-only object; `-f ipv4` for
source addresses), nftables with the ports or networks in one set. Besides the live figures,
`kernel_table` gives every BPF program's in-kernel ns per packet (BPF_PROG_TEST_RUN, interleaved
rounds) next to a trivial XDP_DROP program: the table of issue #20."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from bpfnet.bench.baseline import Bench, iptables_counter, nft_counter, test_run_ns
from bpfnet.bench.harness import Sample, Scenario
from bpfnet.bench.trafficgen import Flows
from bpfnet.ddos.config import Rule
from bpfnet.ddos.dataplane import DdosDataplane
from bpfnet.ebpf import Program, ProgType, asm
from bpfnet.netns import inside
from bpfnet.netns.runtime import netns_path

MATCH = "udp dst port 9"  # what the generator sends
SOURCES = Flows("198.51.100.1", addresses=256)  # the generator's sources
SOURCE_NETWORK = "198.51.100.0/23"  # holds them all: the matching "net" rule
MISS_PORT_BASE = 10000
MISS_PORT = 7  # a destination port no port rule names: the no-match path
LIBXDP_WORKDIR = Path("/sys/fs/bpf/xdp")  # where libxdp (xdp-filter's loader) pins its dispatchers


def miss_networks(count: int) -> list[str]:
    """The source networks of the `count - 1` "net" rules in front of the matching one."""
    return [f"10.{i // 256}.{i % 256}.0/24" for i in range(count - 1)]


def miss_ports(count: int) -> list[int]:
    """The destination ports of the `count - 1` rules in front of the matching one (port 9)."""
    return [MISS_PORT_BASE + i for i in range(count - 1)]


def source_addresses() -> list[str]:
    first = ipaddress.IPv4Address(SOURCES.first_address)
    return [str(first + i) for i in range(SOURCES.addresses)]


def miss_addresses(count: int) -> list[str]:
    """xdp-filter's exact addresses in front of the generator's sources, `count` in all."""
    return [f"10.{i // 256}.{i % 256}.1" for i in range(count - SOURCES.addresses)]


def rule_set(count: int, kind: str = "port") -> list[Rule]:
    """`count` rules of which only the last matches the generated traffic. "port" rules differ by
    destination port (`udp dst port N`); "net" rules by source network (`src net N`, the last one
    holding the generator's sources; the stage runs them as one prefix lookup)."""
    def miss(i: int) -> str:
        return f"udp dst port {MISS_PORT_BASE + i}" if kind == "port" else f"src net {miss_networks(count)[i]}"

    last = MATCH if kind == "port" else f"src net {SOURCE_NETWORK}"
    return [Rule(id=i + 1, expr=miss(i)) for i in range(count - 1)] + [Rule(id=count, expr=last)]


MIXED_PORTS = 50  # destination ports the mixed rules spread over (from 1000)


def mixed_rule(i: int) -> tuple[str, str, str, int | None]:
    """The `i`-th rule of a mixed set: (expression, the address xdp-filter gets for it, its mode,
    its destination port or None). Six shapes in turn: source or destination networks, IPv4 and
    IPv6, alone or with a protocol, with or without a destination port; none holds the generator's
    traffic."""
    x, y, port = i // 256, i % 256, 1000 + i % MIXED_PORTS
    return [(f"src net 10.{x}.{y}.0/24 and udp", f"10.{x}.{y}.0", "src", None),
            (f"src net 10.{x}.{y}.0/24 and tcp dst port {port}", f"10.{x}.{y}.0", "src", port),
            (f"src net 2001:db8:{x:x}:{y:x}::/64 and udp dst port {port}", f"2001:db8:{x:x}:{y:x}::", "src", port),
            (f"dst net 172.{16 + x}.{y}.0/24 and tcp", f"172.{16 + x}.{y}.0", "dst", None),
            (f"ip6 src net 2001:db9:{x:x}:{y:x}::/64", f"2001:db9:{x:x}:{y:x}::", "src", None),
            (f"src net 10.{100 + x}.{y}.0/24 and dst port {port}", f"10.{100 + x}.{y}.0", "src", port)][i % 6]


MIXED_MATCH = f"src net {SOURCE_NETWORK} and udp dst port 9"  # the last rule: the generator's traffic


def mixed_rule_set(count: int) -> list[Rule]:
    """`count` rules of mixed fields (`mixed_rule`), the last one matching the generated traffic."""
    return [Rule(id=i + 1, expr=mixed_rule(i)[0]) for i in range(count - 1)] + [Rule(id=count, expr=MIXED_MATCH)]


def iptables_rules(count: int) -> str:
    """iptables-restore input: `count` raw PREROUTING drop rules, the matching one last."""
    rules = [f"-A PREROUTING -p udp --dport {port} -j DROP" for port in [*miss_ports(count), 9]]
    return "\n".join(["*raw", *rules, "COMMIT", ""])


def xdp_filter_drops(status: str) -> int:
    """XDP_DROP packets in `xdp-filter status` output."""
    found = re.search(r"XDP_DROP\s+(\d+) pkts", status)
    if not found:
        raise RuntimeError(f"no XDP_DROP counter in xdp-filter status: {status[:200]!r}")
    return int(found.group(1))


def xdp_program_id(loader_status: str, dev: str) -> int:
    """The id of the XDP program on `dev` in `xdp-loader status` output (the one behind libxdp's
    dispatcher where there is one: the first "=>" line after the device's)."""
    lines = loader_status.splitlines()
    for i, line in enumerate(lines):
        fields = line.split()
        if fields[:1] != [dev] or len(fields) < 4:
            continue
        if fields[1] == "xdp_dispatcher":
            behind = next((later.split() for later in lines[i + 1:] if later.strip().startswith("=>")), None)
            if behind and len(behind) >= 4 and behind[3].isdigit():
                return int(behind[3])
        elif fields[3].isdigit():
            return int(fields[3])
    raise RuntimeError(f"no XDP program on {dev} in xdp-loader status: {loader_status[:300]!r}")


def nft_rules(count: int, kind: str = "port") -> str:
    """The same rules for nftables netdev ingress, as an nftables user would write them: the ports
    in one set, the source networks in one interval set."""
    if kind == "mixed":
        return _nft_mixed(count)
    if kind == "port":
        lines = ["        udp dport @ports counter drop"]
        sets = ("    set ports {\n        type inet_service;\n        elements = { "
                + ", ".join(str(port) for port in [*miss_ports(count), 9]) + " }\n    }\n")
    else:
        lines = ["        ip saddr @nets counter drop"]
        sets = ("    set nets {\n        type ipv4_addr; flags interval;\n        elements = { "
                + ", ".join([*miss_networks(count), SOURCE_NETWORK]) + " }\n    }\n")
    return ("table netdev bench {\n" + sets + "    chain in {\n        type filter hook ingress device s0 priority 0;\n"
            + "\n".join(lines) + "\n    }\n}\n")


def _nft_mixed(count: int) -> str:
    """A mixed set for nftables as its users would write it: one concatenated interval set per
    shape (address . protocol [. port]), one lookup each. (All rules drop, so the order between
    shapes does not matter here; with mixed actions nftables needs a rule per stretch.)"""
    sets: dict[str, tuple[str, str, list[str]]] = {
        "v4p": ("ipv4_addr . inet_proto", "ip saddr . meta l4proto", []),
        "v4pp": ("ipv4_addr . inet_proto . inet_service", "ip saddr . meta l4proto . th dport", []),
        "v6pp": ("ipv6_addr . inet_proto . inet_service", "ip6 saddr . meta l4proto . th dport", []),
        "v4dp": ("ipv4_addr . inet_proto", "ip daddr . meta l4proto", []),
        "v6": ("ipv6_addr", "ip6 saddr", [])}
    for i in range(count - 1):
        expr, address, _, port = mixed_rule(i)
        network = expr.split(" net ")[1].split()[0]
        shape = i % 6
        if shape == 0:
            sets["v4p"][2].append(f"{network} . udp")
        elif shape in (1, 5):
            sets["v4pp"][2].extend(f"{network} . {proto} . {port}"
                                   for proto in (("tcp",) if shape == 1 else ("tcp", "udp", "sctp")))
        elif shape == 2:
            sets["v6pp"][2].append(f"{network} . udp . {port}")
        elif shape == 3:
            sets["v4dp"][2].append(f"{network} . tcp")
        else:
            sets["v6"][2].append(network)
    sets["v4pp"][2].append(f"{SOURCE_NETWORK} . udp . 9")
    text = "table netdev bench {\n"
    rules = []
    for name, (kind, selector, elements) in sets.items():
        if not elements:
            continue
        text += (f"    set {name} {{\n        type {kind}; flags interval;\n        elements = {{ "
                 + ", ".join(elements) + " }\n    }\n")
        rules.append(f"        {selector} @{name} counter drop")
    return (text + "    chain in {\n        type filter hook ingress device s0 priority 0;\n"
            + "\n".join(rules) + "\n    }\n}\n")


MIXED_PEER_NOTE = ("xdp-filter cannot express a mixed rule: it has no networks (exact addresses only) and no "
                   "conjunctions (a packet is dropped when any one of its address, port or MAC entries "
                   "matches). Its column is the object for IPv4, IPv6, TCP and UDP (`-f ipv4,ipv6,udp,tcp`) "
                   "holding each rule's address and port as separate entries: the cost of the same lookups, "
                   "not the same filter.")
KERNEL_REPEAT = 1_000_000
XDP_DROP = 1


@dataclass(frozen=True)
class KernelRow:
    """One rule set's in-kernel ns per packet: bpfnet's stage, xdp-filter (its object) and the floor."""

    name: str
    bpfnet: float
    xdp_filter: float
    floor: float
    xdp_filter_object: str

    @property
    def ratio(self) -> float:
        return self.bpfnet / self.xdp_filter


def kernel_markdown(rows: list[KernelRow]) -> list[str]:
    """The table of issue #20 as markdown lines (ns to a tenth: see `per_packet_ns`)."""
    lines = ["| rule set | bpfnet | xdp-filter (object) | trivial XDP_DROP | bpfnet / xdp-filter |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.bpfnet:.1f} ns | {r.xdp_filter:.1f} ns (`{r.xdp_filter_object}`) | {r.floor:.1f} ns "
              f"| {r.ratio:.2f}× |" for r in rows]
    return lines


def per_packet_ns(program: Program, frame: bytes, repeat: int = KERNEL_REPEAT) -> float:
    """In-kernel ns per run of `program` on `frame`, to a fraction of a ns: the CPU time of this
    thread over one BPF_PROG_TEST_RUN of `repeat` runs, divided by `repeat`. The kernel's own figure
    is whole ns (truncated), which moves a ratio of two 10 ns programs by up to 0.2; the thread's
    CPU time leaves out time it was scheduled away, like the kernel's timer, and the call's fixed
    cost (a few µs) is a few thousandths of a ns per run. Checked against the kernel's figure."""
    start = time.thread_time_ns()
    result = program.test_run(frame, repeat=repeat)
    spent = (time.thread_time_ns() - start) / repeat
    if not result.duration_ns - 1 <= spent <= result.duration_ns + 2:  # (the kernel truncates)
        return float(result.duration_ns)  # preempted inside the call's fixed part: the kernel's whole ns
    return spent


class DdosBench:
    def __init__(self, bench: Bench, rule_counts: tuple[int, ...] = (1, 1000), worst_case: int = 1000,
                 mixed: tuple[int, ...] = ()) -> None:
        self.bench = bench
        self.generator = bench.traffic(SOURCES)
        self.stages: dict[tuple[int, str], DdosDataplane] = {}
        for count, kind in ([(c, "port") for c in rule_counts] + ([(worst_case, "net")] if worst_case else [])
                            + [(c, "mixed") for c in mixed]):
            stage = DdosDataplane.load()
            stage.deploy(mixed_rule_set(count) if kind == "mixed" else rule_set(count, kind))
            self.stages[count, kind] = stage

    def ddos(self, count: int, frames: int, kind: str = "port") -> Sample:
        stage = self.stages[count, kind]  # (the matching rule's id is `count`)
        kernel = test_run_ns(stage.entry, self.generator.frame(0))
        with inside(self.bench.sink), stage.attach(self.bench.s0):
            return self.bench.rate(self.generator, frames, lambda: stage.counters(count).packets, kernel)

    def nftables(self, count: int, frames: int, kind: str = "port") -> Sample:
        topology, sink = self.bench.topology, self.bench.sink
        topology.run(sink, ["nft", "-f", "-"], input=nft_rules(count, kind))
        try:
            return self.bench.rate(self.generator, frames, lambda: nft_counter(topology, sink))
        finally:
            topology.run(sink, ["nft", "delete", "table", "netdev", "bench"])

    def iptables(self, count: int, frames: int) -> Sample:
        topology, sink = self.bench.topology, self.bench.sink
        topology.run(sink, ["iptables-restore", "--noflush"], input=iptables_rules(count))
        try:
            return self.bench.rate(self.generator, frames, lambda: iptables_counter(topology, sink))
        finally:
            topology.run(sink, ["iptables", "-t", "raw", "-F", "PREROUTING"])

    def xdp_filter(self, count: int, frames: int) -> Sample:
        with self._xdp_filter(count) as (drops, program):
            kernel = test_run_ns(program, self.generator.frame(0))
            return self.bench.rate(self.generator, frames, drops, kernel)

    @contextmanager
    def _xdp_filter(self, count: int, kind: str = "port") -> Iterator[tuple[Callable[[], int], Program]]:
        """xdp-filter on the sink's veth with the narrowest feature set for the rules: UDP to the
        same ports as the rule set (`-f udp`: its UDP-only object), or `count` exact source
        addresses, the generator's among them (`-f ipv4`). It runs in the sink's network namespace
        but the machine's mount namespace (nsenter, not `ip netns exec`), where its pins live."""
        def tool(*args: str, name: str = "xdp-filter", check: bool = True) -> str:
            return self.bench.topology.run(None, ["nsenter", f"--net={netns_path(self.bench.sink)}", name, *args],
                                           check=check).stdout
        made_workdir = not LIBXDP_WORKDIR.exists()
        features = {"port": "udp", "net": "ipv4", "mixed": "ipv4,ipv6,udp,tcp"}[kind]
        tool("load", "s0", "-m", "native", "-f", features)
        try:
            if kind == "port":
                for port in [*miss_ports(count), 9]:
                    tool("port", str(port), "-m", "dst", "-p", "udp")
            elif kind == "mixed":  # each rule's fields as separate entries (see MIXED_PEER_NOTE)
                ports = {9}
                for i in range(count - 1):
                    _, address, mode, rule_port = mixed_rule(i)
                    tool("ip", address, "-m", mode)
                    ports |= {rule_port} if rule_port is not None else set()
                for address in source_addresses():
                    tool("ip", address, "-m", "src")
                for port in sorted(ports):
                    tool("port", str(port), "-m", "dst", "-p", "tcp,udp")
            else:
                for address in [*miss_addresses(count), *source_addresses()]:
                    tool("ip", address, "-m", "src")
            with Program.from_id(xdp_program_id(tool("status", "s0", name="xdp-loader"), "s0")) as program:
                # (status exits non-zero when the object has no address maps, after printing the counters)
                yield (lambda: xdp_filter_drops(tool("status", check=False))), program
        finally:
            tool("unload", "s0")
            if made_workdir:  # libxdp leaves its (empty) pin directory behind
                with contextlib.suppress(OSError):
                    LIBXDP_WORKDIR.rmdir()

    def kernel_table(self, counts: tuple[int, ...], networks: int, rounds: int,
                     repeat: int = KERNEL_REPEAT, mixed: tuple[int, ...] = ()) -> list[KernelRow]:
        """In-kernel ns per packet (BPF_PROG_TEST_RUN, `repeat` runs a call, medians of `rounds`
        interleaved rounds) of bpfnet's stage and xdp-filter for port rule sets of `counts` rules
        and `networks` source-address rules, the match last, and for a packet no port rule
        matches, next to a trivial XDP_DROP program (the floor). Both programs leave the frame as
        it is, so repeated runs on one buffer are the same packet each time."""
        hit, miss = self.generator.frame(0), self.bench.template(UDP(sport=1024, dport=MISS_PORT))
        cases: list[tuple[str, list[Rule], str, int, bytes]] = [
            (f"{count:,} port rule{'s' if count > 1 else ''}, the last matches", rule_set(count), "port", count, hit)
            for count in counts]
        cases.append((f"{networks:,} source networks (xdp-filter: {networks:,} exact addresses)",
                      rule_set(networks, "net"), "net", networks, hit))
        cases.append((f"no match, {max(counts):,} port rules", rule_set(max(counts)), "port", max(counts), miss))
        miss6 = bytes(Ether() / IPv6(src="2001:db8:ffff::1", dst="2001:db8::2") / UDP(sport=1024, dport=MISS_PORT))
        for count in mixed:
            cases.append((f"{count:,} mixed rules, the last matches", mixed_rule_set(count), "mixed", count, hit))
        if mixed:
            cases.append((f"no match (IPv6), {max(mixed):,} mixed rules", mixed_rule_set(max(mixed)), "mixed",
                          max(mixed), miss6))
        out = asm.Assembler()
        out.emit(asm.mov64(asm.R0, XDP_DROP), asm.exit_insn())
        programs: list[tuple[Program, Program, bytes]] = []
        with contextlib.ExitStack() as stack:
            floor = stack.enter_context(Program.load_raw(ProgType.XDP, out.assemble(), name="xdp_drop"))
            peers: dict[tuple[str, int], Program] = {}
            for _, rules, kind, count, frame in cases:
                stage = stack.enter_context(DdosDataplane.load())
                stage.deploy(rules)
                if (kind, count) not in peers:
                    with self._xdp_filter(count, kind) as (_, program):
                        peers[kind, count] = stack.enter_context(Program.from_id(program.id))
                programs.append((stage.entry, peers[kind, count], frame))
            times: list[list[list[float]]] = [[[], [], []] for _ in cases]
            for _ in range(rounds):
                for row, (ours, peer, frame) in enumerate(programs):
                    for column, program in enumerate((ours, peer, floor)):
                        times[row][column].append(per_packet_ns(program, frame, repeat))
            return [KernelRow(case[0], statistics.median(row[0]), statistics.median(row[1]), statistics.median(row[2]),
                              program[1].name) for case, row, program in zip(cases, times, programs, strict=True)]

    def ceiling(self, frames: int) -> Sample:
        kernel = test_run_ns(self.bench.sink_objects.programs["xdp_count_drop"], self.generator.frame(0))
        with self.bench.xdp("xdp_count_drop"):
            return self.bench.rate(self.generator, frames, self.bench.seen, kernel)

    def close(self) -> None:
        for stage in self.stages.values():
            stage.close()


def scenarios(bench: DdosBench, frames: int) -> list[Scenario]:
    def each(make: Callable[..., Sample], count: int, *args: str) -> Callable[[], Sample]:
        return lambda: make(count, frames, *args)

    result = [Scenario("XDP drop ceiling", lambda: bench.ceiling(frames), note="reference")]
    for count, kind in sorted(bench.stages):
        if kind == "mixed":
            result.append(Scenario(f"bpfnet ddos, {count} mixed rules", each(bench.ddos, count, "mixed"),
                                   note="networks + protocol + ports, v4/v6; the last matches (tuple lookups)"))
            result.append(Scenario(f"nftables netdev, {count} mixed rules", each(bench.nftables, count, "mixed"),
                                   note="a concatenated interval set per shape"))
            continue
        if kind == "net":
            result.append(Scenario(f"bpfnet ddos, {count} source-net rules",
                                   each(bench.ddos, count, "net"),
                                   note="match in the last network; the networks are one prefix lookup"))
            result.append(Scenario(f"nftables netdev, {count} source nets", each(bench.nftables, count, "net"),
                                   note="the networks in one interval set"))
            continue
        shape = "one straight program" if bench.stages[count, kind].active().chunks == 1 else "grouped by port"
        result.append(Scenario(f"bpfnet ddos, {count} rule(s)", each(bench.ddos, count),
                               note=f"match in the last rule ({shape})"))
        result.append(Scenario(f"xdp-filter, {count} port(s)", each(bench.xdp_filter, count),
                               note="xdp-tools: one port-map lookup"))
        result.append(Scenario(f"nftables netdev, {count} port(s)", each(bench.nftables, count),
                               note="the ports in one set: one lookup"))
        result.append(Scenario(f"iptables raw, {count} rule(s)", each(bench.iptables, count),
                               note="a rule per port, the match last (a port set needs ipset)"))
    return result
