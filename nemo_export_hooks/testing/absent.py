"""Make chosen packages unimportable, as if they were not installed.

Used by the tests of the missing-extra messages (:mod:`nemo_export_hooks.extras`): a Python
started with :func:`preamble` in front of its code sees the blocked packages raise
``ModuleNotFoundError`` exactly as an absent package does, whatever this environment has.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder
from typing import Iterable

__all__ = ["ModuleBlocker", "block", "preamble"]


def _covered(name: str, packages: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


class ModuleBlocker(MetaPathFinder):
    """A finder, first on ``sys.meta_path``, that refuses the given packages (``"megatron"``, or
    a subpackage such as ``"megatron.bridge"``) and every module below them."""

    def __init__(self, packages: Iterable[str]):
        self.packages = tuple(packages)

    def find_spec(self, fullname, path=None, target=None):
        if _covered(fullname, self.packages):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def block(*packages: str) -> ModuleBlocker:
    """Block ``packages`` in this interpreter (and forget any of their modules already imported)."""
    for name in list(sys.modules):
        if _covered(name, packages):
            del sys.modules[name]
    finder = ModuleBlocker(packages)
    sys.meta_path.insert(0, finder)
    return finder


def preamble(*packages: str) -> str:
    """Python source that blocks ``packages``: put it before the code of a ``python -c``."""
    return f"from nemo_export_hooks.testing.absent import block\nblock(*{list(packages)!r})\n"
