"""The root of bpfnet's exceptions: `except BpfnetError` catches every error bpfnet raises on
purpose. A class keeps a built-in base as well (ValueError, OSError, KeyError, RuntimeError) where
callers catch it by that."""

from __future__ import annotations


class BpfnetError(Exception):
    """Base of every exception bpfnet defines."""
