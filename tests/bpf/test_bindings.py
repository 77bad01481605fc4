"""Declarative bindings against the real objects: every binding of bpfnet's apps loads, a mirror
whose fields are swapped (same sizes, so the old size check let it through) is refused at load
with the struct and field named, and a missing map or program is named."""

import ctypes
from typing import Annotated

import pytest

from bpfnet.ddos.dataplane import Bucket, DdosObjects
from bpfnet.ebpf import LayoutError, Map, Objects, Program, TypedMap
from bpfnet.ebpf.chain import XdpRootObjects
from bpfnet.lb.dataplane import LbObjects, VipKey
from bpfnet.podnet.dataplane import PodObjects
from bpfnet.podnet.servicelb import SockLbObjects

pytestmark = pytest.mark.root


@pytest.mark.parametrize("objects", [LbObjects, DdosObjects, PodObjects, SockLbObjects, XdpRootObjects])
def test_every_binding_loads_and_fills_its_attributes(objects):
    with objects.load() as bound:
        for attribute, binding in objects.bindings().items():
            value = getattr(bound, attribute)
            assert isinstance(value, binding.kind)
            name = value.name if isinstance(value, Map | Program) else value.map.name
            assert name == binding.name


class SwappedVipMeta(ctypes.Structure):
    """struct lb_vip_meta is {flags, vip_num}: two __u32, here in the other order."""
    _fields_ = [("vip_num", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class SwappedLb(LbObjects):
    vip_map: TypedMap[VipKey, SwappedVipMeta]


def test_a_swapped_field_is_refused_at_load():
    with pytest.raises(LayoutError, match=r"map vip_map value: struct lb_vip_meta field 0 is flags "
                                          r"\(offset 0, 4 bytes\), Python's SwappedVipMeta has vip_num"):
        SwappedLb.load()


class SwappedBucket(ctypes.Structure):
    _fields_ = [("last_ns", ctypes.c_uint64), ("tokens", ctypes.c_uint64)]


class SwappedSourceBuckets(DdosObjects):
    source_buckets: Annotated[TypedMap[ctypes.c_uint32 * 6, SwappedBucket], "ddos_src_bkts"]


def test_a_swapped_field_is_refused_in_any_map_the_binding_types():
    assert [name for name, *_ in Bucket._fields_] == ["tokens", "last_ns"]  # the faithful mirror
    with pytest.raises(LayoutError, match=r"map ddos_src_bkts value: struct ddos_bucket field 0 is tokens"):
        SwappedSourceBuckets.load()


class MissingParts(Objects):
    source = "runtime_check"
    table: Map
    nowhere: Map
    xdp_check: Program
    xdp_nothing: Program


def test_missing_maps_and_programs_are_named():
    with pytest.raises(LayoutError, match=r"object runtime_check has no map 'nowhere', program 'xdp_nothing' "
                                          r"\(bound by MissingParts\)"):
        MissingParts.load()


def test_an_attribute_binds_a_differently_named_map():
    class Renamed(Objects):
        source = "runtime_check"
        per_cpu_packets: Annotated[TypedMap[ctypes.c_uint32, ctypes.c_uint64], "packets"]

    with Renamed.load() as bound:
        assert bound.per_cpu_packets.map.name == "packets"
        assert Renamed.map_names() == ["packets"]
