"""Which clips to caption: the `--input` argument read by the layout reader every command shares.

`--input` takes whatever `avlabel build` takes (`avlabel.core.layouts`): a built dataset (a folder,
or a Hub id, with `--split`), the recipe layout, a flat folder of clips (subfolders included), a
manifest (`.txt`, `.jsonl`, `.csv`), a single clip or a glob pattern. Labels in the input are not
needed and not read. Whatever the reader sets aside (a repeated clip id, a file that is no clip)
is printed as a `set aside:` line; a clip that won't decode is the caption run's failed record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avlabel.core.layouts import read_inputs
from avlabel.core.problems import InputError, Problem, warn


@dataclass
class ClipRef:
    clip_id: str
    path: str


def resolve_inputs(source: str, split: str = "test", cache_dir: str | Path = ".clips",
                   problems: list[Problem] | None = None) -> list[ClipRef]:
    """The clips of `source`, in the reader's order; what it set aside goes to `problems`, else to stderr.

    Raises InputError (one line) when the input can't be read or holds no clip.
    """
    inputs = read_inputs(source, split=split, cache_dir=Path(cache_dir))
    clips = [ClipRef(clip.clip_id, str(clip.video)) for clip in inputs.with_video]
    if problems is None:
        warn(inputs.problems)
    else:
        problems += inputs.problems
    if not clips:
        raise InputError(f"{source}: no clips, only {len(inputs.clips)} label(s) (a clip is a video file, e.g. .mp4, .mkv, .webm)")
    return clips
