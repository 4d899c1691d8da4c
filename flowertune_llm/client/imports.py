"""Import libraries without what a client process never uses: an optional dependency, a heavy submodule."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


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


class _Deferred(types.ModuleType):
    """Stands in for a submodule in `sys.modules` until one of its attributes is read, then imports it.

    Dunder names other than `__path__` (which importing a child of it needs) do not count as a
    read: tools that scan `sys.modules` (`inspect.getmodule`, which torch calls when it registers an
    operator) probe every module for `__file__` and the like.
    """

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__") and attribute != "__path__":
            raise AttributeError(attribute)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        # The real module replaces this one in sys.modules and on its parent package.
        return getattr(importlib.import_module(self.__name__), attribute)


def defer_submodule(name: str) -> None:
    """Import `name`, a submodule of a top-level package ("package.plots"), only when something reads it.

    For packages whose `__init__` imports a heavy submodule that this process never uses. Call it
    before the package is imported; it changes nothing once the package or the submodule is loaded,
    or if they cannot be found.
    """
    package, _, child = name.partition(".")
    if not child or "." in child or package in sys.modules or name in sys.modules:
        return
    package_spec = importlib.util.find_spec(package)  # a top-level name: finds it, imports nothing
    if package_spec is None or not package_spec.submodule_search_locations:
        return
    spec = importlib.machinery.PathFinder.find_spec(name, package_spec.submodule_search_locations)
    if spec is None:
        return
    stand_in = _Deferred(name)
    stand_in.__spec__, stand_in.__file__ = spec, spec.origin
    sys.modules[name] = stand_in
