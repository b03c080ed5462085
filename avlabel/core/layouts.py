"""Input layouts and clip ids: the one reader of what a user points a command at.

`read_inputs` is what `avlabel build`, `avlabel caption` and the evaluation commands call, so the
three see the same clips, with the same ids, in the same input. Layouts (`auto` tells them apart,
in this order):

  dataset   a folder `avlabel build` wrote (`<split>/metadata.parquet`; any folder `datasets` reads as a
            dataset), or a Hub dataset id
  recipe    a folder with `videos/<id>.camera_front_wide_120fov.mp4` and `metas/<id>.label.json`
  manifest  a .csv, .jsonl or .txt file naming the clips: a `video` (or `path`) column, optionally a
            `label` (a path to a label file, or the label itself as JSON) and a `clip_id`; paths are
            relative to the manifest; a .txt file is one video path a line
  file      one clip (a `<id>.json` or `<id>.label.json` beside it is its label), or a glob pattern
  flat      any other folder: clips and `<id>.json` / `<id>.label.json` labels, in subfolders too

A clip is any file with one of `VIDEO_EXTENSIONS`, whatever its codec: whether it decodes is the
probe's verdict (`sampling.probe`), the same for every command. Hidden files and folders (a name
starting with ".") are not read. A clip id is the file name without its extension and the recipe's
camera suffix; it has to be unique in an input.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import shlex
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .problems import InputError, Problem
from .schema import json_error_reason, json_limit_reason

CAMERA_SUFFIX = ".camera_front_wide_120fov"  # the recipe names each clip after the camera that filmed it
LABEL_SUFFIX = ".label.json"
# Containers the bundled FFmpeg demuxes, by the extensions they are written with; a test decodes one of each.
VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".3gp", ".mkv", ".webm", ".avi", ".mpeg", ".mpg", ".ts", ".m2ts", ".mts",
    ".flv", ".wmv", ".asf", ".mxf",
)  # fmt: skip
# What datasets' videofolder recognises as video (datasets/packaged_modules/videofolder; a test checks it).
# A built dataset stores its clips under these only: with any other file in a split, `load_dataset`
# infers another builder (a .webm counts as audio) and the video column comes back empty.
STORED_EXTENSIONS = (".mkv", ".mp4", ".avi", ".mpeg", ".mov")
# Bare H.264/HEVC streams, as some fleet recorders (mobile DVRs) write them: no container, so no timestamps to
# sample by. Not clips, but one command away from being one.
RAW_STREAM_EXTENSIONS = {".h264": "H.264", ".264": "H.264", ".h265": "HEVC", ".265": "HEVC", ".hevc": "HEVC"}
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".txt")
# Parquet, not JSON lines: datasets infers a JSON metadata file's types from its first rows, so
# a split whose manoeuvre lists happen to be all empty would get another type than the other
# split and fail to load ("Metadata files ... have different features"). Parquet states them.
METADATA_NAME = "metadata.parquet"
EXTRA_COLUMN = "extra"  # a built dataset's column of label keys beyond the schema, as a JSON object
InputLayout = Literal["auto", "dataset", "recipe", "manifest", "file", "flat"]  # the type of a --layout flag
LAYOUTS: tuple[InputLayout, ...] = get_args(InputLayout)
SEARCHED = (
    f"a built dataset (<split>/{METADATA_NAME}), the recipe layout (videos/ + metas/), a manifest "
    f"({', '.join(MANIFEST_EXTENSIONS)}), a clip or glob, and a flat folder of clips "
    f"({', '.join(VIDEO_EXTENSIONS)}) with <id>.json or <id>{LABEL_SUFFIX} labels"
)
# Where a layout expects a clip's missing partner, for the builder's report.
EXPECTED_LABEL = {"recipe": f"metas/{{id}}{LABEL_SUFFIX}", "flat": f"{{id}}.json or {{id}}{LABEL_SUFFIX}",
                  "file": f"{{id}}{LABEL_SUFFIX} or {{id}}.json beside the clip",
                  "manifest": "a `label` in its manifest line", "dataset": "the label columns"}  # fmt: skip
EXPECTED_VIDEO = {"recipe": f"videos/{{id}}{CAMERA_SUFFIX}.mp4", "flat": "{id}.mp4 (or another clip extension)",
                  "file": "{id}.mp4", "manifest": "a `video` in its manifest line", "dataset": "a `video` column"}


def clip_id_of(name: str | Path) -> str:
    """A clip id from its video's file name: without the extension and the recipe's camera suffix. Ids are in
    Unicode's composed form (NFC): macOS writes names decomposed (NFD), most tools composed, and a clip and its
    label written by the two must still pair."""
    stem = Path(name).name.rsplit(".", 1)[0]
    return unicodedata.normalize("NFC", stem.removesuffix(CAMERA_SUFFIX))


def label_id_of(name: str | Path) -> str:
    """A clip id from its label's file name: `<id>.label.json` or `<id>.json`, the suffix in any case (as
    `is_label` reads it), in the composed form `clip_id_of` gives."""
    name = Path(name).name
    for suffix in (".json", ".label"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return unicodedata.normalize("NFC", name)


def clip_id_problem(clip_id: Any) -> str | None:
    """Why `clip_id` can't name the clip's files (a path, a hidden name, a name outside the folder), or None."""
    if not clip_id or not isinstance(clip_id, str) or clip_id.startswith(".") or any(c in clip_id for c in "/\\\0"):
        return f"clip id {clip_id!r} can't be used as a file name"
    return None


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def is_label(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(".json")


def raw_stream_reason(path: Path) -> str | None:
    """Why a bare video stream is no clip, and the command that makes it one; None for any other file."""
    codec = RAW_STREAM_EXTENSIONS.get(path.suffix.lower())
    if codec is None:
        return None
    return (f"a bare {codec} stream with no container (no timestamps to sample by): wrap it, e.g. "
            f"`ffmpeg -framerate <fps> -i {shlex.quote(path.name)} -c copy {shlex.quote(clip_id_of(path) + '.mp4')}`")


@dataclass
class InputClip:
    """One clip id and what the input holds for it."""

    clip_id: str
    video: Path | None = None  # None: a label without a clip
    # the label: a file, JSON text or a parsed object (from a manifest or a dataset row); None: no label
    label: Path | str | dict | None = None
    video_name: str = ""  # how reports name the video: its path relative to the input
    label_name: str = ""  # how reports name the label: its file, a manifest line, a dataset row


@dataclass
class Inputs:
    """What `read_inputs` found: the clips by id, what was set aside while reading, and every input read."""

    source: str
    layout: str
    root: Path  # names are relative to this folder
    clips: dict[str, InputClip] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # every input read: each file, each label given inline

    @property
    def with_video(self) -> list[InputClip]:
        return [clip for clip in self.clips.values() if clip.video is not None]

    @property
    def with_label(self) -> list[InputClip]:
        return [clip for clip in self.clips.values() if clip.label is not None]


class _Reader:
    def __init__(self, inputs: Inputs, skip: Path | None):
        self.inputs = inputs
        self.skip = skip.resolve() if skip else None

    def name(self, path: Path) -> str:
        # where the file sits in the input, not where a symbolic link to it points (resolve() would)
        for absolute in (os.path.abspath, os.path.realpath):
            try:
                return Path(absolute(path)).relative_to(absolute(self.inputs.root)).as_posix()
            except ValueError:
                continue
        return str(path)

    def set_aside(self, name: str, reason: str) -> None:
        self.inputs.problems.append(Problem(name, "scan", reason))

    def walk(self, folder: Path):
        """Visible files under `folder`, subfolders included, in name order (the output folder left out).

        Links to folders are followed (fleets link in a day's or a disk's clips), each folder once: a
        second link to one already read, or a loop, is set aside."""
        read = set()
        for current, folders, files in os.walk(folder, followlinks=True):
            here = Path(current)
            read.add(os.path.realpath(here))
            folders[:] = sorted(f for f in folders if not f.startswith(".") and not self._skipped(here / f))
            # real folders before links, so a link to a folder that is also in the input is what's set aside
            for name in sorted(folders, key=lambda f: os.path.islink(here / f)):
                real = os.path.realpath(here / name)
                if real in read:
                    folders.remove(name)
                    self.other(here / name, f"a link to {real}, a folder already read")
                read.add(real)
            for name in sorted(files):
                if not name.startswith("."):
                    yield here / name

    def _skipped(self, path: Path) -> bool:
        return self.skip is not None and path.resolve() == self.skip

    def _claim(self, clip_id: str, name: str, kind: str) -> InputClip | None:
        """The entry `name` (a video or label) goes into, or None when it is set aside for its id."""
        self.inputs.names.append(name)
        if (problem := clip_id_problem(clip_id)) is not None:
            self.set_aside(name, problem)
            return None
        clip = self.inputs.clips.setdefault(clip_id, InputClip(clip_id))
        other = clip.video_name if kind == "video" else clip.label_name
        if other:
            self.set_aside(name, f"duplicate clip id {clip_id!r} (also {other})")
            return None
        return clip

    def video(self, clip_id: str, path: Path, name: str | None = None) -> None:
        clip = self._claim(clip_id, name or self.name(path), "video")
        if clip is not None:
            clip.video, clip.video_name = path, name or self.name(path)

    def label(self, clip_id: str, label: Path | str | dict, name: str) -> None:
        clip = self._claim(clip_id, name, "label")
        if clip is not None:
            clip.label, clip.label_name = label, name

    def other(self, path: Path, reason: str) -> None:
        self.inputs.names.append(self.name(path))
        self.set_aside(self.name(path), reason)

    def loose_file(self, path: Path) -> None:
        """A file of a flat folder or a glob: a clip, a label, or neither."""
        if is_video(path):
            self.video(clip_id_of(path), path)
        elif is_label(path):
            self.label(label_id_of(path), path, self.name(path))
        else:
            self.other(path, raw_stream_reason(path)
                       or f"neither a clip ({', '.join(VIDEO_EXTENSIONS)}) nor a .json label")


def _read_recipe(reader: _Reader, root: Path) -> None:
    for path in reader.walk(root / "videos"):
        if is_video(path):
            reader.video(clip_id_of(path), path)
        else:
            reader.other(path, raw_stream_reason(path)
                         or f"not a clip (extension {path.suffix or 'none'}; clips are {', '.join(VIDEO_EXTENSIONS)})")
    for path in reader.walk(root / "metas"):
        if path.name.endswith(LABEL_SUFFIX):
            reader.label(label_id_of(path), path, reader.name(path))
        else:
            reader.other(path, f"not a label file (expected <id>{LABEL_SUFFIX})")


def _manifest_records(manifest: Path):
    """(where, record or the reason it can't be used) for each entry of a .csv, .jsonl or .txt manifest."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{manifest}: can't read the manifest ({err})") from None
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted cells may span lines
        if not {"video", "path"} & set(reader.fieldnames or ()):
            raise InputError(f"{manifest}: the manifest needs a `video` (or `path`) column; it has "
                             f"{', '.join(reader.fieldnames or ()) or 'none'}")
        for record in reader:
            yield f"{manifest.name}:{reader.line_num}", record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{manifest.name}:{number}"
        if not line.strip() or (suffix == ".txt" and line.lstrip().startswith("#")):
            continue
        if suffix == ".txt":
            yield where, {"video": line.strip()}
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield where, f"line is not valid JSON ({json_error_reason(err, one_line=True)})"
            continue
        except (ValueError, RecursionError) as err:  # JSON past Python's limits: a huge integer, deep nesting
            yield where, f"line is not valid JSON ({json_limit_reason(err)})"
            continue
        yield where, record if isinstance(record, dict) else "line is not a JSON object"


URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _manifest_path(base: Path, text: str) -> Path:
    """A path a manifest line gives, relative to the manifest; a Windows tool's backslashes separate folders."""
    path = base / text
    if "\\" in text and not path.exists():
        path = base / text.replace("\\", "/")
    return path


def _read_manifest(reader: _Reader, manifest: Path) -> None:
    base = manifest.parent
    for where, record in _manifest_records(manifest):
        if isinstance(record, str):  # the line's problem
            reader.inputs.names.append(where)
            reader.set_aside(where, record)
            continue
        video = record.get("video") or record.get("path") or None
        label = record.get("label")
        label = None if label in (None, "") else label
        remote = next((str(text) for text in (video, label) if URL.match(str(text or ""))), None)
        if remote or (video is None and label is None):
            reader.inputs.names.append(where)
            reader.set_aside(where, "names neither a video nor a label" if not remote else
                             f"names a URL ({remote}): give local paths, with the clips downloaded or the bucket mounted")
            continue
        if isinstance(label, str) and not label.lstrip().startswith("{"):
            label = _manifest_path(base, label)  # a label file; anything else is the label itself
        video_path = _manifest_path(base, str(video)) if video is not None else None
        clip_id = str(record.get("clip_id") or "") or (
            clip_id_of(video_path) if video_path else label_id_of(label) if isinstance(label, Path) else "")
        if video_path is not None:
            reader.video(clip_id, video_path)
        if label is not None:
            reader.label(clip_id, label, reader.name(label) if isinstance(label, Path) else where)


def _read_dataset(reader: _Reader, source: str, split: str | None, with_videos: bool, cache_dir: Path | None) -> None:
    """The rows of a built dataset (or any dataset with a `video` column) as clips, labels from the label columns."""
    import datasets

    from . import schema
    from .loading import load_clip_dataset

    try:
        loaded = {split: load_clip_dataset(source, split)} if split else load_clip_dataset(source)
    except ValueError as err:
        if split and "Unknown split" in str(err):
            raise InputError(f"{source}: no split {split!r} ({err}); choose one with --split") from None
        raise InputError(f"{source}: can't load the dataset ({err})") from None
    except OSError as err:  # FileNotFoundError, or ConnectionError for a Hub id that can't be reached
        where = "" if Path(source).exists() else "no such file or folder, and on the Hub: "
        raise InputError(f"{source}: {where}can't load the dataset ({err})") from None
    for name, rows in loaded.items():
        has_label = all(column in rows.column_names for column in schema.FIELD_NAMES)
        columns = ("clip_id", "video", *schema.FIELD_NAMES, EXTRA_COLUMN) if with_videos else (
            "clip_id", *schema.FIELD_NAMES, EXTRA_COLUMN)
        wanted = [column for column in columns if column in rows.column_names]
        if with_videos and "video" not in rows.column_names:
            raise InputError(f"{source}: split {name!r} has no `video` column (columns: {', '.join(rows.column_names)})")
        rows = rows.select_columns(wanted)
        if with_videos:
            rows = rows.cast_column("video", datasets.Video(decode=False))  # a path; decoding every clip is slow
        for index, row in enumerate(rows):
            video = row.get("video") or {}
            clip_id = row.get("clip_id") or (clip_id_of(video["path"]) if video.get("path") else f"{name}-{index:06d}")
            where = f"{name}/{Path(video['path']).name}" if video.get("path") else f"{source}[{name}][{index}]"
            if with_videos:
                path = Path(video["path"]) if video.get("path") else None
                if video.get("bytes"):  # a Hub dataset's parquet holds the clip itself: written out once
                    path = _write_out(video, clip_id, cache_dir or _default_cache(source))
                if path is not None:
                    reader.video(clip_id, path, where)
            if has_label:
                label = schema.row_to_label(row)
                if row.get(EXTRA_COLUMN):
                    label.update(json.loads(row[EXTRA_COLUMN]))
                reader.label(clip_id, label, where)


def _default_cache(source: str) -> Path:
    from .loading import cache_root

    return cache_root() / "clips" / re.sub(r"[^\w.-]+", "_", source)


def _write_out(video: dict, clip_id: str, folder: Path) -> Path:
    path = folder / f"{clip_id}{Path(video.get('path') or '.mp4').suffix or '.mp4'}"
    if not path.exists() or path.stat().st_size != len(video["bytes"]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(video["bytes"])
    return path


_SPLIT_FILE = re.compile(r"^(train|test|validation|valid|dev|eval)([-_.].*)?\.(parquet|jsonl|csv|arrow)$")


def is_dataset_folder(folder: Path) -> bool:
    """A folder `datasets.load_dataset` reads as a dataset: `avlabel build`'s (`<split>/metadata.parquet`),
    one with a dataset card naming its configs, or one of split-named data files (`test.jsonl`) with no clips
    or labels beside them (a fleet's folder of clips may hold its own `test_routes.csv`)."""
    if any(folder.glob(f"*/{METADATA_NAME}")):
        return True
    names = [p.name for p in folder.iterdir()]
    clips_beside = any(is_video(n) or n.endswith(LABEL_SUFFIX) for n in names) or {"videos", "metas"} <= set(names)
    if any(_SPLIT_FILE.match(name) for name in names) and not clips_beside:
        return True
    card = folder / "README.md"  # a card is UTF-8; any other README is a user's notes
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    return re.search(r"^configs:", text, re.MULTILINE) is not None


def detect_layout(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        if is_dataset_folder(path):
            return "dataset"
        return "recipe" if (path / "videos").is_dir() and (path / "metas").is_dir() else "flat"
    if path.is_file():
        if path.suffix.lower() in MANIFEST_EXTENSIONS:
            return "manifest"
        if is_video(path):
            return "file"
        raise InputError(f"{source}: " + (raw_stream_reason(path) or f"not a clip ({', '.join(VIDEO_EXTENSIONS)}), "
                                                   f"a manifest ({', '.join(MANIFEST_EXTENSIONS)}) or a folder"))
    if glob.has_magic(source):
        return "file"
    if is_hub_id(source):
        return "dataset"
    raise InputError(f"{source}: no such file or folder (nor a glob pattern or a Hub dataset id)")


def is_hub_id(value: str, namespaced: bool = True) -> bool:
    """`value` names a Hub repo rather than a local path: a valid repo id (owner/name; a bare name too unless
    `namespaced`) that is no existing path and whose owner is no local folder (a mistyped `runs/x` stays a path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(value).expanduser().exists() or (namespaced and "/" not in value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return "/" not in value or not Path(value.split("/")[0]).is_dir()


def read_inputs(source: str | Path, layout: str = "auto", *, split: str | None = None, skip: Path | None = None,
                with_videos: bool = True, cache_dir: Path | None = None) -> Inputs:
    """Every clip and label of `source` (see the module docstring), and what was set aside while reading.

    `split`: which split of a dataset (None: all of them). `skip`: a folder not to read (the output
    folder, when it is inside the input). `with_videos=False` reads a dataset's labels without
    touching its videos. `cache_dir`: where clips a Hub dataset stores as bytes are written out.
    Raises InputError, one line naming the input, when it can't be read or holds no clip or label.
    """
    source = str(source)
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    found = detect_layout(source)
    if layout == "auto":
        layout = found
    elif layout != found and not (layout == "flat" and found in ("recipe", "dataset")):
        needs = {"dataset": f"a folder with <split>/{METADATA_NAME} or a Hub id", "recipe": "a folder with videos/ and metas/",
                 "manifest": f"a {', '.join(MANIFEST_EXTENSIONS)} file", "file": "a clip or a glob pattern",
                 "flat": "a folder"}  # fmt: skip
        raise InputError(f"{source}: the {layout} layout needs {needs[layout]}")
    path = Path(source)
    root = path.parent if layout in ("manifest", "file") and path.is_file() else path if path.is_dir() else Path(".")
    inputs = Inputs(source, layout, root)
    reader = _Reader(inputs, skip)
    if layout == "dataset":
        _read_dataset(reader, source, split, with_videos, cache_dir)
    elif layout == "recipe":
        _read_recipe(reader, path)
    elif layout == "manifest":
        _read_manifest(reader, path)
    elif layout == "file":
        files = [path] if path.is_file() else sorted(Path(p) for p in glob.glob(source, recursive=True))
        for file in (f for f in files if f.is_file() or f.is_symlink()):  # a dangling link is the probe's to report
            reader.loose_file(file)
        if path.is_file():
            for name in (f"{clip_id_of(path)}{LABEL_SUFFIX}", f"{clip_id_of(path)}.json"):
                if (path.parent / name).is_file():
                    reader.loose_file(path.parent / name)
                    break
    else:
        for file in reader.walk(path):
            reader.loose_file(file)
    if not inputs.clips:
        others = f"; {len(inputs.names)} other file(s) set aside" if inputs.names else ""
        raise InputError(f"{source}: no clips or labels found{others} (searched for {SEARCHED})")
    return inputs
