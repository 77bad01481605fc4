"""Numeric security identities, as Cilium allocates them.

A pod's identity stands for its label set: the pod's labels plus its namespace's labels (which
include kubernetes.io/metadata.name). Pods with the same label set share an identity, so policy
maps are keyed by identity rather than by address. Both label sources are kept apart (Cilium
prefixes namespace labels) so a pod label never masquerades as a namespace label.

Identities are derived from a hash of the label set, probed forward on a collision in the sorted
order of the label sets. Allocation is therefore a pure function of the store's contents: the same
pods give the same numbers after an agent restart, and adding a label set does not renumber the
others unless it collides with one.

Local identities (bit 24 set, as Cilium's node-local CIDR identities) name single addresses and
prefixes: every ipcache entry gets one, so ipBlock rules can match pod addresses by address, as
Kubernetes defines it (Cilium does not).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

ANY = 0  # the wildcard identity in a policy key
HOST = 1
WORLD = 2
RESERVED = {ANY: "any", HOST: "host", WORLD: "world"}

CLUSTER_FIRST = 256
CLUSTER_LAST = (1 << 24) - 1
LOCAL_FLAG = 1 << 24
LOCAL_LAST = LOCAL_FLAG | ((1 << 24) - 1)


@dataclass(frozen=True, order=True)
class LabelSet:
    """Security-relevant labels of a pod: its own and its namespace's, kept apart."""

    pod_labels: tuple[tuple[str, str], ...]
    namespace_labels: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, pod_labels: dict[str, str], namespace_labels: dict[str, str]) -> LabelSet:
        return cls(tuple(sorted(pod_labels.items())), tuple(sorted(namespace_labels.items())))

    @property
    def pod(self) -> dict[str, str]:
        return dict(self.pod_labels)

    @property
    def namespace(self) -> dict[str, str]:
        return dict(self.namespace_labels)

    def canonical(self) -> str:
        pod = ",".join(f"{k}={v}" for k, v in self.pod_labels)
        ns = ",".join(f"{k}={v}" for k, v in self.namespace_labels)
        return f"pod:{pod};ns:{ns}"


def _allocate(names: Iterable[str], first: int, last: int) -> dict[str, int]:
    """Hash each name into [first, last]; on a collision probe upward, in sorted name order."""
    span = last - first + 1
    taken: set[int] = set()
    numbers: dict[str, int] = {}
    for name in sorted(set(names)):
        digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
        offset = digest % span
        while first + offset in taken:
            offset = (offset + 1) % span
        taken.add(first + offset)
        numbers[name] = first + offset
    return numbers


def allocate_identities(label_sets: Iterable[LabelSet]) -> dict[LabelSet, int]:
    """Cluster identities (256 .. 2^24-1) for the given label sets."""
    by_name = {ls.canonical(): ls for ls in label_sets}
    return {by_name[name]: number
            for name, number in _allocate(by_name, CLUSTER_FIRST, CLUSTER_LAST).items()}


def allocate_local_identities(names: Iterable[str]) -> dict[str, int]:
    """Local identities (bit 24 set) for ipcache entries, named by their prefix, e.g. 10.0.0.0/8."""
    return _allocate(names, LOCAL_FLAG, LOCAL_LAST)


def describe(identity: int) -> str:
    if identity in RESERVED:
        return f"reserved:{RESERVED[identity]}"
    return f"local:{identity & ~LOCAL_FLAG}" if identity & LOCAL_FLAG else str(identity)
