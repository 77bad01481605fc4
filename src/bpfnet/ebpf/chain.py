"""The XDP chain: bpfnet's XDP apps share interfaces as stages of one root program.

The root (bpf/xdp_root.bpf.c) is attached to each interface an app asks for and tail-calls slot 0
of the `xdp_chain` prog array; each stage passes packets on to the next slot
(include/common/xdp_chain.h). One prog array serves every interface, so a stage is loaded once and
replacing it is one prog-array update: every packet sees the old or the new stage.

Interfaces are held by named holders (the apps): the root stays attached while anyone holds the
interface. With a pin directory the root, the prog array, the holders and the links outlive the
process, and the next one adopts them.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

from .bind import Objects
from .link import Link
from .map import Map
from .object import ObjectSpec
from .program import Program

SLOTS = {"ddos": 0, "lb": 1}  # the fixed order: ddos before lb
HOLDER_BITS = {"ddos": 1, "lb": 2, "user": 1 << 31}


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


class XdpRootObjects(Objects):
    """xdp_root.bpf.c: the root program, the stages' prog array and who holds each interface."""

    source = "xdp_root"
    xdp_root: Program
    xdp_chain: Map
    xdp_holders: Map


class XdpChain:
    def __init__(self, root: Program, chain: Map, holders: Map, pin_dir: Path | None) -> None:
        self.root_program = root
        self.map = chain
        self.holders = holders
        self.pin_dir = Path(pin_dir) if pin_dir is not None else None
        self.links: dict[int, Link] = {}  # ifindex -> link, for chains without a pin directory

    @classmethod
    def open(cls, pin_dir: Path | None = None) -> XdpChain:
        """The chain pinned in `pin_dir` (loaded and pinned there the first time)."""
        if pin_dir is not None and (Path(pin_dir) / "xdp_root").exists():
            return cls(Program.from_pin(Path(pin_dir) / "xdp_root"), Map.from_pin(Path(pin_dir) / "xdp_chain"),
                       Map.from_pin(Path(pin_dir) / "xdp_holders"), pin_dir)
        with XdpRootObjects.load(pin_dir=pin_dir) as objects:
            root = Program.from_fd(os.dup(objects.xdp_root.fd))
            chain = cls(root, Map.from_fd(os.dup(objects.xdp_chain.fd)),
                        Map.from_fd(os.dup(objects.xdp_holders.fd)), pin_dir)
        if pin_dir is not None:
            root.pin(Path(pin_dir) / "xdp_root")
        return chain

    @classmethod
    def attach(cls, ifindex: int, pin_dir: Path | None = None, mode: str = "native") -> XdpChain:
        """A chain attached to one interface (held by "user")."""
        chain = cls.open(pin_dir)
        chain.hold(ifindex, "user", mode)
        return chain

    # --- stages ---------------------------------------------------------------------------------
    def stage(self, spec: ObjectSpec, slot: int) -> ObjectSpec:
        """Prepare `spec` (a stage's object that includes common/xdp_chain.h) to run in `slot`."""
        spec.reuse_map("xdp_chain", self.map)
        spec.constants["chain_slot"] = slot
        return spec

    def set(self, slot: int, program: Program) -> None:
        self.map.update(_u32(slot), _u32(program.fd))

    def clear(self, slot: int) -> None:
        self.map.delete(_u32(slot))

    def program_ids(self) -> dict[int, int]:
        """slot -> id of the program in it."""
        return {struct.unpack("<I", k)[0]: struct.unpack("<I", v)[0] for k, v in self.map.items()}

    def root(self) -> Program:
        """The root program (a new handle the caller closes)."""
        return Program.from_id(self.root_program.id)

    # --- interfaces -----------------------------------------------------------------------------
    def _link_pin(self, ifindex: int) -> Path | None:
        return self.pin_dir / f"link_{ifindex}" if self.pin_dir is not None else None

    def hold(self, interface: int | str, holder: str, mode: str = "native") -> None:
        """Make sure the root runs on `interface` and record that `holder` wants it there."""
        ifindex = _ifindex(interface)
        pinned = self._link_pin(ifindex)
        if ifindex not in self.links and not (pinned and pinned.exists()):
            link = self.root_program.attach_xdp(ifindex, mode)
            if pinned is not None:
                link.pin(pinned)
            self.links[ifindex] = link
        mask = self.holders.lookup(_u32(ifindex))
        current = struct.unpack("<I", mask)[0] if mask else 0
        self.holders.update(_u32(ifindex), _u32(current | HOLDER_BITS[holder]))

    def release(self, interface: int | str, holder: str) -> None:
        """`holder` no longer wants `interface`; the root leaves it when nobody does."""
        ifindex = _ifindex(interface)
        mask = self.holders.lookup(_u32(ifindex))
        remaining = (struct.unpack("<I", mask)[0] if mask else 0) & ~HOLDER_BITS[holder]
        if remaining:
            self.holders.update(_u32(ifindex), _u32(remaining))
            return
        self.holders.delete(_u32(ifindex))
        self._drop_link(ifindex)

    def _drop_link(self, ifindex: int) -> None:
        """Detach the root from `ifindex`, whether this process or an earlier one attached it."""
        link = self.links.pop(ifindex, None)
        pinned = self._link_pin(ifindex)
        if link is None and pinned is not None and pinned.exists():
            link = Link.from_pin(pinned)
        if link is not None:
            link.detach()
            link.close()
        if pinned is not None:
            pinned.unlink(missing_ok=True)

    def holds(self, interface: int | str, holder: str) -> bool:
        """Whether `holder` holds `interface` (False for an interface that is gone)."""
        try:
            ifindex = _ifindex(interface)
        except ValueError:
            return False
        return bool(self.held().get(ifindex, 0) & HOLDER_BITS[holder])

    def held(self) -> dict[int, int]:
        """ifindex -> holder bit mask."""
        return {struct.unpack("<I", k)[0]: struct.unpack("<I", v)[0] for k, v in self.holders.items()}

    def idle(self) -> bool:
        """Nobody holds an interface and no stage is set: the chain can be removed."""
        return not self.held() and not self.program_ids()

    def close(self) -> None:
        """Let go of the fds; a pinned chain stays attached."""
        for link in self.links.values():
            link.close()
        self.links.clear()
        for handle in (self.root_program, self.map, self.holders):
            handle.close()

    def leave(self, remove: bool) -> None:
        """An app is done with the chain: close it, and with `remove` also detach and unpin it when
        no app uses it any more (the other app may still hold interfaces and its slot)."""
        if remove and self.idle():
            self.detach()
        else:
            self.close()

    def detach(self) -> None:
        """Detach the root from every interface and remove the pins."""
        for ifindex in list(self.held()):
            self.holders.delete(_u32(ifindex))
            self._drop_link(ifindex)
        if self.pin_dir is not None:
            for path in self.pin_dir.glob("link_*"):
                path.unlink()
            for name in ("xdp_root", "xdp_chain", "xdp_holders"):
                (self.pin_dir / name).unlink(missing_ok=True)
            try:
                self.pin_dir.rmdir()  # leave no empty directory behind
            except OSError:
                pass  # not empty: someone else's pins
        self.close()


def _ifindex(interface: int | str) -> int:
    if isinstance(interface, int):
        return interface
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        raise ValueError(f"no interface {interface!r}") from None

