"""Desired state of the ddos stage: ordered rules and sampling settings (pydantic models).

One schema for YAML files (`bpfnet ddos apply -f`), the agent's API and the CLI. Validation
compiles every expression with libpcap and the cBPF translator, so a rule the data plane could
not run is refused here, with libpcap's message and the rule it belongs to.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bpfnet.app.objects import ObjectKind
from bpfnet.ddos.compiler import CbpfError, split_blocks
from bpfnet.ddos.detector_config import DetectorConfig
from bpfnet.ddos.pcap import PcapError, compile_cached
from bpfnet.ddos.ruleset import MAX_RULES
from bpfnet.schema import MAX_UNIX_TIME, U32, InterfaceName, StrictModel, Text

MAX_RATE_PPS = 100_000_000  # keeps the token arithmetic (ns * pps) inside 64 bits
# libpcap's optimizer grows faster than linearly: 1024 characters compile in about 0.2 s at
# worst ("port 1 or port 2 or ..."), 4096 can take seconds, and validation must stay quick
MAX_EXPRESSION_CHARS = 1024
MAX_INTERFACES = 64


class Rule(StrictModel):
    """A tcpdump expression and what to do with packets it matches; the first matching rule decides."""

    id: int | None = Field(None, ge=1, lt=MAX_RULES,
                           description="stable number (counters are kept per id); assigned when missing")
    expr: str = Field(min_length=1, max_length=MAX_EXPRESSION_CHARS,
                      description="pcap-filter expression, as for tcpdump")
    action: Literal["drop", "pass", "limit", "syncookie"] = Field(
        "drop", description="syncookie: TCP SYNs get a cookie SYN-ACK from XDP, valid cookie ACKs go "
        "to the host's SYNPROXY, other TCP of unknown flows is dropped (docs/ddos.md)")
    rate: int | None = Field(None, ge=0, le=MAX_RATE_PPS,
                             description="limit: packets per second (per source with per_source)")
    burst: int | None = Field(None, ge=1, le=MAX_RATE_PPS,
                              description="limit: bucket size in packets (default: rate, at least 1)")
    per_source: bool = Field(False, description="limit: a separate bucket per source address")
    expires: float | None = Field(None, ge=0, le=MAX_UNIX_TIME,
                                  description="unix time after which the rule is removed")
    comment: Text = ""

    @field_validator("expr")
    @classmethod
    def _printable(cls, value: str) -> str:
        # libpcap reads the expression as a C string: after a NUL it would compile less than we store
        if any(not (c.isprintable() or c in "\t\n\r") for c in value):
            raise ValueError(f"expression {value[:80]!r} contains a NUL or control character")
        return value

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
        if self.action == "syncookie" and not tcp_only(self.expr):
            raise ValueError(f"{name}: action syncookie needs an expression that matches TCP only "
                             f"(e.g. 'tcp dst port 80'; add 'tcp and')")
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


def tcp_only(expr: str) -> bool:
    """Whether `expr` matches TCP packets only: libpcap's optimizer proves `(expr) and not tcp`
    rejects every packet (it refuses to compile an expression that does)."""
    try:
        compile_cached(f"({expr}) and not tcp")
    except PcapError as err:
        return "rejects all packets" in str(err)
    return False


# the per-object API: each rule by its id (its place in first-match order travels as the object's order)
DDOS_OBJECTS = (ObjectKind("rules", "rules", lambda rule: str(rule.number)),)


class DdosState(StrictModel):
    """Everything the ddos stage should be doing."""

    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES - 1)
    sample_every: U32 = Field(100, description="sample 1 packet in N to the ring buffer; 0 = off "
                              "(struct ddos_config.sample_every, a __u32)")
    interfaces: list[InterfaceName] = Field(default_factory=list, max_length=MAX_INTERFACES,
                                            description="interfaces the stage is attached to")
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
