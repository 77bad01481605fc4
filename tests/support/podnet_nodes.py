"""Node n1's pod data plane for BPF_PROG_TEST_RUN tests of two nodes joined by VXLAN: the maps
filled as the controller fills them (desired_maps with an Overlay, services.entries), frames sent
as if leaving a local pod, and frames as the VXLAN device receives them, through a shim that sets
the tunnel key and tail-calls pod_from_overlay (test_run cannot hand a program a received tunnel
key otherwise)."""

import struct
from ipaddress import IPv4Address

from bpfnet.ebpf import Map, MapType, Program, ProgType, asm
from bpfnet.ebpf.asm import R0, R1, R2, R3, R4, R6, R10
from bpfnet.podnet.config import Namespace, Node, Pod, PodnetState
from bpfnet.podnet.dataplane import EndpointLink, NodeDataplane, Overlay, desired_maps, mac_bytes
from bpfnet.podnet.policy import compile_policy
from bpfnet.podnet.services import entries

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
SKB_CTX = 192
CB_OFFSET = 48
VXLAN_IFINDEX = 77          # the node's VXLAN device as pod_node tells the program
UNDERLAY = {"n1": IPv4Address("192.168.255.1"), "n2": IPv4Address("192.168.255.2")}
HELPER_SKB_SET_TUNNEL_KEY = 21
TUNNEL_KEY_SIZE = 44        # sizeof(struct bpf_tunnel_key)
TUNNEL_KEY_LOCAL_IPV4 = 28


class TwoNodes:
    """Pods on n1 and n2: key -> (node, address, labels, fake host-veth ifindex on n1)."""

    def __init__(self, pods: dict[str, tuple[str, str, dict, int]]) -> None:
        self.pods = pods

    def pod_mac(self, key: str) -> str:
        return f"02:00:00:00:00:{self.pods[key][3] % 256:02x}"

    def gateway_mac(self, key: str) -> str:
        return f"02:ff:00:00:00:{self.pods[key][3] % 256:02x}"

    def address(self, key: str) -> str:
        return self.pods[key][1]

    def links(self) -> dict[str, EndpointLink]:
        return {k: EndpointLink(ifindex, mac_bytes(self.pod_mac(k)), mac_bytes(self.gateway_mac(k)))
                for k, (node, _, _, ifindex) in self.pods.items() if node == "n1"}

    def state(self, services=(), policies=()) -> PodnetState:
        return PodnetState(
            nodes=[Node(name="n1", pod_cidr="10.0.0.0/24", underlay_address=UNDERLAY["n1"]),
                   Node(name="n2", pod_cidr="10.0.1.0/24", underlay_address=UNDERLAY["n2"])],
            namespaces=[Namespace(name="x", labels={"ns": "x"}), Namespace(name="y", labels={"ns": "y"})],
            pods=[Pod(namespace=k.split("/")[0], name=k.split("/")[1], labels=labels, node=node,
                      address=addr, ports=[]) for k, (node, addr, labels, _) in self.pods.items()],
            services=list(services), policies=list(policies))


def tunnel_shim(target: Program, prog_array: Map, identity: int, remote: IPv4Address) -> Program:
    """set_tunnel_key(id=identity, remote) then tail-call `target`: a packet as the VXLAN device
    receives it (the sender's address also as local_ipv4, which bpf_skb_get_tunnel_key reads back
    as remote_ipv4)."""
    a = asm.Assembler()
    a.emit(asm.mov64(R6, R1))
    for offset in range(-48, 0, 8):
        a.emit(asm.st(8, R10, offset, 0))
    a.emit(asm.st(4, R10, -48, identity), asm.st(4, R10, -44, int(remote)),  # host order
           asm.st(4, R10, -48 + TUNNEL_KEY_LOCAL_IPV4, int(remote)),
           asm.mov64(R1, R6), asm.mov64(R2, R10), asm.alu64(asm.ADD, R2, -48),
           asm.mov64(R3, TUNNEL_KEY_SIZE), asm.mov64(R4, 0), asm.call(HELPER_SKB_SET_TUNNEL_KEY),
           asm.mov64(R1, R6), asm.ld_map_fd(R2, prog_array.fd), asm.mov64(R3, 0),
           asm.call(asm.Helper.tail_call), asm.mov64(R0, TC_ACT_SHOT), asm.exit_insn())
    prog_array.update(bytes(4), target.fd.to_bytes(4, "little"))
    return Program.load_raw(ProgType.SCHED_CLS, a.assemble(), name="tunnel_shim")


class NodeHarness:
    """Node n1's data plane, loaded and unattached; `apply` fills its maps."""

    def __init__(self, cluster: TwoNodes, shim_map: str) -> None:
        self.cluster = cluster
        self.dp = NodeDataplane.load()
        self.prog_array = Map.create(MapType.PROG_ARRAY, 4, 4, 1, name=shim_map)
        self.compiled = None
        self.state = None

    def apply(self, services=(), policies=(), overlay=True):
        self.state = self.cluster.state(services, policies)
        self.compiled = compile_policy(self.state)
        result = self.dp.sync(desired_maps(self.compiled, "n1", self.cluster.links(),
                                           Overlay(VXLAN_IFINDEX, UNDERLAY) if overlay else None))
        self.dp.apply_services(entries(self.state))
        return result

    def identity(self, key):
        return self.compiled.identities[key]

    def send(self, key, frame):
        """A frame leaving local pod `key` -> (verdict, frame, (cb0 ifindex, cb1 endpoint, cb2 id))."""
        addr = IPv4Address(self.cluster.address(key)).packed
        original = self.dp.endpoints.lookup(addr)
        moved = type(original).from_buffer_copy(bytes(original))
        moved.ifindex = 1  # as if on its host veth: test_run runs on lo
        self.dp.endpoints.update(addr, moved)
        try:
            result = self.dp.from_container.test_run(bytes(frame), ctx=bytes(SKB_CTX))
        finally:
            self.dp.endpoints.update(addr, original)
        return result.retval, result.data, struct.unpack_from("<3I", result.ctx, CB_OFFSET)

    def from_overlay(self, frame, identity, remote=UNDERLAY["n2"]):
        """A frame the VXLAN device received with tunnel id `identity` -> (verdict, frame, cb[0])."""
        shim = tunnel_shim(self.dp.from_overlay, self.prog_array, identity, remote)
        try:
            result = shim.test_run(bytes(frame), ctx=bytes(SKB_CTX))
        finally:
            shim.close()
        return result.retval, result.data, struct.unpack_from("<I", result.ctx, CB_OFFSET)[0]

    def counters(self):
        return {(o.name, d.name): packets for (o, d), (packets, _) in self.dp.counters().items()}

    def close(self):
        self.prog_array.close()
        self.dp.close()
