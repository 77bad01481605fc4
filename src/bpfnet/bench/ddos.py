"""DDoS rule throughput: bpfnet's compiled tcpdump rules in XDP against the XDP_DROP ceiling and
nftables netdev ingress rules, with the matching rule first and behind 999 others."""

from __future__ import annotations

from collections.abc import Callable

from bpfnet.bench.baseline import Bench, nft_counter
from bpfnet.bench.harness import Scenario
from bpfnet.bench.trafficgen import Flows, TrafficGenerator
from bpfnet.ddos.config import Rule
from bpfnet.ddos.dataplane import DdosDataplane
from bpfnet.netns import inside

MATCH = "udp dst port 9"  # what the generator sends


def rule_set(count: int, kind: str = "port") -> list[Rule]:
    """`count` rules of which only the last matches the generated traffic. "port" rules differ by
    destination port (the stage groups them by port); "net" rules by source network (they can
    match any port, so every packet walks them: the worst case)."""
    def miss(i: int) -> str:
        return f"udp dst port {10000 + i}" if kind == "port" else f"src net 10.{i // 256}.{i % 256}.0/24"

    return [Rule(id=i + 1, expr=miss(i)) for i in range(count - 1)] + [Rule(id=count, expr=MATCH)]


def nft_rules(count: int) -> str:
    lines = [f"        udp dport {10000 + i} counter drop" for i in range(count - 1)]
    lines.append("        udp dport 9 counter drop")
    return ("table netdev bench {\n    chain in {\n        type filter hook ingress device s0 priority 0;\n"
            + "\n".join(lines) + "\n    }\n}\n")


class DdosBench:
    def __init__(self, bench: Bench, rule_counts: tuple[int, ...] = (1, 1000), worst_case: int = 1000) -> None:
        self.bench = bench
        self.generator = TrafficGenerator(bench.template(), Flows("198.51.100.1", addresses=256))
        self.stages: dict[tuple[int, str], DdosDataplane] = {}
        for count, kind in [(c, "port") for c in rule_counts] + ([(worst_case, "net")] if worst_case else []):
            stage = DdosDataplane()
            stage.deploy(rule_set(count, kind))
            self.stages[count, kind] = stage

    def ddos(self, count: int, frames: int, kind: str = "port") -> float:
        stage = self.stages[count, kind]
        with inside(self.bench.sink), stage.attach(self.bench.s0):
            return self.bench.rate(self.generator, frames, lambda: stage.counters(count).packets)

    def nftables(self, count: int, frames: int) -> float:
        topology, sink = self.bench.topology, self.bench.sink
        topology.run(sink, ["nft", "-f", "-"], input=nft_rules(count))
        try:
            with self.bench.xdp("xdp_pass"):
                return self.bench.rate(self.generator, frames, lambda: nft_counter(topology, sink))
        finally:
            topology.run(sink, ["nft", "delete", "table", "netdev", "bench"])

    def ceiling(self, frames: int) -> float:
        with self.bench.xdp("xdp_count_drop"):
            return self.bench.rate(self.generator, frames, self.bench.seen)

    def close(self) -> None:
        for stage in self.stages.values():
            stage.close()
        self.generator.close()


def scenarios(bench: DdosBench, frames: int) -> list[Scenario]:
    def each(make: Callable[[int], float], count: int) -> Callable[[], float]:
        return lambda: make(count, frames)

    result = [Scenario("XDP drop ceiling", lambda: bench.ceiling(frames), note="reference")]
    for count, kind in sorted(bench.stages):
        if kind == "net":
            result.append(Scenario(f"bpfnet ddos, {count} source-net rules",
                                   lambda count=count: bench.ddos(count, frames, "net"),
                                   note="not groupable by port: every packet walks them"))
            continue
        result.append(Scenario(f"bpfnet ddos, {count} rule(s)", each(bench.ddos, count),
                               note="match in the last rule (grouped by port)"))
        result.append(Scenario(f"nftables netdev, {count} rule(s)", each(bench.nftables, count),
                               note="match in the last rule"))
    return result
