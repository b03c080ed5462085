"""Putting a file (a clip, model weights) in a folder the commands write: the builder's dataset, the review
queue's videos, the publish dry-run folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def link_or_copy(source: str | Path, target: str | Path, *, copy: bool = False) -> None:
    """Put `source` at `target`, replacing what is there: a hard link (clips and weights can be gigabytes), else,
    on another file system, where links are not allowed or when `copy` asks for it, a copy. Raises OSError."""
    target = Path(target)
    target.unlink(missing_ok=True)  # an old link to `source` would be written through, not replaced
    if not copy:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    shutil.copyfile(source, target)
