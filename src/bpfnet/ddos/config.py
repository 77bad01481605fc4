"""Desired state of the ddos stage: ordered rules and sampling settings (pydantic models).

One schema for YAML files (`bpfnet ddos apply -f`), the agent's API and the CLI. Validation
compiles every expression with libpcap and the cBPF translator, so a rule the data plane could
not run is refused here, with libpcap's message and the rule it belongs to.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bpfnet.ddos.compiler import CbpfError, split_blocks
from bpfnet.ddos.detector import DetectorConfig
from bpfnet.ddos.pcap import PcapError, compile_cached
from bpfnet.ddos.ruleset import MAX_RULES

MAX_RATE_PPS = 100_000_000  # keeps the token arithmetic (ns * pps) inside 64 bits
# libpcap's optimizer grows faster than linearly: 1024 characters compile in about 0.2 s at
# worst ("port 1 or port 2 or ..."), 4096 can take seconds, and validation must stay quick
MAX_EXPRESSION_CHARS = 1024


class Rule(BaseModel):
    """A tcpdump expression and what to do with packets it matches; the first matching rule decides."""

    model_config = ConfigDict(extra="forbid")

    id: int | None = Field(None, ge=1, lt=MAX_RULES,
                           description="stable number (counters are kept per id); assigned when missing")
    expr: str = Field(min_length=1, max_length=MAX_EXPRESSION_CHARS,
                      description="pcap-filter expression, as for tcpdump")
    action: Literal["drop", "pass", "limit"] = "drop"
    rate: int | None = Field(None, ge=0, le=MAX_RATE_PPS,
                             description="limit: packets per second (per source with per_source)")
    burst: int | None = Field(None, ge=1, le=MAX_RATE_PPS,
                              description="limit: bucket size in packets (default: rate, at least 1)")
    per_source: bool = Field(False, description="limit: a separate bucket per source address")
    expires: float | None = Field(None, description="unix time after which the rule is removed")
    comment: str = ""

    @model_validator(mode="after")
    def _check(self) -> Rule:
        name = f"rule {self.id} ({self.expr!r})" if self.id is not None else f"rule {self.expr!r}"
        if self.action == "limit":
            if self.rate is None:
                raise ValueError(f"{name}: action limit needs a rate")
        elif self.rate is not None or self.burst is not None or self.per_source:
            raise ValueError(f"{name}: rate, burst and per_source only apply to action limit")
        try:
            split_blocks(list(compile_cached(self.expr)))
        except (PcapError, CbpfError) as err:
            detail = f"rule {self.id}: expression {self.expr!r}" if self.id is not None else f"expression {self.expr!r}"
            raise ValueError(f"{detail}: {err}") from None
        return self

    @property
    def number(self) -> int:
        """The id of a rule the state holds (the state assigns one to every rule)."""
        if self.id is None:
            raise ValueError(f"rule {self.expr!r} has no id yet")
        return self.id

    @property
    def bucket_size(self) -> int:
        return self.burst or max(self.rate or 0, 1)

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now

    def content_key(self) -> tuple:
        """What makes two rules the same rule (id and comment aside)."""
        return (self.expr, self.action, self.rate, self.burst, self.per_source, self.expires)


class DdosState(BaseModel):
    """Everything the ddos stage should be doing."""

    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES - 1)
    sample_every: int = Field(100, ge=0, description="sample 1 packet in N to the ring buffer; 0 = off")
    interfaces: list[str] = Field(default_factory=list, description="interfaces the stage is attached to")
    xdp_mode: Literal["native", "generic"] = "native"
    detector: DetectorConfig | None = Field(None, description="automatic attack signatures "
                                            "(`bpfnet ddos auto on`); None = off")

    @model_validator(mode="after")
    def _assign_ids(self) -> DdosState:
        seen: dict[int, int] = {}
        for position, rule in enumerate(self.rules):
            if rule.id is not None:
                if rule.id in seen:
                    raise ValueError(f"rules {seen[rule.id]} and {position}: duplicate id {rule.id}")
                seen[rule.id] = position
        next_id = max(seen, default=0) + 1
        for rule in self.rules:
            if rule.id is None:
                while next_id in seen:
                    next_id += 1
                if next_id >= MAX_RULES:
                    raise ValueError(f"no free rule id below {MAX_RULES}")
                rule.id = next_id
                seen[next_id] = -1
        for name in self.interfaces:
            if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}", name):
                raise ValueError(f"interface name {name!r} is not valid")
        return self

    def live_rules(self, now: float) -> list[Rule]:
        """The rules in force at unix time `now` (expired ones are left out)."""
        return [rule for rule in self.rules if not rule.expired(now)]

    def rule(self, rule_id: int) -> Rule:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(f"no rule {rule_id}")


def parse_duration(text: str) -> float:
    """'90s', '10m', '2h', '1d' or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"duration {text!r}: use a number with s, m, h or d (e.g. 10m)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
