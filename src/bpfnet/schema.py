"""Building blocks of the apps' schemas (lb, ddos, podnet configs and the agent's API).

What the agent accepts it must be able to keep: store it, read it back, and hold it in a map
unchanged. So every app model derives from `StrictModel` (unknown fields refused, no NaN or
infinity: JSON cannot carry them and `1e309` parses as infinity), and every integer that lands in
a BPF map is one of the `U8`..`U64` types below, named after the C field that holds it
(`src/bpfnet/bpf/include/*.h`), so an accepted value is never truncated by ctypes.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class StrictModel(BaseModel):
    """Base of every app schema model: unknown fields and non-finite floats are refused."""

    model_config = STRICT


U8 = Annotated[int, Field(ge=0, le=2 ** 8 - 1)]
U16 = Annotated[int, Field(ge=0, le=2 ** 16 - 1)]
U32 = Annotated[int, Field(ge=0, le=2 ** 32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2 ** 64 - 1)]
Port = Annotated[U16, Field(ge=1)]  # a TCP/UDP port where 0 means nothing

# Seconds a control-plane timer may be set to (rule expiry, TTLs, timeouts): far above any real
# use, and small enough that seconds * 1e9 still fits a u64 of nanoseconds (5.8e11 s).
MAX_SECONDS = 10 * 365 * 86400
# Unix times (rule expiry): until the year 2286, far inside a u64 of nanoseconds too.
MAX_UNIX_TIME = 1e10

# Free text the agent stores and shows (comments, probe payloads): bounded, so one write cannot
# grow every later GET by megabytes.
MAX_TEXT_CHARS = 1024
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]

# Linux interface names: IFNAMSIZ is 16 with the NUL; no '/', ':', whitespace or NUL.
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")
# Network namespace names are file names under /run/netns.
_NETNS = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _interface_name(value: str) -> str:
    if not _IFNAME.fullmatch(value):
        raise ValueError(f"interface name {value[:40]!r} is not valid (1-15 of A-Z a-z 0-9 _ . @ -)")
    return value


def _netns_name(value: str) -> str:
    if not _NETNS.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"network namespace name {value[:80]!r} is not valid (1-64 of A-Z a-z 0-9 _ . -)")
    return value


# the patterns bound the length (a long string fails after 16 or 65 characters) and the message
# names the rule, which a bare max_length would not
InterfaceName = Annotated[str, AfterValidator(_interface_name)]
NetnsName = Annotated[str, AfterValidator(_netns_name)]
