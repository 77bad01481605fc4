"""The agent's flow ingest: a thread that waits on the nodes' pod_flows ring buffers and moves each
ring's waiting events into the FlowStore as one batch (RingBuffer.consume_array). Reading on its
own thread rather than at the agent's tick matters: a 4 MiB ring holds 47,662 events, 48 ms at
1 M events/s, while ticks come every 200 ms."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from bpfnet.ebpf import Map
from bpfnet.ebpf.ringbuf import RingBuffer
from bpfnet.podnet.flows import FLOW_DTYPE, FlowStore

# Puts events of a ring that serves several nodes on theirs: batch -> the node of each row (it
# may fill in fields of the batch, which is the reader's own copy).
Placer = Callable[[np.ndarray], Sequence[str]]

WAIT_SECONDS = 0.1   # how long the thread sleeps between checks for close() when no event comes
# After a pass that took events: let more arrive (bigger batches, and the GIL free for the
# agent's other threads); 1 ms at 1 M events/s is 1,000 events, the ring holds 47,662.
BATCH_PAUSE_SECONDS = 0.001


class FlowCollector:
    """Owns the ring readers; `lock` guards them and the store (hold it to query the store)."""

    def __init__(self, store: FlowStore) -> None:
        self.store = store
        self.lock = threading.Lock()
        self._readers: dict[str, tuple[RingBuffer, Placer | None, str]] = {}
        self._epoll = select.epoll()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, source: str, ring: Map, place: Placer | None = None, event_type: str = "trace") -> None:
        """Read a ring of flow events from now on (again: nothing changes): a node's pod_flows,
        whose events are that node's, or another ring whose events `place` puts on their nodes;
        `event_type` (flows.EVENT_TYPES) says what the ring's events are when they are no drops."""
        with self.lock:
            if source not in self._readers:
                self._readers[source] = (RingBuffer(ring), place, event_type)
                self._epoll.register(ring.fd, select.EPOLLIN)

    def forget(self, source: str) -> None:
        with self.lock:
            reader, _, _ = self._readers.pop(source, (None, None, None))
            if reader is not None:
                self._epoll.unregister(reader.map.fd)
                reader.close()

    def collect(self) -> int:
        """Every event waiting now, one batch per node, into the store; -> count. Hold `lock`."""
        collected = 0
        for source, (reader, place, event_type) in self._readers.items():
            batch = reader.consume_array(FLOW_DTYPE)
            if len(batch):
                self.store.add(batch, place(batch) if place else source, event_type)
                collected += len(batch)
        return collected

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bpfnet-flow-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        collected = 0
        while not self._stop.is_set():
            # The kernel wakes readers when it commits a record at the consumer position. A pass
            # that took events may have stopped at a record the kernel committed just before it
            # could see the new position (no wakeup will come), so after such a pass look again
            # after a short pause; wait for a wakeup only after a pass that found nothing.
            if collected:
                time.sleep(BATCH_PAUSE_SECONDS)
            else:
                self._epoll.poll(WAIT_SECONDS)
            with self.lock:
                collected = self.collect()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for source in list(self._readers):
            self.forget(source)
        self._epoll.close()
