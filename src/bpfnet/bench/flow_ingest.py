"""Flow ingest for `bench services`: flow events a second the agent takes from a pod_flows ring
buffer the kernel fills, with the events lost counted, against issue #7's 1 M/s target; the
kernel producer alone and the previous per-record decode path for comparison."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpfnet.bench.harness import Scenario
from bpfnet.ebpf.ringbuf import RingBuffer
from bpfnet.podnet.config import Namespace, Node, Pod, PodnetState
from bpfnet.podnet.dataplane import EndpointLink, NodeDataplane, desired_maps, mac_bytes
from bpfnet.podnet.flow_collector import FlowCollector
from bpfnet.podnet.flows import FLOW_DTYPE, FlowStore, decode
from bpfnet.podnet.policy import compile_policy
from bpfnet.testing.conformance import policy

FLOW_TARGET = "issue #7 target"
RING_BURST = 40_000        # events per producer call: fewer than the 4 MiB ring's 47,662 records
PACED_BURST = 5_000        # events per producer call when paced (5 ms at 1 M/s)
PER_RECORD_EVENTS = 100_000   # the previous path takes over a second for these
LO = 1
SKB_CTX = 192              # a zeroed __sk_buff for the test runs
TC_ACT_SHOT = 2


class PolicyDropNode:
    """One node's pod data plane, attached nowhere, as a flow event source: pod_from_container, run
    by BPF_PROG_TEST_RUN on lo, drops x/a's SYN to y/b (whose ingress denies all) and so writes one
    event to the real pod_flows ring per run (drops are never aggregated)."""

    def __init__(self) -> None:
        self.dataplane = NodeDataplane.load()
        state = PodnetState(nodes=[Node(name="n1", pod_cidr="10.0.0.0/24")],
                            namespaces=[Namespace(name="x"), Namespace(name="y")],
                            pods=[Pod(namespace="x", name="a", node="n1", address="10.0.0.2"),
                                  Pod(namespace="y", name="b", node="n1", address="10.0.0.3")],
                            policies=[policy("deny", "y", types=["Ingress"])])
        links = {"x/a": EndpointLink(LO, mac_bytes("02:00:00:00:00:01"), mac_bytes("02:ff:00:00:00:01")),
                 "y/b": EndpointLink(LO + 1000, mac_bytes("02:00:00:00:00:02"), mac_bytes("02:ff:00:00:00:02"))}
        compiled = compile_policy(state)
        self.identities = compiled.identities
        self.dataplane.sync(desired_maps(compiled, "n1", links))

    @staticmethod
    def frame(sport: int = 40000) -> bytes:
        return bytes(Ether(src="02:00:00:00:00:01", dst="02:ff:00:00:00:01")
                     / IP(src="10.0.0.2", dst="10.0.0.3") / TCP(sport=sport, dport=80, flags="S"))

    def drop(self, count: int, sport: int = 40000) -> float:
        """`count` policy drops of the SYN from `sport` (one event each) -> seconds the runs took
        (the kernel's own clock)."""
        run = self.dataplane.from_container.test_run(self.frame(sport), ctx=bytes(SKB_CTX), repeat=count)
        if run.retval != TC_ACT_SHOT:
            raise RuntimeError(f"pod_from_container returned {run.retval}, expected a policy drop")
        return run.duration_ns * count / 1e9

    def close(self) -> None:
        self.dataplane.close()


class FlowIngestBench:
    """Flow events from the kernel (a PolicyDropNode) into the agent's store, by the podnet
    controller's path: a FlowCollector thread moving batches into a FlowStore."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.node = PolicyDropNode()
        self.dataplane = self.node.dataplane
        self.ring = RingBuffer(self.dataplane.flow_events)
        self.lost = 0   # events the kernel could not write in the last live round
        self._store = FlowStore()                  # where batch_ingest puts events
        self._flows: deque = deque(maxlen=8192)   # where per_record_ingest put them (the old ring)

    def close(self) -> None:
        self.ring.close()
        self.node.close()

    def _produce(self, count: int) -> float:
        """`count` events written by the kernel -> seconds the runs took (the kernel's own clock)."""
        return self.node.drop(count)

    def _bursts(self, size: int = RING_BURST, events: int | None = None) -> list[int]:
        events = events or self.events
        return [min(size, events - done) for done in range(0, events, size)]

    def producer(self) -> float:
        """M events/s the kernel writes when nothing reads (each burst fits the ring, then is dropped)."""
        seconds = 0.0
        for burst in self._bursts():
            seconds += self._produce(burst)
            self.ring.consume_array(FLOW_DTYPE)
        return self.events / seconds / 1e6

    def drain(self, ingest: Callable[[], int], events: int | None = None) -> float:
        """M events/s `ingest` (-> events taken) empties a ring the kernel filled beforehand, for
        `events` (default: the bench's) in bursts."""
        seconds, taken = 0.0, 0
        for burst in self._bursts(events=events):
            self._produce(burst)
            start = time.perf_counter()
            got = 0
            while got < burst:
                got += ingest()
            seconds += time.perf_counter() - start
            taken += got
        return taken / seconds / 1e6

    def live(self, pace: float | None = None) -> float:
        """M events/s the agent's collector thread ingests while the kernel writes the events as
        fast as it can, or at `pace` M events/s; `lost` is set to what the kernel could not write."""
        store = FlowStore()
        collector = FlowCollector(store)
        collector.watch("n1", self.dataplane.flow_events)
        lost_before = self.dataplane.lost_flow_events()
        collector.start()
        try:
            start = time.perf_counter()
            bursts = self._bursts(PACED_BURST if pace else RING_BURST)
            for index, burst in enumerate(bursts):
                self._produce(burst)
                if pace:
                    time.sleep(max(0.0, start + (index + 1) * PACED_BURST / (pace * 1e6) - time.perf_counter()))
            deadline = time.perf_counter() + 10
            while store.seen + self.dataplane.lost_flow_events() - lost_before < self.events:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"the collector took {store.seen} of {self.events} events")
                time.sleep(0.0005)
            seconds = time.perf_counter() - start
        finally:
            collector.close()
        self.lost = self.dataplane.lost_flow_events() - lost_before
        return store.seen / seconds / 1e6

    def batch_ingest(self) -> int:
        """The agent's path: one batch array per pass into the columnar store."""
        batch = self.ring.consume_array(FLOW_DTYPE)
        self._store.add(batch, "n1")
        return len(batch)

    def per_record_ingest(self) -> int:
        """The previous agent path: a bytes object and a decoded Flow per record."""
        records = self.ring.consume()
        self._flows.extend(decode(raw, "n1", 0.0) for raw in records)
        return len(records)

    def scenarios(self) -> list[Scenario]:
        """The target first (the × column compares each rate with it), then rows of several units."""
        return [
            Scenario(FLOW_TARGET, lambda: 1.0, unit="M events/s", note="≥ 1,000,000 flow events/s, none lost"),
            Scenario("agent ingest, kernel writing flat out", self.live, unit="M events/s",
                     note="FlowCollector thread taking batches while the kernel writes"),
            Scenario("events lost, flat out", lambda: self.lost, unit="events",
                     note=f"of {self.events:,} per round (ring full: the reader fell behind)"),
            Scenario("events lost at the target rate", lambda: (self.live(1.0), self.lost)[1], unit="events",
                     note=f"kernel paced to 1 M/s, {self.events:,} per round"),
            Scenario("agent ingest ceiling, full ring", lambda: self.drain(self.batch_ingest), unit="M events/s",
                     note="consume_array + FlowStore.add on a ring the kernel filled"),
            Scenario("kernel producer alone", self.producer, unit="M events/s",
                     note="pod_from_container: policy drop + ringbuf output (kernel's clock)"),
            Scenario("previous per-record decode, full ring",
                     lambda: self.drain(self.per_record_ingest, PER_RECORD_EVENTS), unit="M events/s",
                     note=f"consume() + decode() to a Flow per record, {PER_RECORD_EVENTS:,} per round"),
        ]
