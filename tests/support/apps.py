"""The built-in apps a test can use on this machine."""

from __future__ import annotations

import importlib

from bpfnet.app.controller import BUILTIN_APPS


def importable_apps() -> list[str]:
    """The names of the built-in apps whose controller module imports here (an app that needs a
    missing optional dependency is left out)."""
    return [app for app in BUILTIN_APPS if _importable(app)]


def _importable(app: str) -> bool:
    try:
        importlib.import_module(BUILTIN_APPS[app])
    except Exception:
        return False
    return True
