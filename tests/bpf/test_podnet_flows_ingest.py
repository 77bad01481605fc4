"""Flow events from pod.bpf.c through the agent's batch path: RingBuffer.consume_array returns exactly
what the kernel wrote (the same records the per-record path reads, across the end of the ring), and
the FlowCollector thread reading while the kernel writes loses nothing and counts nothing lost."""

import socket
import time

import numpy as np
import pytest

from bpfnet.bench.flow_ingest import LO, PolicyDropNode
from bpfnet.ebpf.ringbuf import RingBuffer, record_span
from bpfnet.podnet.flow_collector import FlowCollector
from bpfnet.podnet.flows import FLOW_DTYPE, FlowStore

pytestmark = pytest.mark.root

RING_RECORDS = (1 << 22) // record_span(FLOW_DTYPE.itemsize)   # 47,662


class Node1(PolicyDropNode):
    """x/a on lo (where BPF_PROG_TEST_RUN runs tc programs) and y/b, whose ingress denies all; the
    flow ring read by the batch and the per-record paths."""

    def __init__(self):
        super().__init__()
        self.dp = self.dataplane
        self.ring = RingBuffer(self.dp.flow_events)

    def drop(self, sport: int, repeat: int = 1) -> None:
        """`repeat` policy drops of x/a's SYN from `sport`: one event each."""
        super().drop(repeat, sport)

    def close(self):
        self.ring.close()
        super().close()


@pytest.fixture
def node():
    n = Node1()
    yield n
    n.close()


def without_time(records: np.ndarray) -> list[bytes]:
    return [r.tobytes()[8:] for r in records]   # time_ns is the first field


def test_kernel_events_arrive_exactly_through_the_batch_path(node):
    for sport in range(40000, 40020):
        node.drop(sport)
    records = node.ring.consume_array(FLOW_DTYPE)
    assert len(records) == 20 and len(node.ring.consume_array(FLOW_DTYPE)) == 0
    assert [socket.ntohs(int(p)) for p in records["src_port"]] == list(range(40000, 40020))
    first = records[0]
    assert bytes(first["src_addr"]) == socket.inet_aton("10.0.0.2") + bytes(12)
    assert bytes(first["dst_addr"]) == socket.inet_aton("10.0.0.3") + bytes(12)
    assert (socket.ntohs(int(first["dst_port"])), first["family"], first["protocol"], first["direction"],
            first["verdict"], first["drop_reason"], first["tcp_flags"], first["is_reply"]) == (
        80, 4, 6, 1, 2, 133, 0x02, 0)
    assert (first["src_identity"], first["dst_identity"], first["ifindex"], first["packets"], first["bytes"]) == (
        node.identities["x/a"], node.identities["y/b"], LO, 1, len(node.frame(40000)))
    assert (np.diff(records["time_ns"].astype(np.int64)) >= 0).all()
    # the per-record path reads the same records
    for sport in range(40000, 40020):
        node.drop(sport)
    assert [raw[8:] for raw in node.ring.consume()] == without_time(records)


def test_batches_across_the_end_of_the_kernel_ring(node):
    burst = RING_RECORDS - 7_000
    node.drop(40000, repeat=burst)
    assert len(node.ring.consume_array(FLOW_DTYPE)) == burst
    node.drop(40001, repeat=burst)   # runs past the end of the 4 MiB data area and on from its start
    records = node.ring.consume_array(FLOW_DTYPE)
    assert len(records) == burst and node.dp.lost_flow_events() == 0
    assert set(socket.ntohs(int(p)) for p in records["src_port"]) == {40001}
    assert len(set(without_time(records))) == 1 and (records["verdict"] == 2).all()


def test_the_collector_thread_loses_nothing_while_the_kernel_writes(node):
    """Bursts of 20,000 events while at most 20,000 are unread: the ring (47,662) can never be
    legitimately full, so any lost event is a reader bug (such as a torn consumer position)."""
    store = FlowStore(capacity=4096)
    collector = FlowCollector(store)
    collector.watch("n1", node.dp.flow_events)
    collector.start()
    burst, bursts = 20_000, 20
    try:
        for i in range(bursts):
            deadline = time.monotonic() + 60
            while store.seen < i * burst - burst:
                assert time.monotonic() < deadline, f"collector stuck at {store.seen} events"
                time.sleep(0.001)
            node.drop(40000 + i, repeat=burst)
        deadline = time.monotonic() + 60
        while store.seen < bursts * burst and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        collector.close()
    assert (store.seen, node.dp.lost_flow_events()) == (bursts * burst, 0)
    assert store.counts() == {("DROPPED", "POLICY_DENIED"): bursts * burst}
    assert set(socket.ntohs(int(p)) for p in store.events["src_port"]) == {40000 + bursts - 1}


def test_the_ingest_bench_accounts_for_every_event():
    """`bench services`' flow part, one short round: every row measured, and each live round's
    events either ingested or counted lost (FlowIngestBench.live raises otherwise)."""
    from bpfnet.bench.flow_ingest import FLOW_TARGET, FlowIngestBench
    from bpfnet.bench.harness import run_scenarios

    bench = FlowIngestBench(100_000)
    try:
        results = {r.name: r for r in run_scenarios(bench.scenarios(), rounds=1)}
    finally:
        bench.close()
    assert list(results) == [FLOW_TARGET, "agent ingest, kernel writing flat out", "events lost, flat out",
                             "events lost at the target rate", "agent ingest ceiling, full ring",
                             "kernel producer alone", "previous per-record decode, full ring"]
    assert all(r.median > 0 for r in results.values() if r.unit == "M events/s")
    assert all(0 <= r.median <= 100_000 for r in results.values() if r.unit == "events")
