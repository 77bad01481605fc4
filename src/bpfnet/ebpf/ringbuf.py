"""Ring buffer consumer: mmaps a BPF_MAP_TYPE_RINGBUF map and reads whole batches of records."""

from __future__ import annotations

import mmap
import select
import struct

from .map import Map

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER = 8


class RingBuffer:
    """Reads records from a ring buffer map. `poll()` waits for data and returns the records."""

    def __init__(self, ring: Map) -> None:
        self.map = ring
        self.size = ring.max_entries
        page = mmap.PAGESIZE
        # consumer page (read-write), then producer page + data mapped twice (read-only)
        self._consumer = mmap.mmap(ring.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(ring.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        self._page = page
        self._epoll = select.epoll()
        self._epoll.register(ring.fd, select.EPOLLIN)

    def close(self) -> None:
        self._epoll.close()
        self._consumer.close()
        self._producer.close()

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def consume(self, limit: int | None = None) -> list[bytes]:
        """Every committed record available now (up to `limit`), without waiting."""
        records = []
        consumer = struct.unpack_from("<Q", self._consumer, 0)[0]
        producer = struct.unpack_from("<Q", self._producer, 0)[0]
        data = memoryview(self._producer)[self._page:]
        while consumer < producer and (limit is None or len(records) < limit):
            offset = consumer & (self.size - 1)
            length = struct.unpack_from("<I", data, offset)[0]
            if length & BUSY_BIT:
                break
            if not length & DISCARD_BIT:
                records.append(bytes(data[offset + HEADER:offset + HEADER + length]))
            consumer += (HEADER + (length & ~(BUSY_BIT | DISCARD_BIT)) + 7) & ~7
        struct.pack_into("<Q", self._consumer, 0, consumer)
        data.release()
        return records

    def poll(self, timeout_ms: int = 100, limit: int | None = None) -> list[bytes]:
        records = self.consume(limit)
        if not records:
            self._epoll.poll(timeout_ms / 1000)
            records = self.consume(limit)
        return records
