"""The detector's configuration, and the bounds on what one configuration can make it hold or do."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.networks import IPvAnyNetwork

from bpfnet.schema import MAX_SECONDS, STRICT, U32, U64

# Payload words beyond this offset may fall outside a 128-byte sample (Ethernet + IPv6 + TCP).
MAX_PAYLOAD_OFFSET = 48
# The detector's rule ids come after the operator's, below the data plane's rule-id limit (ruleset.MAX_RULES).
MAX_DETECTOR_RULES = 1024
# Samples are Python objects of a few hundred bytes: bounds on what one config can make the agent hold.
MAX_SAMPLES_KEPT = 1_000_000
MAX_SAMPLES_HELD = 1 << 24


class DetectorConfig(BaseModel):
    """How the detector learns, decides and what it may do. Rates are packets per second on
    the wire: sampled rate x `sample_every`."""

    model_config = ConfigDict(**STRICT, frozen=True)

    sample_every: Annotated[U32, Field(ge=1)] = Field(100, description="the data plane samples 1 packet in N")
    window: float = Field(0.25, gt=0, le=10, description="seconds per rate measurement")
    baseline_time_constant: float = Field(60.0, gt=0, le=MAX_SECONDS,
                                          description="EWMA time constant of baselines, s")
    learning_time: float = Field(5.0, ge=0, le=MAX_SECONDS,
                                 description="seconds after start when no attack is declared")
    attack_factor: float = Field(5.0, gt=1, le=1e6, description="attack when rate > factor x baseline ...")
    attack_floor_pps: float = Field(2000.0, gt=0, le=1e12, description="... and rate > this floor")
    hold_time: float = Field(5.0, gt=0, le=MAX_SECONDS,
                             description="attack over after this long below the threshold, s")
    rule_ttl: float = Field(30.0, gt=0, le=MAX_SECONDS,
                            description="rule expiry; extended while the attack lasts, s")
    refine_interval: float = Field(0.5, ge=0, le=MAX_SECONDS,
                                   description="minimum seconds between searches of one attack")
    target_coverage: float = Field(0.95, gt=0, le=1,
                                   description="share of the excess a signature should match")
    min_coverage: float = Field(0.5, gt=0, le=1, description="below this a signature is not deployed")
    max_collateral: float = Field(0.01, ge=0, lt=1,
                                  description="max share of normal samples a rule may match")
    max_known_sources: float = Field(0.5, ge=0, le=1,
                                     description="max share of matched attack samples from sources seen "
                                                 "in normal traffic (a heavy legitimate client)")
    max_rules: int = Field(8, ge=0, le=MAX_DETECTOR_RULES, description="rules the detector may own at once")
    allow_list: tuple[IPvAnyNetwork, ...] = Field((), description="source prefixes never matched by a rule")
    dry_run: bool = Field(False, description="report decisions, deploy nothing")
    syn_cookies: bool = Field(True, description="a TCP SYN flood with no narrow signature gets a syncookie "
                              "rule for its destination and ports (SYNs answered in XDP) instead of none")
    payload_offsets: tuple[Annotated[int, Field(ge=0, le=MAX_PAYLOAD_OFFSET)], ...] = Field(
        (0, 4), description="payload word offsets a signature may fix")
    max_values_per_field: int = Field(4, ge=1, le=16, description="values one predicate may list")
    normal_samples: int = Field(2000, ge=10, le=MAX_SAMPLES_KEPT,
                                description="normal samples kept per destination")
    window_samples: int = Field(2000, ge=10, le=MAX_SAMPLES_KEPT,
                                description="samples kept per destination per window")
    learn_samples: int = Field(256, ge=1, le=MAX_SAMPLES_KEPT,
                               description="samples per destination per quiet window added to "
                                           "its normal profile (the rate counts them all)")
    min_attack_samples: int = Field(20, ge=1, le=MAX_SAMPLES_KEPT, description="samples needed to search a signature")
    max_destinations: int = Field(1024, ge=1, le=MAX_SAMPLES_KEPT,
                                  description="(address, protocol, port) destinations tracked at once; "
                                              "(address, protocol) aggregates always are")
    forget_after: float = Field(600.0, gt=0, le=MAX_SECONDS,
                                description="idle destinations are forgotten after, s")
    seed: U64 = Field(0, description="seed of the sample reservoir (decisions are reproducible)")

    @model_validator(mode="after")
    def _check(self) -> DetectorConfig:
        if self.min_coverage > self.target_coverage:
            raise ValueError(f"min_coverage ({self.min_coverage}) must be <= target_coverage "
                             f"({self.target_coverage})")
        if self.rule_ttl < 2 * (self.hold_time + self.window):
            raise ValueError(f"rule_ttl ({self.rule_ttl:g} s) must be at least 2 x (hold_time + window) = "
                             f"{2 * (self.hold_time + self.window):g} s, so a rule outlives the hold time")
        if len(set(self.payload_offsets)) != len(self.payload_offsets):
            raise ValueError(f"payload_offsets has duplicates: {list(self.payload_offsets)}")
        kept = (self.normal_samples + self.window_samples) * self.max_destinations
        if kept > MAX_SAMPLES_HELD:
            raise ValueError(f"(normal_samples + window_samples) x max_destinations = {kept:,} samples held "
                             f"in memory; the limit is {MAX_SAMPLES_HELD:,}")
        return self

