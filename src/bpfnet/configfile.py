"""Reading the file of `bpfnet <app> apply -f FILE`: YAML (JSON is YAML too) into plain data, or a
ConfigFileError whose message is one line naming the file and what is wrong with it, which the
CLIs print as `error: ...` (no traceback for a binary file, a syntax error or absurd nesting)."""

from __future__ import annotations

import math
import os
import stat
import sys
from pathlib import Path
from typing import Any

import yaml

from bpfnet.errors import BpfnetError


class ConfigFileError(BpfnetError, ValueError):
    """The file cannot be read as a config; the message is one line."""


MAX_CONFIG_BYTES = 16 * 1024 * 1024  # the agent's limit for a request body (bpfnet.agent.api)


def read_config_text(path: str | Path) -> str:
    """The text of `path` ('-' reads stdin), at most MAX_CONFIG_BYTES. Only regular files are
    read: /dev/zero would never end and a FIFO can block for ever."""
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1)
        else:
            # O_NONBLOCK: opening a FIFO must not wait for a writer before we can refuse it
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as file:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ConfigFileError(f"{path}: not a regular file")
                data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigFileError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB, the limit of a config")
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ConfigFileError(f"{path}: {err.strerror or err}") from None


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: 'line 3, column 1: expected ... (while parsing ...)'."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    if not problem:
        return " ".join(str(err).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + problem + (f" ({context})" if context else "")


def parse_yaml(text: str, source: str = "input", *, all_documents: bool = False) -> Any:
    """The data in `text` (a list of documents with `all_documents`); numbers must be finite."""
    try:
        data = list(yaml.safe_load_all(text)) if all_documents else yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{source}: not valid YAML or JSON: {describe_yaml_error(err)}") from None
    except RecursionError:
        raise ConfigFileError(f"{source}: nested too deeply") from None
    not_finite = first_non_finite(data)
    if not_finite is not None:
        where, value = not_finite
        raise ConfigFileError(f"{source}: {where}: {value} is not a finite number")
    return data


def load_config_file(path: str | Path) -> Any:
    """`read_config_text` then `parse_yaml`: the data of a config file, or ConfigFileError."""
    return parse_yaml(read_config_text(path), str(path))


def first_non_finite(data: Any) -> tuple[str, float] | None:
    """Where a .nan or .inf is (no state takes them, and JSON, which the API speaks, cannot carry
    them). Iterative and each node once, so shared YAML aliases ("billion laughs") stay cheap."""
    stack, seen = [(data, "")], set()
    while stack:
        value, where = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where or "value", value
        if isinstance(value, (dict, list)) and id(value) not in seen:
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((item, f"{where}.{key}" if where else str(key)) for key, item in items)
    return None
