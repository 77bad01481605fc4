"""The lb app inside the agent: loads (or adopts) the pinned data plane, applies the desired state,
runs the health checks and answers stats and queries.

Pins under ``pin_root/lb/``: every map and the program (``xdp_lb``). The program runs in the lb slot of
the XDP chain (``pin_root/xdp/``, shared with the ddos stage) on the interface it holds there, so a
restarted agent adopts a data plane that kept forwarding meanwhile.
"""

from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bpfnet.app.controller import ApplyError, Controller, register
from bpfnet.ebpf import BpfError, LayoutError, Program, pins
from bpfnet.ebpf.chain import SLOTS, XdpChain
from bpfnet.lb.config import LB_OBJECTS, LbSettings, LbState, map_bytes, parse_vip_name, vip_name
from bpfnet.lb.dataplane import PROTOCOL_NAMES, Dataplane, lb_spec
from bpfnet.lb.health import HealthTracker, Target, probe
from bpfnet.lb.maglev import RingError
from bpfnet.lb.plan import PROTOCOL_NUMBERS, PlanError
from bpfnet.lb.simulate import Simulator

log = logging.getLogger(__name__)

# Settings that shape the maps: changing one replaces every map (connection table included).
SIZE_FIELDS = ("ring_size", "max_vips", "max_reals", "conn_table_size")
ATTACH_FIELDS = ("interface", "xdp_mode")


