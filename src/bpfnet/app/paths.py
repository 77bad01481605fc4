"""Where the agent lives on a machine (kept apart so that clients import nothing heavy)."""

import stat
from pathlib import Path

DEFAULT_SOCKET = Path("/run/bpfnet/agent.sock")  # root-only API; agent.pid and agent.log beside it
DEFAULT_STATE_DB = Path("/var/lib/bpfnet/state.db")
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/bpfnet")  # bpfnet.ebpf.pins.PIN_ROOT, without loading libbpf


def socket_path_problem(path: Path) -> str | None:
    """Why the agent must not bind at `path` (something other than a unix socket is there: the
    agent never deletes what is not its own), or None."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    kind = ("a symlink" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a regular file" if stat.S_ISREG(mode) else "not a socket")
    return (f"{path} exists and is {kind}, not a unix socket: refusing to replace it "
            "(choose another --socket or remove it yourself)")
