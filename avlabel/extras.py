"""The optional extras: parts that `pip install avlabel` leaves out (pyproject's optional-dependencies).

A command that needs one imports it through `require`, which turns a missing package into one
line naming the extra to install; the `avlabel` CLI prints that line instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class DependencyError(ImportError):
    """A package is missing, or installed in a form that can't load; the message says what to install."""


class MissingExtra(DependencyError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """`import module`, or raise MissingExtra: "<needed_for> needs the '<extra>' extra: pip install ..."."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = err.name or module
        raise MissingExtra(f"{needed_for} needs the '{extra}' extra ({missing} is not installed): "
                           f"pip install 'avlabel[{extra}]'", name=missing) from None


# the pairs this project's tests run on (scripts/install.sh, scripts/check_floors.sh)
TESTED_TORCHCODEC = "torch 2.14 with torchcodec 0.17, torch 2.8 with torchcodec 0.7"


def require_video_decoder() -> None:
    """Import torchcodec, which datasets' Video column reads clips through, or raise DependencyError naming the fix.

    Each torchcodec release is built for one torch release and links FFmpeg's shared libraries, and it declares
    neither to pip: an install that pip accepts can hold one that does not load, and datasets then reports only
    "An error occurred while generating the dataset"."""
    import ctypes.util
    from importlib.metadata import version

    try:
        import torchcodec  # noqa: F401 - loads its FFmpeg-linked library on import
    except (ImportError, OSError, RuntimeError) as err:
        import torch

        installed = f"torchcodec {version('torchcodec')}"
        if ctypes.util.find_library("avutil") is None:
            fix = ("FFmpeg's shared libraries are not installed: install FFmpeg (apt install ffmpeg, conda install "
                   "ffmpeg; the README's Install section)")
        else:
            fix = (f"it is not the build for torch {torch.__version__}: install the torchcodec release made for your "
                   f"torch (the table: https://github.com/pytorch/torchcodec#installing-torchcodec; tested here: "
                   f"{TESTED_TORCHCODEC})")
        raise DependencyError(f"{installed} can't be loaded, and the dataset's clips are read through it: {fix}",
                              name="torchcodec") from err
