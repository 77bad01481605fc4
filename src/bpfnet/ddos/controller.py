"""The ddos app inside the agent: deploys the live rules, attaches the stage, expires rules, drains
samples for `top` and the detector, and reports counters."""

from __future__ import annotations

import collections
import logging
import math
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bpfnet.app.controller import ApplyError, Controller, register
from bpfnet.ddos.autopilot import Autopilot, DeployedRules
from bpfnet.ddos.config import DDOS_OBJECTS, DdosState, Rule
from bpfnet.ddos.dataplane import CAPTURE_DROP, CAPTURE_PASS, DdosDataplane, DeployError
from bpfnet.ddos.samples import Sample, SampleReader
from bpfnet.ddos.synproxy import Synproxy, SynproxyError
from bpfnet.ebpf import BpfError, pins
from bpfnet.ebpf.chain import SLOTS, XdpChain

log = logging.getLogger(__name__)
RECENT_SAMPLES = 4096
CAPTURE_MASKS = {"drop": CAPTURE_DROP, "pass": CAPTURE_PASS, "all": CAPTURE_DROP | CAPTURE_PASS}
MAX_CAPTURE_LEASE = 60.0  # seconds a capture client may go without renewing
MAX_CAPTURE_LEASES = 64


def interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise ApplyError(f"no interface {name!r}") from None


def sample_summary(sample: Sample) -> dict:
    """A sample as JSON: record header plus the parsed header fields (None when not IP)."""
    fields = sample.fields
    out: dict[str, Any] = {"ts_ns": sample.ts_ns, "rule": sample.rule, "action": sample.action,
                           "verdict": sample.verdict, "pkt_len": sample.pkt_len, "ifindex": sample.ifindex}
    if fields is not None:
        out.update(src=str(fields.src_address), dst=str(fields.dst_address), protocol=fields.protocol,
                   src_port=fields.src_port, dst_port=fields.dst_port, tcp_flags=fields.tcp_flags,
                   ttl=fields.ttl)
    return out


