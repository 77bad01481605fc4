"""bpfnet.ebpf: a small binding of the system libbpf, shaped like cilium/ebpf.

ObjectSpec (edit constants and map sizes) -> Object (maps and programs) -> Link (attachment).
"""

from . import pins
from ._libbpf import POSSIBLE_CPUS, AttachType, MapType, ProgType
from .bind import Objects
from .errors import BpfError, LayoutError, VerifierError
from .link import Link
from .map import Map, TypedMap
from .object import Object, ObjectSpec
from .program import Program, TestRun, cgroup2_root

__all__ = ["AttachType", "BpfError", "LayoutError", "Link", "Map", "MapType", "Object", "Objects", "ObjectSpec",
           "POSSIBLE_CPUS", "Program", "ProgType", "TestRun", "TypedMap", "VerifierError",
           "cgroup2_root", "pins"]
