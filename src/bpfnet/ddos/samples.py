"""Sample and capture records from the ddos stage's ring buffers, decoded.

The XDP stage sends 1 packet in N (`DdosState.sample_every`) to the `ddos_samples` ring, drops
included: the first 128 bytes of the frame, the rule that matched (0 = none), the rule's action
and the verdict. Captures (`bpfnet ddos capture`) use the same header with up to 2048 bytes.

For the detector: `SampleReader(dataplane).read()` returns `Sample`s; `sample.fields` is the
parsed IPv4/IPv6 header (`bpfnet.ddos.fingerprint.PacketFields`, None for other frames), and
`sample.frame` the raw bytes (`sample.pkt_len` is the length on the wire, which may be longer).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cached_property

from bpfnet.ddos.fingerprint import PacketFields, ParseError
from bpfnet.ebpf.ringbuf import RingBuffer

# struct ddos_record (ddos/structs.h): ts_ns, rule, action, verdict, cap_len, pkt_len, ifindex
RECORD = struct.Struct("<QIBBHII")
ACTIONS = {0: "none", 1: "drop", 2: "pass", 3: "limit", 4: "syncookie"}
VERDICTS = {1: "drop", 2: "pass", 3: "syncookie"}  # 3, XDP_TX: a SYN answered with a cookie SYN-ACK


@dataclass(frozen=True)
class Sample:
    """One sampled (or captured) packet as the XDP stage saw it."""

    ts_ns: int       # bpf_ktime_get_ns() (CLOCK_MONOTONIC) when the packet was seen
    rule: int        # id of the first matching rule, 0 = no rule matched
    action: str      # that rule's action: "none", "drop", "pass", "limit" or "syncookie"
    verdict: str     # what happened to the packet: "drop", "pass" or "syncookie" (a SYN answered)
    pkt_len: int     # frame length
    ifindex: int     # interface the packet arrived on
    frame: bytes = field(repr=False)  # the first bytes of the frame (at most pkt_len)

    @property
    def dropped(self) -> bool:
        return self.verdict == "drop"

    @cached_property
    def fields(self) -> PacketFields | None:
        """IP header fields (addresses, protocol, ports, flags, TTL, ...) or None if not IP."""
        try:
            return PacketFields.from_frame(self.frame)
        except ParseError:
            return None


def decode(raw: bytes) -> Sample:
    """A ring record (struct ddos_sample or ddos_capture) as a Sample."""
    if len(raw) < RECORD.size:
        raise ValueError(f"record of {len(raw)} bytes is shorter than its {RECORD.size}-byte header")
    ts_ns, rule, action, verdict, cap_len, pkt_len, ifindex = RECORD.unpack_from(raw)
    frame = raw[RECORD.size:RECORD.size + cap_len]
    return Sample(ts_ns, rule, ACTIONS.get(action, str(action)), VERDICTS.get(verdict, str(verdict)),
                  pkt_len, ifindex, frame)


class SampleReader:
    """Reads decoded records from a ring of the data plane (`dataplane.samples` by default)."""

    def __init__(self, ring) -> None:
        self._ring = RingBuffer(ring)

    def read(self, timeout_ms: int = 0, limit: int | None = None) -> list[Sample]:
        """Records available now, or after waiting up to `timeout_ms` for the first one."""
        raw = self._ring.poll(timeout_ms, limit) if timeout_ms else self._ring.consume(limit)
        return [decode(r) for r in raw]

    def close(self) -> None:
        self._ring.close()

    def __enter__(self) -> SampleReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