@register
class DdosController(Controller[DdosState]):
    name = "ddos"
    state_model = DdosState
    object_kinds = DDOS_OBJECTS

    def __init__(self, pin_root: Path, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(pin_root)
        self._clock = clock  # wall clock: rule expiry times are unix times
        self._monotonic = monotonic  # capture leases
        self.captures: dict[str, tuple[int, float]] = {}  # lease -> (capture mask, monotonic deadline)
        self.state = DdosState()
        self.dataplane: DdosDataplane | None = None
        self.chain: XdpChain | None = None  # the XDP chain shared with the lb on every interface
        self.interfaces: list[str] = []     # interfaces this app holds in the chain
        self.deployed: list[int] = []  # ids of the rules in force, in order
        self.recent: collections.deque[Sample] = collections.deque(maxlen=RECENT_SAMPLES)
        self.sample_listeners: list[Callable[[list[Sample]], None]] = []  # e.g. the detector
        self._reader: SampleReader | None = None
        self.autopilot: Autopilot | None = None  # the detector, when state.detector is set
        self.auto_rules = DeployedRules()  # its rules, deployed after the operator's
        self._auto_version = 0
        self.synproxy = Synproxy()  # the nftables SYNPROXY table syncookie rules need (ddos/synproxy.py)

    @property
    def pin_dir(self) -> Path:
        return pins.pin_dir("ddos", root=self.pin_root)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, state: DdosState) -> None:
        self.chain = XdpChain.open(pins.pin_dir("xdp", root=self.pin_root))
        # a previous agent's stage keeps running until the new one takes its slot
        self.dataplane = DdosDataplane.load(pin_dir=self.pin_dir, chain=self.chain)
        self.interfaces = [name for name in state.interfaces if self.chain.holds(name, "ddos")]
        self._reader = SampleReader(self.dataplane.samples)
        self.apply(state)
        self.dataplane.set_config(capture=0)  # no capture client holds a lease with this agent yet

    def apply(self, state: DdosState) -> None:
        dp = self._require_dataplane()
        attached = self._attach_new(state)
        live = self._in_force(state)
        try:
            self._deploy(live, state.interfaces)
        except (DeployError, BpfError, SynproxyError) as err:
            self._detach(attached)
            raise ApplyError(str(err)) from None
        dp.set_config(sample_every=state.sample_every)
        self._detach([name for name in self.interfaces if name not in state.interfaces])
        self.state, self.deployed = state, [rule.number for rule in live]
        self._auto_version = self.auto_rules.version
        self._configure_autopilot(state)  # switching it off withdraws its rules at the next tick

    def _deploy(self, live: list[Rule], interfaces: list[str]) -> None:
        """Deploy the rules; SYNPROXY is in place before a syncookie rule is, and leaves after."""
        cookies = [rule.expr for rule in live if rule.action == "syncookie"]
        if cookies:
            self._proxy(interfaces, cookies)
        self._require_dataplane().deploy(live)
        if not cookies:
            self.synproxy.sync(interfaces, [], now=self._monotonic())

    def _proxy(self, interfaces: list[str], cookies: list[str]) -> None:
        """SYNPROXY for these syncookie rules, and XDP's SYN-ACKs saying what its rules say: the
        MSS of each interface, the server's window scale (measured now)."""
        self.synproxy.sync(interfaces, cookies)
        self._require_dataplane().set_synack({interface_index(name): said
                                              for name, said in self.synproxy.advertising.items()})

    def _in_force(self, state: DdosState) -> list[Rule]:
        """The operator's live rules, then the detector's (an operator's pass rule wins)."""
        now = self._clock()
        live = state.live_rules(now)
        taken = {rule.id for rule in live}
        auto = [rule for rule in self.auto_rules.rules() if rule.id not in taken and not rule.expired(now)]
        return live + auto

    def _configure_autopilot(self, state: DdosState) -> None:
        wanted = (state.detector.model_copy(update={"sample_every": max(state.sample_every, 1)})
                  if state.detector is not None else None)
        if self.autopilot is not None and self.autopilot.config == wanted:
            return
        if self.autopilot is not None:
            self.autopilot.close()
            self.sample_listeners.remove(self.autopilot.on_samples)
        self.autopilot = Autopilot(wanted, self.auto_rules) if wanted is not None else None
        if self.autopilot is not None:
            self.sample_listeners.append(self.autopilot.on_samples)

    def _attach_new(self, state: DdosState) -> list[str]:
        self._require_dataplane()
        attached: list[str] = []
        for name in state.interfaces:
            if name in self.interfaces:
                continue
            try:
                self._require_chain().hold(interface_index(name), "ddos", state.xdp_mode)
            except (ApplyError, BpfError) as err:
                self._detach(attached)
                raise ApplyError(f"attaching to {name}: {err}") from None
            self.interfaces.append(name)
            attached.append(name)
        return attached

    def _detach(self, names: list[str]) -> None:
        for name in names:
            self.interfaces.remove(name)
            try:
                self._require_chain().release(interface_index(name), "ddos")
            except ApplyError:
                pass  # the interface is gone, and the root with it

    def stop(self, detach: bool) -> None:
        if self.captures and self.dataplane is not None:
            self.captures.clear()  # nobody renews leases while the agent is down
            self._write_capture(self.dataplane)
        if detach and self.chain is not None:
            self._detach(list(self.interfaces))
            self.chain.clear(SLOTS["ddos"])
        if detach:
            try:
                self.synproxy.remove()
            except SynproxyError:
                log.exception("removing the SYNPROXY table failed")
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self.dataplane is not None:
            self.dataplane.close()
            self.dataplane = None
        if self.chain is not None:
            self.chain.leave(remove=detach)
            self.chain = None
        if detach:
            pins.unpin(self.pin_root / "ddos")

    def _require_dataplane(self) -> DdosDataplane:
        if self.dataplane is None:
            raise ApplyError("the ddos stage is not started")
        return self.dataplane

    def _require_chain(self) -> XdpChain:
        if self.chain is None:
            raise ApplyError("the ddos stage is not started")
        return self.chain

    # --- periodic work --------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Drops expired rules from the data plane and drains the sample ring. `now` is the
        agent's monotonic clock; expiry uses the wall clock because `expires` is a unix time."""
        if self.dataplane is None:
            return
        self.drain_samples()
        self._expire_captures()
        if self.autopilot is not None:
            self.autopilot.tick(now)
        try:
            self.synproxy.expire(self._monotonic())
        except SynproxyError:
            log.exception("removing the draining SYNPROXY table failed")
        version = self.auto_rules.version
        live = self._in_force(self.state)
        if [rule.number for rule in live] != self.deployed or version != self._auto_version:
            try:
                self._deploy(live, self.state.interfaces)
                self.deployed, self._auto_version = [rule.number for rule in live], version
            except (DeployError, BpfError, SynproxyError):
                log.exception("deploying the ddos rules (expiry, detector) failed")
        elif self._advertising_changed():
            try:
                self._proxy(self.state.interfaces, [rule.expr for rule in live if rule.action == "syncookie"])
            except (ApplyError, BpfError, SynproxyError):
                log.exception("advertising a changed MTU or window scale failed")

    def _advertising_changed(self) -> bool:
        """Whether an MTU or the namespace's TCP buffers changed under syncookie rules in force."""
        if self.synproxy.installed is None:
            return False
        try:
            return self.synproxy.measure(self.state.interfaces) != self.synproxy.advertising
        except SynproxyError:
            return False  # an interface went away: the next apply detaches it

    def drain_samples(self) -> list[Sample]:
        if self._reader is None:
            return []
        samples = self._reader.read(limit=65536)
        if samples:
            self.recent.extend(samples)
            for listener in self.sample_listeners:
                listener(samples)
        return samples

    # --- reporting ------------------------------------------------------------------------------
    def stats(self) -> dict:
        dp = self._require_dataplane()
        totals = dp.total_counts()
        rules = {str(rule_id): dp.counters(rule_id) for rule_id in self.deployed}
        meta = dp.active()
        return {
            "packets": {name: value["packets"] for name, value in totals.items()},
            "bytes": {name: value["bytes"] for name, value in totals.items()},
            "rule_packets": {rule_id: c.packets for rule_id, c in rules.items()},
            "rule_bytes": {rule_id: c.bytes for rule_id, c in rules.items()},
            "rules_in_force": len(self.deployed),
            "generation": meta.generation,
            "detector": self._detector_counters(),
            "synproxy": self.synproxy.status(self._monotonic()),
        }

    def _detector_counters(self) -> dict:
        if self.autopilot is None:
            return {"enabled": False}
        status = self.autopilot.status()
        return {"enabled": True, "dry_run": status["dry_run"], "attacks": len(status["attacks"]),
                "rules": len(status["rules"]), "sink_errors": status["sink_errors"], **status["counters"]}

    # --- capture leases -------------------------------------------------------------------------
    def action(self, name: str, params: dict) -> Any:
        if name != "capture":
            raise KeyError(name)
        return self.capture(params.get("verdict", "drop"), params.get("lease_s", 5.0), params.get("lease"))

    def capture(self, verdict: str, lease_s: float = 5.0, lease: str | None = None) -> dict:
        """Copy dropped/passed packets to the capture ring while a client keeps renewing its lease;
        verdict "off" ends it. The agent owns the flag: when the lease runs out (the client was
        killed) the next tick clears it, and a restarted agent starts with it cleared."""
        dp = self._require_dataplane()
        if verdict != "off" and verdict not in CAPTURE_MASKS:
            raise ValueError(f"verdict {str(verdict)[:40]!r}: use drop, pass, all or off")
        if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not (
                math.isfinite(lease_s) and 0 < lease_s <= MAX_CAPTURE_LEASE):
            raise ValueError(f"lease_s must be a number of seconds in (0, {MAX_CAPTURE_LEASE:g}]")
        if lease is not None and (not isinstance(lease, str) or lease not in self.captures):
            raise ValueError("unknown or expired lease: start a new capture")
        if verdict == "off":
            if lease is not None:
                del self.captures[lease]
        else:
            if lease is None:
                if len(self.captures) >= MAX_CAPTURE_LEASES:
                    raise ValueError(f"{MAX_CAPTURE_LEASES} captures are already running")
                lease = uuid.uuid4().hex
            self.captures[lease] = (CAPTURE_MASKS[verdict], self._monotonic() + lease_s)
        mask = self._write_capture(dp)
        return {"lease": lease if verdict != "off" else None, "lease_s": lease_s, "capture": mask}

    def _expire_captures(self) -> None:
        now = self._monotonic()
        expired = [lease for lease, (_, deadline) in self.captures.items() if deadline <= now]
        for lease in expired:
            log.warning("capture lease %s expired without renewal: capture flag cleared", lease[:8])
            del self.captures[lease]
        if expired and self.dataplane is not None:
            self._write_capture(self.dataplane)

    def _write_capture(self, dp: DdosDataplane) -> int:
        mask = 0
        for capture_mask, _ in self.captures.values():
            mask |= capture_mask
        dp.set_config(capture=mask)
        return mask

    def query(self, name: str, params: dict) -> Any:
        if name == "rules":
            return self.rule_table()
        if name == "detector":
            return {"enabled": True, **self.autopilot.status()} if self.autopilot else {"enabled": False}
        if name == "events":
            if self.autopilot is None:
                return []
            limit = int(params["limit"]) if params.get("limit") else None
            return self.autopilot.events(since=int(params.get("since", 0)), limit=limit)
        if name == "samples":
            self.drain_samples()
            limit = int(params.get("limit", 100))
            return [sample_summary(s) for s in list(self.recent)[-limit:]]
        raise KeyError(name)

    def rule_table(self) -> list[dict]:
        """Every rule (the state's, then the detector's) with its counters; expired rules are listed,
        marked, not counted."""
        dp = self._require_dataplane()
        now_ns = time.monotonic_ns()  # the clock of bpf_ktime_get_ns
        rows = []
        for rule in [*self.state.rules, *self.auto_rules.rules()]:
            row = rule.model_dump(mode="json")
            row["in_force"] = rule.id in self.deployed
            counters = dp.counters(rule.id) if rule.id is not None and row["in_force"] else None
            row["packets"] = counters.packets if counters else 0
            row["bytes"] = counters.bytes if counters else 0
            row["last_match_s_ago"] = (round((now_ns - counters.last_ns) / 1e9, 3)
                                       if counters and counters.last_ns else None)
            rows.append(row)
        return rows


__all__ = ["DdosController"]
