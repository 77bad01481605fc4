"""The XDP chain: bpfnet's XDP apps share an interface as stages of one root program.

The root (bpf/xdp_root.bpf.c) is attached to the interface and tail-calls slot 0 of the
`xdp_chain` prog array; each stage passes packets on to the next slot (include/xdp_chain.h).
Replacing a stage is one prog-array update, so every packet sees the old or the new stage.
With a pin directory the link and the prog array outlive the process, and the next one adopts them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .link import Link
from .map import Map
from .object import ObjectSpec
from .program import Program

SLOTS = {"ddos": 0, "lb": 1}  # the fixed order: ddos before lb


class XdpChain:
    def __init__(self, link: Link, chain: Map, pin_dir: Path | None) -> None:
        self.link = link  # its program is the root
        self.map = chain
        self.pin_dir = pin_dir

    @classmethod
    def attach(cls, ifindex: int, pin_dir: Path | None = None, mode: str = "native") -> XdpChain:
        """Attach the root to `ifindex`, or adopt the one pinned in `pin_dir`."""
        if pin_dir is not None and (Path(pin_dir) / "link").exists():
            return cls(Link.from_pin(Path(pin_dir) / "link"), Map.from_pin(Path(pin_dir) / "xdp_chain"),
                       Path(pin_dir))
        with ObjectSpec.builtin("xdp_root").load(pin_dir=pin_dir) as root:
            link = root.programs["xdp_root"].attach_xdp(ifindex, mode)
            chain = Map.from_fd(os.dup(root.maps["xdp_chain"].fd))
        if pin_dir is not None:
            link.pin(Path(pin_dir) / "link")
        return cls(link, chain, pin_dir)

    def stage(self, spec: ObjectSpec, slot: int) -> ObjectSpec:
        """Prepare `spec` (a stage's object) to run in `slot` of this chain."""
        spec.reuse_map("xdp_chain", self.map)
        spec.constants["chain_slot"] = slot
        return spec

    def set(self, slot: int, program: Program) -> None:
        self.map.update(struct.pack("<I", slot), struct.pack("<I", program.fd))

    def clear(self, slot: int) -> None:
        self.map.delete(struct.pack("<I", slot))

    def root(self) -> Program:
        """The attached root program (a new handle the caller closes)."""
        return Program.from_id(self.link.program_id)

    def program_ids(self) -> dict[int, int]:
        """slot -> id of the program in it."""
        return {struct.unpack("<I", k)[0]: struct.unpack("<I", v)[0] for k, v in self.map.items()}

    def close(self) -> None:
        """Let go of the fds; a pinned chain stays attached."""
        self.link.close()
        self.map.close()

    def detach(self) -> None:
        """Detach the root and remove the pins."""
        self.link.detach()
        if self.pin_dir is not None:
            for name in ("link", "xdp_chain"):
                (Path(self.pin_dir) / name).unlink(missing_ok=True)
        self.close()

