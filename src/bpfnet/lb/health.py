"""Health checks of the reals: a pure tracker (rise/fall counting, clock passed in) and the probes.

The tracker decides *when* to probe and *what* a result means; the probes (TCP connect, HTTP GET,
UDP request/reply) are plain blocking functions the controller runs off the tick thread.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

from bpfnet.lb.config import HealthCheck, IPAddress, LbState

log = logging.getLogger(__name__)

Target = tuple[str, IPAddress]  # (VIP name, real address)


@dataclass
class RealHealth:
    check: HealthCheck
    port: int
    up: bool = True            # a new real is trusted until it fails `fall` probes in a row
    streak: int = 0            # consecutive results that disagree with `up`
    next_due: float = 0.0
    in_flight: bool = False
    changes: int = 0
    last_error: str | None = None
    last_change: float | None = None


@dataclass
class HealthTracker:
    targets: dict[Target, RealHealth] = field(default_factory=dict)

    def sync(self, state: LbState, now: float) -> None:
        """Track exactly the reals of VIPs with a health check; a changed check starts over."""
        wanted: dict[Target, tuple[HealthCheck, int]] = {}
        for vip in state.vips:
            if vip.health_check is None:
                continue
            port = vip.health_check.port or vip.port
            if port == 0:
                continue  # a port-less VIP needs an explicit health_check.port (config says so)
            for real in vip.reals:
                wanted[(vip.name, real.address)] = (vip.health_check, port)
        for target in list(self.targets):
            if target not in wanted:
                del self.targets[target]
        for target, (check, port) in wanted.items():
            known = self.targets.get(target)
            if known is None or known.check != check or known.port != port:
                self.targets[target] = RealHealth(check, port, next_due=now)

    def due(self, now: float) -> list[tuple[Target, RealHealth]]:
        """Targets to probe now; they count as in flight until record()."""
        ready = [(t, h) for t, h in self.targets.items() if not h.in_flight and h.next_due <= now]
        for _, health in ready:
            health.in_flight = True
        return ready

    def record(self, target: Target, ok: bool, error: str | None, now: float) -> bool:
        """Take a probe result; True when the real changed between up and down."""
        health = self.targets.get(target)
        if health is None:  # removed from the config while the probe ran
            return False
        health.in_flight = False
        health.next_due = now + health.check.interval
        health.last_error = None if ok else error
        if ok == health.up:
            health.streak = 0
            return False
        health.streak += 1
        if health.streak < (health.check.rise if ok else health.check.fall):
            return False
        health.up, health.streak = ok, 0
        health.changes += 1
        health.last_change = now
        log.warning("lb health: real %s of VIP %s is %s%s", target[1], target[0], "up" if ok else "down",
                    "" if ok else f" ({error})")
        return True

    def down(self) -> frozenset[Target]:
        return frozenset(t for t, h in self.targets.items() if not h.up)

    def report(self) -> list[dict]:
        return [{"vip": vip, "real": str(address), "up": h.up, "kind": h.check.kind, "port": h.port,
                 "changes": h.changes, "last_error": h.last_error}
                for (vip, address), h in sorted(self.targets.items(), key=lambda item: (item[0][0], str(item[0][1])))]


def probe(check: HealthCheck, address: IPAddress, port: int) -> tuple[bool, str | None]:
    """One probe of a real: (healthy, why not)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        if check.kind == "udp":
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(check.timeout)
                sock.connect((str(address), port))
                sock.send(check.send.encode())
                reply = sock.recv(65535)
            if check.expect is not None and check.expect.encode() not in reply:
                return False, f"udp reply without {check.expect!r}"
            return True, None
        with socket.create_connection((str(address), port), timeout=check.timeout) as sock:
            if check.kind == "tcp":
                return True, None
            sock.sendall(f"GET {check.path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            status_line = sock.makefile("rb").readline(256).decode(errors="replace").split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            return False, "no HTTP status line"
        if not 200 <= int(status_line[1]) < 400:
            return False, f"HTTP {status_line[1]}"
        return True, None
    except OSError as err:
        return False, f"{type(err).__name__}: {err.strerror or err}"
