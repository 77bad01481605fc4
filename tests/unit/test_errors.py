"""One error root: every exception class bpfnet defines derives from BpfnetError, and no two
share a name (an `except` names what it catches without ambiguity)."""

import importlib
import inspect
import pkgutil

import bpfnet
from bpfnet.errors import BpfnetError


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(bpfnet.__path__, "bpfnet."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                  if issubclass(cls, BaseException) and cls.__module__ == module.__name__]
    return found


def test_every_exception_derives_from_the_root():
    classes = _exception_classes()
    assert len(classes) > 20
    assert [c.__qualname__ for c in classes if not issubclass(c, BpfnetError)] == []


def test_exception_names_are_unique():
    names = [c.__name__ for c in _exception_classes()]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_built_in_bases_are_kept_where_callers_catch_them():
    from bpfnet.ebpf import BpfError, LayoutError
    from bpfnet.podnet.config import ConfigError

    assert issubclass(BpfError, OSError) and issubclass(LayoutError, ValueError)
    assert issubclass(ConfigError, ValueError)
