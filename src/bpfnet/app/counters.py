"""The packet and byte counter every app keeps per path (per-CPU arrays of it)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence


class Counter(ctypes.Structure):
    """Mirror of the C counters: struct lb_counter, ddos_counter and pod_counter (checked against
    each map's BTF when it is bound)."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


def sum_counters(per_cpu: Sequence[Counter] | None) -> tuple[int, int]:
    """(packets, bytes) over every CPU's counter; (0, 0) for an absent entry."""
    per_cpu = per_cpu or []
    return sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)
