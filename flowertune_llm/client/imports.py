"""Import a library without one of its optional dependencies."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def hidden_module(name: str) -> Iterator[None]:
    """Within the block, `name` looks uninstalled: `find_spec` returns None and importing it fails.

    Libraries that import an optional package when it is installed (`if is_x_available(): import x`)
    then skip it. A module already imported stays visible, so a process that uses it is not changed;
    afterwards the name is importable again.
    """
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # the import system's marker for "not importable"
    try:
        yield
    finally:
        if sys.modules.get(name, "") is None:
            del sys.modules[name]
