"""Pure checks of bpfnet.netns: names are validated before the kernel sees them."""

import pytest

from bpfnet.netns.runtime import _inet_checksum
from bpfnet.netns.topology import check_ifname, check_prefix


@pytest.mark.parametrize("name", ["eth0", "a" * 15, "veth_1.2"])
def test_good_interface_names(name):
    assert check_ifname(name) == name


@pytest.mark.parametrize("name", ["", "a" * 16, "eth 0", "a/b", "-x"])
def test_bad_interface_names_name_the_problem(name):
    with pytest.raises(ValueError, match=f"bad interface name {name!r}"):
        check_ifname(name)


@pytest.mark.parametrize("prefix", ["Ag", "a-b", "", "1ab", "abcdefghijklm"])
def test_bad_prefixes(prefix):
    with pytest.raises(ValueError, match="bad topology prefix"):
        check_prefix(prefix)


def test_inet_checksum_of_an_icmp_echo_request():
    # echo request id=0x1234 seq=1, no payload: 0xffff - (0x0800 + 0x1234 + 0x0001) = 0xe5ca
    assert _inet_checksum(bytes.fromhex("0800000012340001")) == 0xE5CA
    # odd length is padded with a zero byte
    assert _inet_checksum(b"\x01") == 0xFEFF
