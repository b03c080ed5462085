"""Problems: an input that was set aside, and why. The builder's quarantine report, the caption
command's warnings and the evaluation's list of skipped inputs are all lists of these."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    """One input set aside.

    `path` names the input as the user knows it: a file relative to the input folder, a manifest
    line (`manifest.jsonl:3`) or a dataset row (`data[test][4]`). `stage` says which step refused
    it: scan (reading the layout), label, probe (the video), pack (storing it), partner (its clip
    or label was set aside: `partner` names that one) or read (evaluation inputs).
    """

    path: str
    stage: str
    reason: str
    partner: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


class InputError(ValueError):
    """An input that can't be read at all (not one clip of it): the message is the one line to print."""


def warn(problems: list[Problem], file=None) -> None:
    """Print each problem as one `set aside:` line on stderr."""
    for problem in problems:
        print(f"set aside: {problem}", file=file or sys.stderr)
