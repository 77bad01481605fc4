"""What the detector reports: every decision is an `Event` with its evidence (and the rule it
concerns, if any)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

from bpfnet.ddos.signature import Candidate


class EventKind(str, enum.Enum):
    ATTACK_STARTED = "attack_started"
    ATTACK_ENDED = "attack_ended"
    RULE_ADDED = "rule_added"
    RULE_PROPOSED = "rule_proposed"  # dry run: the rule that would have been added
    RULE_EXTENDED = "rule_extended"
    RULE_REMOVED = "rule_removed"
    RULE_REFUSED = "rule_refused"  # a signature was found but the rule cap refused it
    NO_SIGNATURE = "no_signature"  # no candidate met the coverage and collateral bounds


@dataclass(frozen=True)
class Evidence:
    rate_pps: float
    baseline_pps: float
    threshold_pps: float
    window_samples: int = 0  # samples of the destination in the window
    searched_samples: int = 0  # attack-window samples the signature search looked at
    normal_samples: int = 0
    expected_normal_samples: float = 0.0  # of the searched samples, how many the baseline explains
    candidates: tuple[Candidate, ...] = ()


@dataclass(frozen=True)
class DetectorRule:
    name: str
    expression: str
    destination: str
    description: str
    created_at: float
    expires_at: float
    action: str = "drop"  # or "syncookie": a SYN flood with no narrow signature (detector.py)


@dataclass(frozen=True)
class Event:
    time: float
    kind: EventKind
    destination: str
    message: str
    evidence: Evidence
    rule: DetectorRule | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

