"""The XDP chain: stages run in slot order, an empty slot passes, a pinned chain is adopted."""

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


def root_verdict(chain: XdpChain) -> int:
    with chain.root() as root:
        return root.test_run(bytes(64)).retval


def test_stages_run_in_order_and_empty_slots_pass(ifindex):
    chain = XdpChain.attach(ifindex)
    try:
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
            assert root_verdict(chain) == XDP_PASS  # slot 0 empty: later stages are not reached
    finally:
        chain.detach()


def test_a_pinned_chain_is_adopted_with_its_stages(ifindex):
    directory = pins.pin_dir("test-chain", uuid.uuid4().hex[:8])
    try:
        first = XdpChain.attach(ifindex, pin_dir=directory)
        with ObjectSpec.builtin("bench_sink").load() as sink:
            first.set(0, sink.programs["xdp_drop"])
            root_id = first.link.program_id
            first.close()
        second = XdpChain.attach(ifindex, pin_dir=directory)
        assert second.link.program_id == root_id
        assert root_verdict(second) == XDP_DROP  # the stage survived its loader
        second.detach()
        assert not (directory / "link").exists()
    finally:
        pins.unpin(directory.parent)
