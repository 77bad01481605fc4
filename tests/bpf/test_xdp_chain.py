"""The XDP chain: stages run in slot order, empty slots are skipped, interfaces are held and
released by apps, a pinned chain is adopted with its stages."""

import socket
import subprocess
import uuid

import pytest

from bpfnet.ebpf import ObjectSpec, pins
from bpfnet.ebpf.chain import XdpChain

pytestmark = pytest.mark.root
XDP_DROP, XDP_PASS = 1, 2


@pytest.fixture
def ifindex():
    name = f"ch{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
    try:
        yield socket.if_nametoindex(name)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


@pytest.fixture
def pin_dir():
    directory = pins.pin_dir("test-chain", uuid.uuid4().hex[:8])
    try:
        yield directory
    finally:
        pins.unpin(directory.parent)


def root_verdict(chain: XdpChain) -> int:
    with chain.root() as root:
        return root.test_run(bytes(64)).retval


def attached_program(ifindex: int) -> str:
    out = subprocess.run(["ip", "-d", "link", "show", socket.if_indextoname(ifindex)],
                         capture_output=True, text=True).stdout
    return out.split("name ")[1].split()[0] if "prog/xdp" in out else ""


def test_stages_run_in_order_and_empty_slots_are_skipped(ifindex):
    chain = XdpChain.attach(ifindex)
    try:
        assert attached_program(ifindex) == "xdp_root"
        assert root_verdict(chain) == XDP_PASS
        with chain.stage(ObjectSpec.builtin("xdp_root"), 0).load() as passer, \
             ObjectSpec.builtin("bench_sink").load() as sink:
            chain.set(0, passer.programs["xdp_chain_pass"])
            assert root_verdict(chain) == XDP_PASS  # stage 0 passes on, slot 1 empty
            chain.set(1, sink.programs["xdp_drop"])
            assert root_verdict(chain) == XDP_DROP
            assert chain.program_ids() == {0: passer.programs["xdp_chain_pass"].id,
                                           1: sink.programs["xdp_drop"].id}
            chain.clear(0)
            assert root_verdict(chain) == XDP_DROP  # an empty slot is skipped: slot 1 still runs
            chain.clear(1)
            assert root_verdict(chain) == XDP_PASS
    finally:
        chain.detach()
    assert attached_program(ifindex) == ""


def test_the_root_stays_while_any_app_holds_the_interface(ifindex, pin_dir):
    chain = XdpChain.open(pin_dir)
    try:
        chain.hold(ifindex, "ddos")
        chain.hold(ifindex, "lb")
        chain.release(ifindex, "ddos")
        assert attached_program(ifindex) == "xdp_root" and chain.held() == {ifindex: 2}
        chain.release(ifindex, "lb")
        assert attached_program(ifindex) == "" and chain.held() == {}
        assert not list(pin_dir.glob("link_*"))
        with pytest.raises(ValueError, match="no interface 'nosuch0'"):
            chain.hold("nosuch0", "lb")
    finally:
        chain.detach()


def test_a_pinned_chain_is_adopted_with_its_stages_and_holders(ifindex, pin_dir):
    first = XdpChain.open(pin_dir)
    first.hold(ifindex, "lb")
    with ObjectSpec.builtin("bench_sink").load() as sink:
        first.set(0, sink.programs["xdp_drop"])
    root_id = first.root_program.id
    first.close()  # the process goes away; pins keep everything running
    assert attached_program(ifindex) == "xdp_root"
    second = XdpChain.open(pin_dir)
    assert second.root_program.id == root_id and second.held() == {ifindex: 2}
    assert root_verdict(second) == XDP_DROP  # the stage survived its loader
    second.release(ifindex, "lb")
    assert attached_program(ifindex) == ""
    second.detach()
    assert not pin_dir.exists()  # pins and their directory are gone
