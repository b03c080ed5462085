"""Caption records on disk, and the one rule that picks a clip's record among several.

`avlabel caption` appends one JSON record per clip to `captions.jsonl` (`captions.rank-<r>.jsonl`
per process of a multi-process run, merged at the end); a rerun appends retries. Captioning,
evaluation and the catalog read them back here, so all of them agree on which record is a clip's:
a success beats a failure, otherwise the later record wins.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .problems import Problem

CAPTIONS = "captions.jsonl"


def shard_path(out_dir: Path, rank: int, world_size: int) -> Path:
    return out_dir / (CAPTIONS if world_size == 1 else f"captions.rank-{rank:05d}.jsonl")


def record_files(out_dir: Path) -> list[Path]:
    """The merged file first, then any shards of an unfinished multi-process run."""
    files = [out_dir / CAPTIONS] if (out_dir / CAPTIONS).exists() else []
    return files + sorted(out_dir.glob("captions.rank-*.jsonl"))


def run_files(path: Path) -> list[Path]:
    """The record files of a run given as an `avlabel caption` output folder (`record_files`) or as one
    file; FileNotFoundError when there are none."""
    files = record_files(path) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise FileNotFoundError(f"{path}: no {CAPTIONS} (expected an `avlabel caption` output folder or the file)")
    return files


def short_probability(x: float) -> float:
    """A probability (or mean log-probability) as caption records write it: 6 significant digits."""
    return float(f"{x:.6g}")


def clip_confidence(confidence: dict[str, float]) -> float | None:
    """A clip's confidence from its closed-set answers' probabilities: the lowest, since the least sure
    answer decides whether a person should look at the clip (None without any)."""
    return min(confidence.values(), default=None)


def succeeded(record: dict[str, Any]) -> bool:
    """A record without a status (written by hand, or by another tool) counts as a success."""
    return record.get("status", "ok") == "ok"


def read_located(path: Path, problems: list[Problem] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(`file:line`, record) for each record of a file.

    A torn last line (a run killed mid-write) is skipped. Any other line that is not a record with a
    `clip_id` raises ValueError, or, when a `problems` list is given, is reported there and skipped.
    """
    located = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
            if not isinstance(record.get("clip_id"), str) or not record["clip_id"]:
                raise ValueError(f"clip_id must be a non-empty string, got {record.get('clip_id')!r}")
        except (json.JSONDecodeError, AttributeError, ValueError) as err:
            if problems is not None:
                problems.append(Problem(where, "read", f"not a caption record ({err})"))
                continue
            if number == len(lines) and isinstance(err, json.JSONDecodeError):  # the unterminated last line of a killed run
                continue
            raise ValueError(f"{where}: not a caption record ({err})") from None
        located.append((where, record))
    return located


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one file (see `read_located`)."""
    return [record for _, record in read_located(path)]


def read_all(out_dir: Path) -> list[dict[str, Any]]:
    return [record for path in record_files(out_dir) for record in read_records(path)]


def keeps_earlier(earlier_succeeded: bool, later_succeeded: bool) -> bool:
    """Whether a clip's earlier record stands against its later one: a success beats a failure,
    otherwise the later record wins."""
    return earlier_succeeded and not later_succeeded


def repeat_problem(clip_id: str, kept_earlier: bool) -> str:
    used = "earlier successful" if kept_earlier else "later"
    return f"clip {clip_id} appears again; the {used} record is used"


def latest_per_clip(located: Iterable[tuple[str, dict[str, Any]]], problems: list[Problem] | None = None) -> dict[str, dict[str, Any]]:
    """One record per clip from (where, record) pairs in the order written (`keeps_earlier`). Each repeat
    is reported to `problems` when given."""
    chosen: dict[str, dict[str, Any]] = {}
    for where, record in located:
        clip_id = record["clip_id"]
        current = chosen.get(clip_id)
        keep_earlier = current is not None and keeps_earlier(succeeded(current), succeeded(record))
        if current is not None and problems is not None:
            problems.append(Problem(where, "read", repeat_problem(clip_id, keep_earlier)))
        if not keep_earlier:
            chosen[clip_id] = record
    return chosen
