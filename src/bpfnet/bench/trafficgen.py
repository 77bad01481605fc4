"""The in-kernel traffic generator: BPF_PROG_TEST_RUN with live frames sends a template frame,
rewritten per flow (source address and port), out of a veth at several million frames a second.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from bpfnet.ebpf import ObjectSpec, Program


@dataclass(frozen=True)
class Flows:
    """Which flows the generator cycles through: `addresses` sources from `first_address`, each
    with `ports` source ports from `first_port`."""

    first_address: str = "10.0.0.1"
    addresses: int = 1
    first_port: int = 1024
    ports: int = 1

    def __post_init__(self) -> None:
        if self.addresses < 1 or self.ports < 1 or not 0 < self.first_port <= 65535:
            raise ValueError(f"invalid flows: {self}")

    @property
    def count(self) -> int:
        return self.addresses * self.ports


def require_veth(ifindex: int) -> None:
    """Refuse to send out of anything but a veth (a real NIC would carry the flood off the machine)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            link = ipr.get_links(ifindex)[0]
    except NetlinkError:
        raise ValueError(f"no interface with index {ifindex} in this network namespace") from None
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    if kind != "veth":
        raise ValueError(f"interface {link.get_attr('IFLA_IFNAME')} is {kind or 'a physical device'}: "
                         "the traffic generator sends only out of a veth")


class TrafficGenerator:
    """Sends copies of an IPv4 TCP/UDP `template` frame (Ethernet first), one flow after another."""

    def __init__(self, template: bytes, flows: Flows = Flows()) -> None:
        if len(template) < 34 or template[12:14] != b"\x08\x00" or template[14] != 0x45:
            raise ValueError("template must be an Ethernet + IPv4 frame without IP options")
        protocol = template[23]
        if protocol not in (6, 17):
            raise ValueError(f"template protocol {protocol}: the generator sends TCP or UDP")
        csum_offset = 34 + (16 if protocol == 6 else 6)
        header_words = min(len(template), 64) // 8
        headers = template[:header_words * 8].ljust(64, b"\0")
        spec = ObjectSpec.builtin("trafficgen")
        spec.constants.update(
            flows=flows.count,
            src_addr_base=int(ipaddress.IPv4Address(flows.first_address)),
            src_addrs=flows.addresses,
            src_port_base=flows.first_port,
            src_ports=flows.ports,
            template_l4_csum=struct.unpack_from("<H", template, csum_offset)[0],
            template_src_addr=struct.unpack_from("<I", template, 26)[0],
            template_src_port=struct.unpack_from("<H", template, 34)[0],
            headers=headers,
            header_words=header_words,
        )
        self.template = bytes(template)
        self.flows = flows
        self._object = spec.load()
        self.program: Program = self._object.programs["xdp_generate"]

    def frame(self, index: int) -> bytes:
        """The frame the generator sends as its `index`-th (for tests: run once, no live frames)."""
        self._object.maps["sequence"].update(b"\0" * 4, struct.pack("<Q", index))
        result = self.program.test_run(self.template)
        return result.data

    def send(self, ifindex: int, count: int, batch_size: int = 64) -> None:
        """Send `count` frames out of `ifindex` (in the calling thread's network namespace). Only a
        veth is accepted: generated traffic stays between namespaces made for it."""
        require_veth(ifindex)
        self.program.run_live_frames(self.template, repeat=count, ifindex=ifindex, batch_size=batch_size)

    def close(self) -> None:
        self._object.close()

    def __enter__(self) -> TrafficGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
