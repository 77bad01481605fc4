"""Ring buffer consumer: mmaps a BPF_MAP_TYPE_RINGBUF map and reads whole batches of records.

Two ways to read: `consume()` returns each record as bytes (any sizes); `consume_array(dtype)` reads
rings of fixed-size records (one C struct per record) as one numpy structured array per pass, with
the header words checked vectorized and the consumer position advanced once per batch."""

from __future__ import annotations

import mmap
import select
from collections.abc import Iterator

import numpy as np

from .map import Map

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER = 8


def record_span(length: int) -> int:
    """Bytes a record of `length` bytes takes in the ring: header plus data, 8-byte aligned."""
    return (HEADER + length + 7) & ~7


def walk(data: np.ndarray, consumer: int, producer: int, size: int) -> Iterator[tuple[int, int, int, bool]]:
    """The committed records from `consumer` on, one by one, up to the first one still being
    written: (position after it, offset of its data in `data`, length, discarded)."""
    while consumer < producer:
        offset = consumer & (size - 1)
        header = int(data[offset:offset + 4].view("<u4")[0])
        if header & BUSY_BIT:
            return
        length = header & ~(BUSY_BIT | DISCARD_BIT)
        consumer += record_span(length)
        yield consumer, offset + HEADER, length, bool(header & DISCARD_BIT)


def read_fixed(data: np.ndarray, consumer: int, producer: int, size: int, dtype: np.dtype,
               limit: int | None = None) -> tuple[np.ndarray, int, int]:
    """The committed records of `dtype.itemsize` bytes in a ring's data area `data` (2 * `size`
    bytes: the kernel maps the data pages twice, so the records from any position on are
    contiguous) -> (records as a `dtype` array, the new consumer position, records skipped
    because their length is not the dtype's). Stops at the first record still being written;
    reads at most `limit` records (discarded ones count)."""
    itemsize = dtype.itemsize
    stride = record_span(itemsize)
    start = consumer & (size - 1)
    count = (producer - consumer) // stride
    if limit is not None:
        count = min(count, limit)
    headers = np.ndarray((count,), "<u4", buffer=data, offset=start, strides=(stride,))
    # busy records and records of another length both differ from the plain length
    irregular = (headers & np.uint32(~DISCARD_BIT & 0xFFFFFFFF)) != itemsize
    regular = int(np.argmax(irregular)) if irregular.any() else count
    rows = data[start:start + regular * stride].reshape(regular, stride)[:, HEADER:HEADER + itemsize]
    kept = (headers[:regular] & DISCARD_BIT) == 0
    # a copy (fancy indexing copies too): the kernel reuses the space once the consumer moves on
    records = (rows.copy() if kept.all() else rows[kept]).view(dtype).reshape(-1)
    consumer += regular * stride
    if regular == count or headers[regular] & BUSY_BIT:
        return records, consumer, 0
    # mixed sizes from here on: record by record, keeping those of the dtype's size
    rest, skipped = [], 0
    budget = None if limit is None else limit - regular
    for taken, (consumer_after, offset, length, discarded) in enumerate(walk(data, consumer, producer, size)):
        if budget is not None and taken >= budget:
            break
        consumer = consumer_after
        if discarded:
            continue
        if length == itemsize:
            rest.append(data[offset:offset + itemsize])
        else:
            skipped += 1
    if rest:
        records = np.concatenate([records, np.concatenate(rest).view(dtype)])
    return records, consumer, skipped


class RingBuffer:
    """Reads records from a ring buffer map. `poll()` waits for data and returns the records."""

    def __init__(self, ring: Map) -> None:
        self.map = ring
        self.size = ring.max_entries
        self.skipped = 0  # records consume_array() left out because of their length
        page = mmap.PAGESIZE
        # consumer page (read-write), then producer page + data mapped twice (read-only)
        self._consumer = mmap.mmap(ring.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(ring.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        self._page = page
        # positions as 8-byte words: one load or store each (struct would copy byte by byte, and
        # the kernel reading a half-written consumer position sees a full ring and drops records)
        self._consumer_pos = np.frombuffer(self._consumer, np.uint64, count=1)
        self._producer_pos = np.frombuffer(self._producer, np.uint64, count=1)
        self._data = np.frombuffer(self._producer, np.uint8, offset=page)
        self._epoll = select.epoll()
        self._epoll.register(ring.fd, select.EPOLLIN)

    def close(self) -> None:
        self._epoll.close()
        del self._data, self._consumer_pos, self._producer_pos   # numpy views hold the mappings
        self._consumer.close()
        self._producer.close()

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _positions(self) -> tuple[int, int]:
        return int(self._consumer_pos[0]), int(self._producer_pos[0])

    def _advance(self, consumer: int) -> None:
        self._consumer_pos[0] = consumer

    def consume(self, limit: int | None = None) -> list[bytes]:
        """Every committed record available now (up to `limit`), without waiting."""
        records: list[bytes] = []
        consumer, producer = self._positions()
        for after, offset, length, discarded in walk(self._data, consumer, producer, self.size):
            if limit is not None and len(records) >= limit:
                break
            consumer = after
            if not discarded:
                records.append(self._data[offset:offset + length].tobytes())
        self._advance(consumer)
        return records

    def consume_array(self, dtype: np.dtype, limit: int | None = None) -> np.ndarray:
        """Every committed record available now (up to `limit`) as one `dtype` array, without
        waiting; for rings whose records are all one struct of `dtype.itemsize` bytes. Records of
        another length are left out and counted in `skipped`."""
        consumer, producer = self._positions()
        records, consumer, skipped = read_fixed(self._data, consumer, producer, self.size, dtype, limit)
        self.skipped += skipped
        self._advance(consumer)
        return records

    def wait(self, timeout_ms: int) -> None:
        """Until the kernel signals new records (or the timeout passes)."""
        self._epoll.poll(timeout_ms / 1000)

    def poll(self, timeout_ms: int = 100, limit: int | None = None) -> list[bytes]:
        records = self.consume(limit)
        if not records:
            self.wait(timeout_ms)
            records = self.consume(limit)
        return records
