"""Audit helpers: a short human summary of what a state change did."""

from __future__ import annotations

from typing import Any

MAX_CHANGES = 8  # more than this are counted, not listed


def _changes(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(old.keys() | new.keys(), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in old:
                changes.append(f"+{where}")
            elif key not in new:
                changes.append(f"-{where}")
            else:
                changes += _changes(old[key], new[key], where)
        return changes
    if isinstance(old, list) and isinstance(new, list):
        changes = []
        for index in range(max(len(old), len(new))):
            where = f"{path}[{index}]"
            if index >= len(old):
                changes.append(f"+{where}")
            elif index >= len(new):
                changes.append(f"-{where}")
            else:
                changes += _changes(old[index], new[index], where)
        return changes
    if old != new:
        return [f"~{path or '.'}: {_short(old)} -> {_short(new)}"]
    return []


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def diff_summary(old: Any, new: Any) -> str:
    """'+vips[1]; ~vips[0].port: 80 -> 8080' ('+' added, '-' removed, '~' changed)."""
    changes = _changes(old, new, "")
    if not changes:
        return "no change"
    shown = "; ".join(changes[:MAX_CHANGES])
    hidden = len(changes) - MAX_CHANGES
    return shown + (f"; and {hidden} more" if hidden > 0 else "")
