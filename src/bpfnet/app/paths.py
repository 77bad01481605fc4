"""Where the agent lives on a machine (kept apart so that clients import nothing heavy)."""

from pathlib import Path

DEFAULT_SOCKET = Path("/run/bpfnet/agent.sock")  # root-only API; agent.pid and agent.log beside it
DEFAULT_STATE_DB = Path("/var/lib/bpfnet/state.db")
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/bpfnet")  # bpfnet.ebpf.pins.PIN_ROOT, without loading libbpf