@register
class LbController(Controller[LbState]):
    name = "lb"
    state_model = LbState
    object_kinds = LB_OBJECTS

    def __init__(self, pin_root: Path) -> None:
        super().__init__(pin_root)
        self.state = LbState()
        self.dataplane: Dataplane | None = None  # lb.o loaded, its maps adopted from pin_dir
        self.chain: XdpChain | None = None  # shared with the ddos stage
        self.attached: str | None = None     # the interface the lb holds in the chain
        self.health = HealthTracker()
        self.health_changes = 0
        self._probes: dict[Target, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="lb-health")
        self._simulator: Simulator | None = None

    @property
    def pin_dir(self) -> Path:
        return pins.pin_dir("lb", root=self.pin_root)

    # The parts that exist between start() and stop().
    @property
    def _chain(self) -> XdpChain:
        if self.chain is None:
            raise ApplyError("the lb is not started")
        return self.chain

    @property
    def program(self) -> Program:
        """The loaded xdp_lb (the one attached while the lb holds an interface)."""
        return self._dataplane.xdp_lb

    @property
    def _dataplane(self) -> Dataplane:
        if self.dataplane is None:
            raise ApplyError("the lb data plane is not started")
        return self.dataplane

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, state: LbState) -> None:
        try:
            self._load(state.settings, adopt=True)
        except LayoutError:
            # The pinned maps have other sizes than the stored settings: start over with new ones.
            log.warning("lb: pinned maps do not match the settings; replacing them")
            self._unpin_maps()
            self._load(state.settings, adopt=True)
        self.chain = XdpChain.open(pins.pin_dir("xdp", root=self.pin_root))
        interface = state.settings.interface
        if interface is not None and self.chain.holds(interface, "lb"):
            self.attached = interface
            self.chain.set(SLOTS["lb"], self.program)  # the new program takes over atomically
        self.state = LbState(settings=state.settings)
        self.apply(state)

    def _load(self, settings: LbSettings, adopt: bool) -> None:
        """Load lb.o with `settings`; with `adopt`, reuse (or create and pin) the maps in pin_dir."""
        dataplane = Dataplane.load(lb_spec(settings), pin_dir=self.pin_dir if adopt else None, settings=settings)
        self._close_object()
        self.dataplane = dataplane
        self._pin_program()

    def apply(self, state: LbState) -> None:
        if self.dataplane is None:
            raise ApplyError("the lb data plane is not started")
        old = self.state.settings
        new = state.settings
        if new.interface is not None and new.interface != old.interface:
            try:
                socket.if_nametoindex(new.interface)
            except OSError:
                raise ApplyError(f"settings.interface: no interface {new.interface!r}") from None
        try:
            if any(getattr(old, f) != getattr(new, f) for f in SIZE_FIELDS):
                self._replace_maps(state)
            elif old.model_dump(exclude=set(ATTACH_FIELDS)) != new.model_dump(exclude=set(ATTACH_FIELDS)):
                self._reload_program(state)
            else:
                self.dataplane.apply(state, self.health.down())
            self._attach(new)
        except (PlanError, RingError, BpfError, OSError) as err:
            raise ApplyError(str(err)) from None
        self.state = state
        self.health.sync(state, time.monotonic())

    def _reload_program(self, state: LbState) -> None:
        """New constants: a new program over the same pinned maps, swapped in atomically."""
        tables = self._dataplane.tables
        self._load(state.settings, adopt=True)
        self._dataplane.tables = tables
        self._dataplane.apply(state, self.health.down())
        if self.attached is not None:
            self._chain.set(SLOTS["lb"], self.program)

    def _replace_maps(self, state: LbState) -> None:
        """New map sizes: fill fresh maps, swap the program in, then pin the new maps."""
        dataplane = Dataplane.load(lb_spec(state.settings), settings=state.settings)
        try:
            dataplane.apply(state, self.health.down())
            if self.attached is not None:
                self._chain.set(SLOTS["lb"], dataplane.xdp_lb)
        except BaseException:
            dataplane.close()
            raise
        self._close_object()
        self._unpin_maps()
        for name, m in dataplane.maps().items():
            m.pin(self.pin_dir / name)
        self.dataplane = dataplane
        self._pin_program()

    def _pin_program(self) -> None:
        path = self.pin_dir / "xdp_lb"
        if path.exists():
            path.unlink()
        self.program.pin(path)

    def _attach(self, settings: LbSettings) -> None:
        """Hold `settings.interface` in the XDP chain with the lb in its slot (or neither)."""
        if settings.interface == self.attached:
            return
        self._detach()
        if settings.interface is None:
            return
        self._chain.hold(settings.interface, "lb", settings.xdp_mode)
        self._chain.set(SLOTS["lb"], self.program)
        self.attached = settings.interface

    def _detach(self) -> None:
        if self.attached is None:
            return
        self._chain.clear(SLOTS["lb"])
        try:
            self._chain.release(self.attached, "lb")
        except ValueError:
            pass  # the interface is gone, and the root with it
        self.attached = None

    def _unpin_maps(self) -> None:
        for name in Dataplane.map_names():
            if (self.pin_dir / name).exists():
                (self.pin_dir / name).unlink()

    def _close_object(self) -> None:
        if self._simulator is not None:
            self._simulator.close()
            self._simulator = None
        if self.dataplane is not None:
            self.dataplane.close()
            self.dataplane = None

    def stop(self, detach: bool) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if detach:
            self._detach()
        self._close_object()
        if self.chain is not None:
            self.chain.leave(remove=detach)
            self.chain = None
        if detach:
            pins.unpin(self.pin_root / "lb")

    # --- health checks --------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Start due probes, collect finished ones; a real that changes state re-shapes the rings."""
        if self.dataplane is None:
            return
        changed = False
        for target, future in list(self._probes.items()):
            if future.done():
                del self._probes[target]
                ok, error = future.result()
                changed |= self.health.record(target, ok, error, now)
        for target, health in self.health.due(now):
            self._probes[target] = self._pool.submit(probe, health.check, target[1], health.port)
        if changed:
            self.health_changes += 1
            try:
                self.dataplane.apply(self.state, self.health.down())
            except (PlanError, RingError, BpfError) as err:
                log.error("lb: applying a health change failed: %s", err)

    # --- reporting ------------------------------------------------------------------------------
    def stats(self) -> dict:
        if self.dataplane is None:
            raise ApplyError("the lb data plane is not started")
        dp = self.dataplane
        counters = dp.counters()
        vips, reals = {}, {}
        for (address, port, proto), entry in dp.tables.vips.items():
            packets, nbytes = dp.vip_counters(entry.vip_num)
            vips[vip_name(address, port, PROTOCOL_NAMES[proto])] = {"packets": packets, "bytes": nbytes}
        for real_id, address in dp.tables.reals.items():
            packets, nbytes = dp.real_counters(real_id)
            reals[str(address)] = {"packets": packets, "bytes": nbytes}
        return {
            "packets": {name: value["packets"] for name, value in counters.items()},
            "bytes": {name: value["bytes"] for name, value in counters.items()},
            "vip_packets": {name: v["packets"] for name, v in vips.items()},
            "vip_bytes": {name: v["bytes"] for name, v in vips.items()},
            "real_packets": {name: v["packets"] for name, v in reals.items()},
            "real_bytes": {name: v["bytes"] for name, v in reals.items()},
            "reals_down": len(self.health.down()),
            # what the maps take in kernel memory, and the flows the connection table holds
            "conn_table_size": dp.settings.conn_table_size,
            "map_bytes": map_bytes(dp.settings),
            "health_changes": self.health_changes,
        }

    def query(self, name: str, params: dict) -> Any:
        if name == "health":
            return self.health.report()
        if name == "ring":
            return self.ring_shares(_param(params, "vip"))
        if name == "flow":
            return self.pick(params).as_dict()
        raise KeyError(name)

    def ring_shares(self, vip: str) -> list[dict]:
        """Slots per real of a VIP's ring, as the data plane holds it."""
        address, port, protocol = parse_vip_name(vip)
        entry = self._dataplane.tables.vips.get((address, port, PROTOCOL_NUMBERS[protocol]))
        if entry is None:
            raise ValueError(f"no VIP {vip}")
        ring = self._dataplane.tables.rings.get(entry.vip_num, [])
        counts: dict[int, int] = {}
        for real_id in ring:
            counts[real_id] = counts.get(real_id, 0) + 1
        vip_obj = self.state.vip(vip_name(address, port, protocol))
        down = self.health.down()
        rows = []
        for real in vip_obj.reals:
            held = next((i for i, a in self._dataplane.tables.reals.items() if a == real.address), None)
            slots = counts.get(held, 0) if held is not None else 0
            rows.append({"real": str(real.address), "weight": real.weight,
                         "healthy": (vip_obj.name, real.address) not in down,
                         "slots": slots, "share": round(slots / len(ring), 6) if ring else 0.0})
        return rows

    def pick(self, params: dict):
        """Which real a flow goes to: params src, sport, dst, dport, protocol."""
        if self._simulator is None:
            self._simulator = Simulator(self.state.settings, self._dataplane)
        protocol = params.get("protocol", "tcp")
        if protocol not in PROTOCOL_NUMBERS:
            raise ValueError(f"protocol must be tcp or udp, got {protocol!r}")
        return self._simulator.pick(_param(params, "src"), port_param(params, "sport"), _param(params, "dst"),
                                    port_param(params, "dport"), protocol)


def _param(params: dict, name: str) -> str:
    if name not in params:
        raise ValueError(f"missing parameter {name!r}")
    return params[name]


def port_param(params: dict, name: str) -> int:
    """A port number parameter; ValueError (the API's 400) names it when it is not 0..65535."""
    text = _param(params, name)
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"{name} must be a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} {port} is not in 0..65535")
    return port
