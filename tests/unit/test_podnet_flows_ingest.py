"""The batch path of flow ingest without a kernel: ringbuf.read_fixed over a ring's data area laid
out as the kernel lays it out (pages mapped twice, 8-byte headers with busy/discard bits), records
built with the ctypes FlowEvent mirror."""

import ctypes
import socket
import struct

import numpy as np
import pytest

from bpfnet.ebpf.ringbuf import BUSY_BIT, DISCARD_BIT, read_fixed, record_span
from bpfnet.podnet.flows import FLOW_DTYPE, FlowEvent

SIZE = 4096
STRIDE = record_span(ctypes.sizeof(FlowEvent))


def event(i: int) -> bytes:
    e = FlowEvent(time_ns=1000 + i, bytes=60 + i, family=4, protocol=6, verdict=1 + i % 3,
                  drop_reason=133 if i % 3 == 1 else 0, tcp_flags=0x12, src_identity=300 + i,
                  dst_identity=400 + i, ifindex=7, packets=1 + i)
    e.src_addr[:4] = list(socket.inet_aton(f"10.0.{i % 256}.1"))
    e.dst_addr[:4] = list(socket.inet_aton("10.1.0.2"))
    e.src_port, e.dst_port = socket.htons(40000 + i), socket.htons(80)
    return bytes(e)


class FakeRing:
    """The ring's pages as the consumer sees them: `size` bytes of data visible twice in a row."""

    def __init__(self, start: int = 0) -> None:
        self.pages = bytearray(SIZE)
        self.consumer = self.producer = start

    def write(self, body: bytes, flags: int = 0) -> None:
        record = struct.pack("<II", len(body) | flags, 0) + body
        record += bytes(record_span(len(body)) - len(record))
        for i, byte in enumerate(record):
            self.pages[(self.producer + i) % SIZE] = byte
        self.producer += len(record)

    @property
    def data(self) -> np.ndarray:
        return np.frombuffer(bytes(self.pages) * 2, np.uint8)

    def read(self, limit=None):
        records, self.consumer, skipped = read_fixed(self.data, self.consumer, self.producer, SIZE,
                                                     FLOW_DTYPE, limit)
        return records, skipped


def as_bytes(records: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in records]


def test_dtype_mirrors_the_ctypes_struct_field_by_field():
    assert FLOW_DTYPE.itemsize == ctypes.sizeof(FlowEvent) == 80
    row = np.frombuffer(event(5), FLOW_DTYPE)[0]
    assert (row["time_ns"], row["bytes"], row["verdict"], row["src_identity"], row["packets"]) == (
        1005, 65, 3, 305, 6)
    assert bytes(row["src_addr"][:4]) == socket.inet_aton("10.0.5.1")
    assert row["src_port"] == socket.htons(40005)


def test_a_batch_comes_back_exactly_and_the_consumer_moves_past_it():
    ring = FakeRing()
    for i in range(10):
        ring.write(event(i))
    records, skipped = ring.read()
    assert as_bytes(records) == [event(i) for i in range(10)] and skipped == 0
    assert ring.consumer == ring.producer == 10 * STRIDE
    assert len(ring.read()[0]) == 0


def test_records_across_the_end_of_the_ring_are_contiguous_through_the_second_mapping():
    ring = FakeRing(start=SIZE - 2 * STRIDE - 40)   # the third record straddles the end
    for i in range(5):
        ring.write(event(i))
    assert as_bytes(ring.read()[0]) == [event(i) for i in range(5)]
    for i in range(5, 40):   # wraps around again, positions keep growing
        ring.write(event(i))
        if i % 7 == 0:
            assert as_bytes(ring.read()[0])[-1] == event(i)
    assert as_bytes(ring.read()[0]) == [event(i) for i in range(36, 40)]


def test_reading_stops_at_the_first_record_still_being_written():
    ring = FakeRing()
    ring.write(event(0))
    ring.write(event(1), BUSY_BIT)
    ring.write(event(2))   # committed, but behind a busy one
    records, _ = ring.read()
    assert as_bytes(records) == [event(0)] and ring.consumer == STRIDE
    ring.pages[STRIDE + 3] &= 0x7F   # the producer commits: clears the busy bit
    assert as_bytes(ring.read()[0]) == [event(1), event(2)]


def test_discarded_records_are_skipped_but_consumed():
    ring = FakeRing()
    for i in range(6):
        ring.write(event(i), DISCARD_BIT if i in (0, 3, 5) else 0)
    assert as_bytes(ring.read()[0]) == [event(1), event(2), event(4)]
    assert ring.consumer == ring.producer


def test_mixed_sizes_fall_back_to_record_by_record_and_count_the_others():
    ring = FakeRing()
    ring.write(event(0))
    ring.write(b"\x01" * 12)          # some other record
    ring.write(event(1))
    ring.write(event(2), DISCARD_BIT)
    ring.write(event(3))
    ring.write(event(4), BUSY_BIT)
    records, skipped = ring.read()
    assert as_bytes(records) == [event(0), event(1), event(3)] and skipped == 1
    assert ring.consumer == 4 * STRIDE + record_span(12)


@pytest.mark.parametrize("limit", [1, 3, 4, 7])
def test_limit_reads_at_most_that_many_records(limit):
    ring = FakeRing()
    for i in range(3):
        ring.write(event(i))
    ring.write(b"\x02" * 100)
    for i in range(3, 6):
        ring.write(event(i))
    got = []
    while len(batch := ring.read(limit)[0]) or ring.consumer < ring.producer:
        assert len(batch) <= limit
        got += as_bytes(batch)
    assert got == [event(i) for i in range(6)]
