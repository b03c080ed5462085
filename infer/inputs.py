"""Which clips to caption: resolve the `--input` argument to (clip id, video path) pairs.

Accepted inputs, tried in this order:
* a dataset from the builder: a local folder holding `<split>/metadata.parquet` (or a
  dataset card with `configs`), read with `datasets.load_dataset`;
* a folder of clips (searched recursively for video files);
* a manifest file: `.txt` (one path per line), `.jsonl` or `.csv` (a `video` or `path`
  column, optionally `clip_id`); relative paths are relative to the manifest;
* a single video file, or a glob pattern (`clips/**/*.mp4`);
* a Hub dataset id (`owner/name`) with `--split`.

A clip id is the file name up to its first dot, as in the recipe's layout
(`videos/<id>.camera_front_wide_120fov.mp4` beside `metas/<id>.label.json`).
"""

from __future__ import annotations

import csv
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path

from avlabel.core.layouts import METADATA_NAME, VIDEO_EXTENSIONS, clip_id_of

# PyAV reads these as well; the builder keeps to what datasets' videofolder loads
VIDEO_SUFFIXES = {*VIDEO_EXTENSIONS, ".webm", ".m4v", ".ts"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ClipRef:
    clip_id: str
    path: str


def _unique(clips: list[ClipRef], source: str) -> list[ClipRef]:
    seen: dict[str, str] = {}
    clashes = []
    for clip in clips:
        if clip.clip_id in seen:
            clashes.append(f"{clip.clip_id!r} ({seen[clip.clip_id]} and {clip.path})")
        seen[clip.clip_id] = clip.path
    if clashes:
        raise ValueError(f"{source}: clip ids must be unique, but these repeat: {'; '.join(clashes[:5])}")
    if not clips:
        raise ValueError(f"{source}: no clips found")
    return clips


def _is_dataset_folder(folder: Path, split: str) -> bool:
    if (folder / split / METADATA_NAME).exists():
        return True
    card = folder / "README.md"
    return card.exists() and re.search(r"^configs:", card.read_text(encoding="utf-8"), re.MULTILINE) is not None


def _from_dataset(name: str, split: str, cache_dir: Path) -> list[ClipRef]:
    """Clips of a `datasets` split; clips stored as bytes (parquet on the Hub) are written out once."""
    import datasets

    from avlabel.core.loading import load_clip_dataset

    try:
        ds = load_clip_dataset(name, split)
    except ValueError as err:
        raise ValueError(f"{name}: can't load split {split!r} ({err})") from None
    if "video" not in ds.column_names:
        raise ValueError(f"{name}: split {split!r} has no 'video' column (columns: {', '.join(ds.column_names)})")
    ds = ds.cast_column("video", datasets.Video(decode=False))
    clips = []
    for index, row in enumerate(ds):
        video = row["video"]
        clip_id = row.get("clip_id") or clip_id_of(video["path"] or f"clip-{index:06d}")
        path = video.get("path")
        if video.get("bytes"):
            path = cache_dir / f"{clip_id}{Path(path or '.mp4').suffix or '.mp4'}"
            if not path.exists() or path.stat().st_size != len(video["bytes"]):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(video["bytes"])
        clips.append(ClipRef(clip_id, str(path)))
    return clips


def _from_manifest(path: Path) -> list[ClipRef]:
    base = path.parent
    entries: list[tuple[str, str | None]] = []
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        entries = [(line, None) for line in lines if line and not line.startswith("#")]
    else:
        if path.suffix == ".jsonl":
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
                if not isinstance(row, dict):  # a ValueError, as the manifest's other faults are
                    raise ValueError(f"{path}:{number}: not a JSON object with 'video' or 'path'")  # noqa: TRY004
                rows.append(row)
        elif path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        else:
            raise ValueError(f"{path}: a manifest must be .txt, .jsonl or .csv")
        for number, row in enumerate(rows, 1):
            video = row.get("video") or row.get("path")
            if not video:
                raise ValueError(f"{path}: entry {number} has no 'video' or 'path'")
            entries.append((video, row.get("clip_id")))
    return [ClipRef(clip_id or clip_id_of(video), str(base / video)) for video, clip_id in entries]


def resolve_inputs(source: str, split: str = "test", cache_dir: str | Path = ".clips") -> list[ClipRef]:
    """The clips named by `source` (see the module docstring), with unique ids."""
    path = Path(source)
    if path.is_dir():
        if _is_dataset_folder(path, split):
            return _unique(_from_dataset(str(path), split, Path(cache_dir)), source)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        return _unique([ClipRef(clip_id_of(p), str(p)) for p in files], source)
    if path.is_file():
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return [ClipRef(clip_id_of(path), str(path))]
        return _unique(_from_manifest(path), source)
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True))
        return _unique([ClipRef(clip_id_of(p), str(p)) for p in files if p.is_file()], source)
    if _HUB_ID.match(source):
        return _unique(_from_dataset(source, split, Path(cache_dir)), source)
    raise ValueError(f"{source}: not a folder, file, glob pattern or Hub dataset id")
