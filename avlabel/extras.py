"""The optional extras: parts that `pip install avlabel` leaves out (pyproject's optional-dependencies).

A command that needs one imports it through `require`, which turns a missing package into one
line naming the extra to install; the `avlabel` CLI prints that line instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """`import module`, or raise MissingExtra: "<needed_for> needs the '<extra>' extra: pip install ..."."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = err.name or module
        raise MissingExtra(f"{needed_for} needs the '{extra}' extra ({missing} is not installed): "
                           f"pip install 'avlabel[{extra}]'", name=missing) from None
