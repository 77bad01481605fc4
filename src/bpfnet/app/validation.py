"""pydantic's validation errors as the one-line message every entry point shows (the API's 422,
the CLIs' `error: ...`, the agent's refusal of a stored state), and as structured errors."""

from __future__ import annotations

import re

from pydantic import ValidationError

MESSAGE_PART_CHARS = 300  # an echoed input or error is cut to this, so a 1 MB string stays readable
MESSAGE_ERRORS = 5  # errors spelled out in one message; the rest are counted


def shorten(text: str, limit: int = MESSAGE_PART_CHARS) -> str:
    """`text`, or its start and end around '...(N chars)...' when longer than `limit`."""
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 10, 1)
    return f"{text[:keep]}...({len(text)} chars)...{text[-keep:]}"


# What a key in a config looks like (field names, label keys such as app.kubernetes.io/name).
_KEY = re.compile(r"[A-Za-z0-9_/-]{1,253}")
ODD_KEY_SHOWN = 16  # a longer key of other characters is not echoed: it comes from a file that is
                    # no config (`-f /etc/shadow` would print its lines back as "extra fields")


def _segment(part) -> str:
    """One step of a location; a key that would blur the path (empty, '.', ':', spaces, control
    characters) is quoted, and a long one of such characters is only counted."""
    text = str(part)
    if isinstance(part, int) or _KEY.fullmatch(text):
        return shorten(text, 80)
    if len(text) > ODD_KEY_SHOWN and not re.fullmatch(r"[A-Za-z0-9_./-]+", text):
        return f"<a key of {len(text)} characters>"
    return shorten(repr(text), 80)


def location(loc) -> str:
    """pydantic's error location as a dotted path: ('vips', 0, 'port') -> 'vips.0.port'."""
    return ".".join(_segment(p) for p in loc)


def validation_message(err: ValidationError, *, prefix: str = "", bare_root: bool = False) -> str:
    """'vips.0.port: Input should be less than or equal to 65535 (input: 70000)'.

    `prefix` names what was validated when it is a part of something larger ('node' -> 'node.name:
    ...'). An error of a check on the whole object (no location) is named `prefix` or 'state' (its
    input only when it is not the object itself), or, with `bare_root`, is its message alone (a
    command line that validated a whole state it built itself has nothing to show of that input)."""
    errors = err.errors(include_url=False)
    parts = []
    for e in errors[:MESSAGE_ERRORS]:
        text = shorten(e["msg"].removeprefix("Value error, "))  # pydantic's wrapper
        where = ".".join(part for part in (prefix, location(e["loc"])) if part)
        if not e["loc"] and bare_root:
            parts.append(f"{prefix}: {text}" if prefix else text)
            continue
        message = f"{where or 'state'}: {text}"
        # a check on the whole object echoes no input: it is everything that was sent
        whole = not e["loc"] and isinstance(e.get("input"), dict | list)
        shown = "input" in e and not whole
        parts.append(f"{message} (input: {shorten(repr(e['input']), 80)})" if shown else message)
    if len(errors) > MESSAGE_ERRORS:
        parts.append(f"and {len(errors) - MESSAGE_ERRORS} more errors")
    return "; ".join(parts)


def structured_errors(err: ValidationError) -> list[dict]:
    """pydantic's errors for programs: type, loc and msg (inputs are left out: they can be huge)."""
    return [{"type": e["type"], "loc": list(e["loc"]), "msg": shorten(e["msg"])}
            for e in err.errors(include_url=False, include_context=False, include_input=False)]
