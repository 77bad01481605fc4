"""Shared test setup: root-only tests skip elsewhere; nothing is left in bpffs afterwards."""

import os

import pytest
from hypothesis import settings

IS_ROOT = os.geteuid() == 0

# Property tests draw the same examples on every run, so CI is deterministic (a property that only
# fails for some random draws would sink an unrelated submission); explore new draws locally with
# HYPOTHESIS_PROFILE=explore.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root and a BPF-capable kernel (CI runs as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if IS_ROOT:
        from bpfnet.ebpf.pins import PIN_ROOT, remove_empty_parents

        if PIN_ROOT.is_dir() and not any(PIN_ROOT.iterdir()):
            remove_empty_parents(PIN_ROOT)
