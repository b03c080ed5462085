"""`avlabel build`: turn dashcam clips and their labels into a Hugging Face dataset folder.

Input, one of three layouts (`--layout auto` tells them apart):
  recipe    `videos/<id>.camera_front_wide_120fov.mp4` + `metas/<id>.label.json`, as the Cosmos recipe ships them
  flat      `<id>.mp4` + `<id>.json` side by side in one folder
  manifest  a CSV or JSONL file with a `video` column (a path) and a `label` column (a path to a label
            file, or the label itself as JSON), optionally `clip_id`; relative paths start at the manifest

Output, the `videofolder` layout that `datasets.load_dataset(folder)` reads without any code, normal or
streaming, and that `huggingface_hub.upload_folder` can push unchanged (nothing in it names a local path):
  README.md                  dataset card written by `card.py`: YAML configs, features and splits, statistics
  statistics.png             the card's histograms
  train/metadata.parquet     one row per clip: file_name, clip_id, the label columns, the probe columns
  train/<clip_id>.mp4        the clip: a hardlink or copy of the original, or (`--presample`) re-encoded at
                             the model's frame rate and resolution so training never decodes the original
  test/...                   the held-out split, chosen by a hash of the clip id
  quarantine.jsonl           everything set aside, one {"path", "stage", "reason"} per problem
  .build_cache.jsonl         probe results keyed by file, size and mtime: a re-run only probes new clips

Bad input loses nothing: every clip is probed and every label validated, and whatever fails (unreadable
video, invalid label, a clip without a label or a label without a clip) is written to the quarantine report
and printed; the build goes on with the rest. `--strict` turns any problem into a non-zero exit.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from avlabel.core.layouts import CAMERA_SUFFIX, LABEL_SUFFIX, METADATA_NAME, VIDEO_EXTENSIONS, clip_id_of
from avlabel.core.sampling import SamplingConfig, VideoError, probe, sample_frames
from avlabel.core.schema import check_label, label_to_row

NAME = "build"
SPLITS = ("train", "test")
QUARANTINE_NAME = "quarantine.jsonl"
CACHE_NAME = ".build_cache.jsonl"
CACHE_VERSION = 1  # raise when what a probe records changes: older entries then stop matching
CHECKPOINT_EVERY = 200  # clips probed or presampled between saves of the cache
PROBE_COLUMNS = ("duration", "fps", "width", "height", "codec")


@dataclass
class BuildArguments:
    input: str = field(
        metadata={"help": "The clips and labels: a folder (recipe or flat layout) or a CSV/JSONL manifest."}
    )
    output_dir: str = field(metadata={"help": "Folder to write the dataset to. Re-running updates it in place."})
    layout: Literal["auto", "recipe", "flat", "manifest"] = field(
        default="auto",
        metadata={"help": "Input layout; `auto` picks recipe (videos/ + metas/), manifest (.csv/.jsonl) or flat."},
    )
    test_size: float = field(
        default=0.1,
        metadata={"help": "Held-out clips: a fraction below 1, or a count from 1 up (the recipe holds out 1000)."},
    )
    license: str = field(default="unknown", metadata={"help": "License identifier written into the dataset card."})
    pretty_name: str | None = field(default=None, metadata={"help": "Dataset name for the card's title."})
    copy: bool = field(
        default=False,
        metadata={"help": "Copy the clips instead of hardlinking them (hardlinks fall back to copies anyway)."},
    )
    presample: bool = field(
        default=False,
        metadata={"help": "Store each clip re-encoded (H.264) at the sampling fps and resolution below."},
    )
    sample_fps: float = field(default=SamplingConfig.fps, metadata={"help": "Presampling: frames per second."})
    min_pixels: int = field(default=SamplingConfig.min_pixels, metadata={"help": "Presampling: fewest pixels a frame."})
    max_pixels: int = field(default=SamplingConfig.max_pixels, metadata={"help": "Presampling: most pixels a frame."})
    factor: int = field(
        default=SamplingConfig.factor,
        metadata={"help": "Presampling: frame sides are multiples of this (28 for Qwen2.5-VL, 32 for Qwen3-VL)."},
    )
    crf: int = field(default=18, metadata={"help": "Presampling: H.264 quality (lower is better and larger)."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for probing (default: all cores)."})
    strict: bool = field(default=False, metadata={"help": "Exit with an error when anything was set aside."})

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            fps=self.sample_fps, min_pixels=self.min_pixels, max_pixels=self.max_pixels, factor=self.factor
        )


@dataclass(frozen=True)
class Problem:
    """One entry of the quarantine report."""

    path: str  # relative to the input folder (or the manifest's folder) when inside it
    stage: str  # scan | label | probe | pack
    reason: str


@dataclass
class Candidate:
    """A clip id with whatever the input holds for it."""

    clip_id: str
    video: Path | None  # None: a label without a clip
    label: Any  # a label file's Path, or the label (object or JSON text) from a manifest; None: no label
    label_where: str  # how reports name the label: its file, or the manifest line


@dataclass
class BuildResult:
    output_dir: Path
    layout: str
    rows: dict[str, list[dict]]  # split -> metadata rows
    problems: list[Problem]
    probed: int  # files probed in this run (the others came from the cache)
    packed: int  # clips written in this run (linked, copied or presampled)

    @property
    def num_rows(self) -> int:
        return sum(len(rows) for rows in self.rows.values())


class BuildError(RuntimeError):
    """A problem with the build as a whole (not one clip): bad arguments, unreadable manifest."""


# ----------------------------------------------------------------------------- dataset features


def column_features():
    """`datasets.Features` of a built dataset: video, clip id, the label columns, the probe columns."""
    from datasets import Features, Value, Video

    from avlabel.core.schema import dataset_features

    return Features(
        {
            "video": Video(),
            "clip_id": Value("string"),
            **dataset_features(),
            "duration": Value("float64"),
            "fps": Value("float64"),
            "width": Value("int32"),
            "height": Value("int32"),
            "codec": Value("string"),
        }
    )


# ----------------------------------------------------------------------------- reading the input


class _Scan:
    """Collects candidates and scan-stage problems; names files relative to the input root."""

    def __init__(self, root: Path, skip: Path | None = None):
        self.root = root
        self.skip = skip
        self.candidates: dict[str, Candidate] = {}
        self.problems: list[Problem] = []

    def where(self, path: Path | str) -> str:
        path = Path(path)
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def problem(self, path, stage: str, reason: str) -> None:
        self.problems.append(Problem(path if isinstance(path, str) else self.where(path), stage, reason))

    def add(self, candidate: Candidate, origin: str) -> None:
        reason = _bad_clip_id(candidate.clip_id)
        if reason:
            self.problem(origin, "scan", reason)
        elif candidate.clip_id in self.candidates:
            first = self.candidates[candidate.clip_id]
            other = self.where(first.video) if first.video else first.label_where
            self.problem(origin, "scan", f"duplicate clip id {candidate.clip_id!r} (also {other})")
        else:
            self.candidates[candidate.clip_id] = candidate

    def files(self, folder: Path):
        """Visible entries of a folder in name order; subfolders are reported, not entered."""
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or (self.skip and path.resolve() == self.skip):
                continue
            if path.is_dir():
                self.problem(path, "scan", "is a folder; only files directly inside the input folder are read")
                continue
            yield path

    def collect(self, found: dict[str, Path], clip_id: str, path: Path) -> None:
        """Note `path` as the file of `clip_id`, unless another file already claimed that id."""
        if clip_id in found:
            self.problem(path, "scan", f"duplicate clip id {clip_id!r} (also {self.where(found[clip_id])})")
        else:
            found[clip_id] = path

    def pair(self, videos: dict[str, Path], labels: dict[str, Path], expect_video: str, expect_label: str) -> None:
        for clip_id in sorted(videos.keys() | labels.keys()):
            video, label = videos.get(clip_id), labels.get(clip_id)
            if label is None:
                self.problem(video, "scan", f"clip without a label (expected {expect_label.format(id=clip_id)})")
            elif video is None:
                self.problem(label, "scan", f"label without a clip (expected {expect_video.format(id=clip_id)})")
            self.add(Candidate(clip_id, video, label, self.where(label) if label else ""), self.where(video or label))


def _bad_clip_id(clip_id: str) -> str | None:
    if not clip_id or clip_id.startswith(".") or any(c in clip_id for c in "/\\\0"):
        return f"clip id {clip_id!r} can't be used as a file name"
    return None


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _scan_recipe(scan: _Scan) -> None:
    videos: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in scan.files(scan.root / "videos"):
        if _is_video(path):
            scan.collect(videos, clip_id_of(path.name), path)
        else:
            scan.problem(path, "scan", f"not a video file (extension {path.suffix or 'none'})")
    for path in scan.files(scan.root / "metas"):
        if path.name.endswith(LABEL_SUFFIX):
            scan.collect(labels, path.name[: -len(LABEL_SUFFIX)], path)
        else:
            scan.problem(path, "scan", "not a label file (expected <id>.label.json)")
    scan.pair(videos, labels, f"videos/{{id}}{CAMERA_SUFFIX}.mp4", f"metas/{{id}}{LABEL_SUFFIX}")


def _scan_flat(scan: _Scan) -> None:
    videos: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in scan.files(scan.root):
        if _is_video(path):
            scan.collect(videos, clip_id_of(path.name), path)
        elif path.suffix.lower() == ".json":
            stem = path.name[: -len(".json")]
            scan.collect(labels, stem.removesuffix(".label"), path)
        else:
            scan.problem(path, "scan", "neither a video nor a .json label")
    scan.pair(videos, labels, "{id}.mp4", "{id}.json")


def _manifest_records(manifest: Path):
    """(line number, record) pairs of a CSV or JSONL manifest; raises BuildError if it can't be read."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BuildError(f"{manifest}: can't read the manifest ({err})") from None
    if manifest.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted cells may span lines
        missing = {"video", "label"} - set(reader.fieldnames or ())
        if missing:
            raise BuildError(f"{manifest}: the manifest lacks the column(s) {', '.join(sorted(missing))}")
        for record in reader:
            yield reader.line_num, record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, err


def _scan_manifest(scan: _Scan, manifest: Path) -> None:
    for number, record in _manifest_records(manifest):
        where = f"{manifest.name}:{number}"
        if isinstance(record, Exception):
            scan.problem(where, "scan", f"line is not valid JSON ({record.msg})")
            continue
        if not isinstance(record, dict):
            scan.problem(where, "scan", "line is not a JSON object")
            continue
        video = str(record["video"]) if record.get("video") not in (None, "") else None
        label = record.get("label") or None
        if isinstance(label, str) and not label.lstrip().startswith("{"):
            label = scan.root / label  # a label file; anything else is the label itself
        video_path = scan.root / video if video else None
        clip_id = str(record.get("clip_id") or (clip_id_of(Path(video).name) if video else ""))
        if not clip_id and isinstance(label, Path):
            clip_id = label.name.removesuffix(".json").removesuffix(".label")
        if not video:
            scan.problem(where, "scan", "label without a clip (empty `video`)")
        elif label is None:
            scan.problem(where, "scan", f"clip without a label (empty `label` for {video})")
        label_where = scan.where(label) if isinstance(label, Path) else where
        scan.add(Candidate(clip_id, video_path, label, label_where), where)


def detect_layout(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() in (".csv", ".jsonl"):
            return "manifest"
        raise BuildError(f"{path}: a manifest must be a .csv or .jsonl file")
    if not path.is_dir():
        raise BuildError(f"{path}: no such file or folder")
    if (path / "videos").is_dir() and (path / "metas").is_dir():
        return "recipe"
    return "flat"


def scan_input(path: str | Path, layout: str = "auto", skip: Path | None = None) -> tuple[str, _Scan]:
    """Find the clips and labels of an input; returns the layout used and the scan."""
    path = Path(path)
    layout = detect_layout(path) if layout == "auto" else layout
    if layout == "manifest":
        if not path.is_file():
            raise BuildError(f"{path}: the manifest layout needs a .csv or .jsonl file")
        scan = _Scan(path.parent, skip)
        _scan_manifest(scan, path)
    else:
        if not path.is_dir():
            raise BuildError(f"{path}: the {layout} layout needs a folder")
        if layout == "recipe" and not ((path / "videos").is_dir() and (path / "metas").is_dir()):
            raise BuildError(f"{path}: the recipe layout needs the folders videos/ and metas/")
        scan = _Scan(path, skip)
        (_scan_recipe if layout == "recipe" else _scan_flat)(scan)
    return layout, scan


def read_label(candidate: Candidate) -> tuple[dict | None, str | None]:
    """The normalised label, or why it can't be used (every problem, per field)."""
    raw = candidate.label
    try:
        if isinstance(raw, Path):
            raw = json.loads(raw.read_text(encoding="utf-8"))
        elif isinstance(raw, str):
            raw = json.loads(raw)
    except OSError as err:
        return None, f"can't be read ({err.strerror})"
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except json.JSONDecodeError as err:
        return None, f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    label, problems = check_label(raw)
    if problems:
        return None, "; ".join(f"{name} {', '.join(msgs)}" for name, msgs in problems.items())
    return label, None


# ----------------------------------------------------------------------------- probing and packing (worker side)


def _probe_file(path: str) -> dict:
    try:
        return {"info": asdict(probe(path))}
    except VideoError as err:
        return {"error": err.reason}
    except Exception as err:  # noqa: BLE001 - one odd file must not stop the build; its reason is kept
        return {"error": f"unexpected {type(err).__name__} while probing: {err}"}


def _presample_file(source: str, target: str, sampling: dict, crf: int) -> dict:
    """Re-encode the frames the model would see as a small H.264 clip, then probe it."""
    import av

    partial = Path(target).with_suffix(".part")
    try:
        clip = sample_frames(source, SamplingConfig(**sampling))
        height, width = clip.frames.shape[1:3]
        # one frame per sampled frame at the sampling rate: re-sampling this clip keeps every frame
        rate = Fraction(clip.sample_fps).limit_denominator(1000)
        with av.open(str(partial), "w", format="mp4") as container:
            # one encoder thread: the pool already uses every core, and x264 is then bit-exact run to run
            stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf), "threads": "1"})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for image in clip.frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
        os.replace(partial, target)
        return {"info": asdict(probe(target))}
    except VideoError as err:
        return {"error": err.reason}
    except Exception as err:  # noqa: BLE001 - see _probe_file
        return {"error": f"presampling failed: {type(err).__name__}: {err}"}
    finally:
        partial.unlink(missing_ok=True)


def _run_parallel(function, jobs: list[tuple], description: str, num_proc: int):
    """Yield `function(*job)` for each job, in order, computed on `num_proc` processes, with a progress bar."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    if not jobs:
        return
    with contextlib.ExitStack() as stack:
        if num_proc > 1 and len(jobs) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(num_proc))
            results = pool.map(function, *zip(*jobs), chunksize=max(1, min(32, len(jobs) // (num_proc * 4))))
        else:
            results = (function(*job) for job in jobs)
        yield from tqdm(results, total=len(jobs), desc=description, unit="clip", disable=None)


# ----------------------------------------------------------------------------- build cache


def file_key(path: Path) -> str:
    """Identity of an input file for the cache: its path (hashed: the cache names no local path), size, mtime."""
    stat = path.stat()
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:20]
    return f"v{CACHE_VERSION}:{digest}:{stat.st_size}:{stat.st_mtime_ns}"


class _Cache:
    """`.build_cache.jsonl`: probe results per input file and what produced each stored clip."""

    def __init__(self, out: Path):
        self.path = out / CACHE_NAME
        self.probes: dict[str, dict] = {}
        self.outputs: dict[str, dict] = {}  # stored file (relative) -> {"source", "recipe", "info"}
        if self.path.exists():
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    record = json.loads(line)
                    if "probe" in record:
                        self.probes[record.pop("probe")] = record
                    else:
                        self.outputs[record.pop("output")] = record
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                    raise BuildError(
                        f"{self.path}:{number}: not a build cache record ({err}); delete the file to rebuild"
                    ) from None

    def save(self, used_probes: set[str] | None = None) -> None:
        """Write the cache, keeping only `used_probes` when given (the final save of a build)."""
        keys = sorted(self.probes if used_probes is None else used_probes)
        lines = [json.dumps({"probe": key, **self.probes[key]}, sort_keys=True) for key in keys]
        lines += [json.dumps({"output": name, **self.outputs[name]}, sort_keys=True) for name in sorted(self.outputs)]
        write_if_changed(self.path, "".join(line + "\n" for line in lines))


def _write_metadata(path: Path, rows: list[dict]) -> None:
    """A split's metadata as Parquet with the declared column types."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Value

    columns = {"file_name": Value("string"), **{k: v for k, v in column_features().items() if k != "video"}}
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=Features(columns).arrow_schema), buffer)
    write_if_changed(path, buffer.getvalue())


def write_if_changed(path: Path, data: bytes | str) -> None:
    """Write only when the content changes (an unchanged file keeps its mtime, which keys the load cache),
    through a temporary file (an interrupted build leaves no half file). Text is written as UTF-8."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, path)


def _link_or_copy(source: Path, target: Path, copy: bool, probed: dict) -> dict:
    """Store the original clip; returns its probe result (or the error that kept it out)."""
    try:
        target.unlink(missing_ok=True)
        if not copy:
            try:
                os.link(source, target)
                return probed
            except OSError:
                pass  # another file system, or links not allowed: copy instead
        shutil.copyfile(source, target)
    except OSError as err:
        return {"error": f"can't be stored in the dataset ({err.strerror})"}
    return probed


# ----------------------------------------------------------------------------- splitting


def _hash_unit(clip_id: str) -> float:
    """A clip id's place in [0, 1): stable across runs, machines and Python versions."""
    return int(hashlib.sha256(clip_id.encode("utf-8")).hexdigest()[:15], 16) / 16**15


def assign_splits(clip_ids: list[str], test_size: float) -> dict[str, str]:
    """clip id -> "train" | "test", by a hash of the id.

    A fraction holds out each clip whose hash falls below it, so a clip keeps its split when others are
    added; a count holds out the clips with the smallest hashes, exactly that many.
    """
    if test_size < 0:
        raise BuildError(f"test_size must be at least 0, got {test_size}")
    if test_size < 1:
        return {c: "test" if _hash_unit(c) < test_size else "train" for c in clip_ids}
    if test_size != int(test_size):
        raise BuildError(f"test_size of 1 or more is a clip count and must be whole, got {test_size}")
    held_out = set(sorted(clip_ids, key=lambda c: (_hash_unit(c), c))[: int(test_size)])
    return {c: "test" if c in held_out else "train" for c in clip_ids}


# ----------------------------------------------------------------------------- the build


def _check_output_dir(out: Path, input_path: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / CACHE_NAME).exists():
        raise BuildError(f"{out}: not empty and not made by `avlabel build`; choose a new folder")
    if out.resolve() == input_path.resolve():
        raise BuildError(f"{out}: the output folder can't be the input folder")


def build(args: BuildArguments) -> BuildResult:
    """Build (or update) the dataset folder; problems with single clips go to the quarantine report."""
    from .card import write_card

    input_path, out = Path(args.input), Path(args.output_dir)
    _check_output_dir(out, input_path)
    layout, scan = scan_input(input_path, args.layout, skip=out.resolve())
    out.mkdir(parents=True, exist_ok=True)
    cache = _Cache(out)
    cache.save()  # marks the folder as the builder's from the start, so a build that stops can resume
    num_proc = args.num_proc or os.cpu_count() or 1
    problems = scan.problems

    labels: dict[str, dict] = {}
    for candidate in scan.candidates.values():
        if candidate.label is not None:
            label, reason = read_label(candidate)
            if reason:
                problems.append(Problem(candidate.label_where, "label", reason))
            else:
                labels[candidate.clip_id] = label

    # every clip is probed, labelled or not, so one report lists all that is wrong with the input
    keys: dict[str, str] = {}
    for candidate in scan.candidates.values():
        if candidate.video is None:
            continue
        try:
            keys[candidate.clip_id] = file_key(candidate.video)
        except OSError as err:
            reason = "file not found" if isinstance(err, FileNotFoundError) else f"can't be read ({err.strerror})"
            problems.append(Problem(scan.where(candidate.video), "probe", reason))
    sources = {keys[c]: str(scan.candidates[c].video) for c in keys}
    todo = sorted(key for key in sources if key not in cache.probes)
    probed = _run_parallel(_probe_file, [(sources[key],) for key in todo], "Probing", num_proc)
    for done, (key, result) in enumerate(zip(todo, probed), 1):
        cache.probes[key] = result
        if done % CHECKPOINT_EVERY == 0:
            cache.save()  # an interrupted build resumes from here
    infos: dict[str, dict] = {}
    for clip_id, key in keys.items():
        result = cache.probes[key]
        if "error" in result:
            problems.append(Problem(scan.where(scan.candidates[clip_id].video), "probe", result["error"]))
        else:
            infos[clip_id] = result["info"]

    good = sorted(clip_id for clip_id in labels if clip_id in infos)
    splits = assign_splits(good, args.test_size)
    stored, packed = _pack(args, out, cache, scan, keys, splits, num_proc, problems)

    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for clip_id in good:
        if clip_id not in stored:
            continue
        name, info = stored[clip_id]
        row = {"file_name": Path(name).name, "clip_id": clip_id, **label_to_row(labels[clip_id])}
        row.update({column: info[column] for column in PROBE_COLUMNS})
        rows[splits[clip_id]].append(row)
    rows = {split: split_rows for split, split_rows in rows.items() if split_rows}

    for split in SPLITS:
        metadata = out / split / METADATA_NAME
        if split in rows:
            _write_metadata(metadata, rows[split])
        else:
            metadata.unlink(missing_ok=True)
    problems = sorted(set(problems), key=lambda p: (p.path, p.stage, p.reason))
    write_if_changed(out / QUARANTINE_NAME, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in problems))
    cache.save(set(keys.values()))
    write_card(
        out,
        rows,
        problems,
        layout=layout,
        test_size=args.test_size,
        license=args.license,
        pretty_name=args.pretty_name,
        presampled=args.sampling().to_dict() | {"crf": args.crf} if args.presample else None,
        source_bytes=sum(scan.candidates[c].video.stat().st_size for c in stored),
    )
    return BuildResult(out, layout, rows, problems, probed=len(todo), packed=packed)


def _pack(args, out, cache, scan, keys, splits, num_proc, problems) -> tuple[dict[str, tuple[str, dict]], int]:
    """Put each good clip at `<split>/<clip_id><ext>`, reusing what an earlier build stored.

    Returns clip id -> (stored file relative to `out`, probe info of the stored file) and how many were written.
    """
    recipe = "original"
    if args.presample:
        recipe = "presample " + json.dumps(args.sampling().to_dict() | {"crf": args.crf}, sort_keys=True)
    kept = {
        name: record for name, record in cache.outputs.items() if record["recipe"] == recipe and (out / name).is_file()
    }
    cache.outputs = kept  # checkpoints below record each clip as it is written
    # a stored clip is found again by its source file and name, whichever split it was in
    by_source = {(record["source"], Path(name).name): name for name, record in kept.items()}
    stored: dict[str, tuple[str, dict]] = {}
    to_write: list[tuple[str, str]] = []
    for clip_id, split in splits.items():
        source = scan.candidates[clip_id].video
        name = f"{split}/{clip_id}{'.mp4' if args.presample else source.suffix.lower()}"
        previous = by_source.get((keys[clip_id], Path(name).name))
        if previous is not None and previous != name:
            (out / split).mkdir(exist_ok=True)
            os.replace(out / previous, out / name)  # the clip changed split: move, don't redo
            kept[name] = kept.pop(previous)
        if name in kept and kept[name]["source"] == keys[clip_id]:
            stored[clip_id] = (name, kept[name]["info"])
        else:
            to_write.append((clip_id, name))

    for split in {splits[clip_id] for clip_id, _ in to_write}:
        (out / split).mkdir(exist_ok=True)
    if args.presample:
        sampling = args.sampling().to_dict()
        jobs = [(str(scan.candidates[c].video), str(out / name), sampling, args.crf) for c, name in to_write]
        results = _run_parallel(_presample_file, jobs, "Presampling", num_proc)
    else:
        results = (
            _link_or_copy(scan.candidates[c].video, out / name, args.copy, cache.probes[keys[c]])
            for c, name in to_write
        )
    for done, ((clip_id, name), result) in enumerate(zip(to_write, results), 1):
        if "error" in result:
            problems.append(Problem(scan.where(scan.candidates[clip_id].video), "pack", result["error"]))
            continue
        kept[name] = {"source": keys[clip_id], "recipe": recipe, "info": result["info"]}
        stored[clip_id] = (name, result["info"])
        if done % CHECKPOINT_EVERY == 0:
            cache.save()

    wanted = {name for name, _ in stored.values()}
    cache.outputs = {name: record for name, record in kept.items() if name in wanted}
    for split in SPLITS:  # the output folder is the builder's: clips no longer in the dataset go
        folder = out / split
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name != METADATA_NAME and f"{split}/{path.name}" not in wanted:
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    return stored, len(to_write)


# ----------------------------------------------------------------------------- command line


def print_summary(result: BuildResult, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, highlight=False)
    counts = ", ".join(f"{len(rows)} {split}" for split, rows in result.rows.items()) or "no clips"
    console.print(
        f"Built {result.output_dir} ({result.layout} layout): {counts}; "
        f"probed {result.probed} file(s), wrote {result.packed} clip(s), the rest reused from the last build."
    )
    if not result.problems:
        console.print("Nothing set aside.")
        return
    table = Table(
        title=f"Set aside: {len(result.problems)} problem(s), listed in {QUARANTINE_NAME}", title_justify="left"
    )
    for column in ("path", "stage", "reason"):
        table.add_column(column, overflow="fold")
    for problem in result.problems:
        table.add_row(problem.path, problem.stage, problem.reason)
    console.print(table)


def make_parser(subparsers=None):
    from trl import TrlParser

    if subparsers is not None:
        return subparsers.add_parser(
            NAME, help="Build a Hugging Face dataset folder from clips and labels.", dataclass_types=[BuildArguments]
        )
    return TrlParser(dataclass_types=[BuildArguments], prog=f"python -m data_builder {NAME}")


def main(args: BuildArguments) -> BuildResult:
    try:
        result = build(args)
    except BuildError as err:
        raise SystemExit(f"error: {err}") from None
    print_summary(result)
    if args.strict and result.problems:
        raise SystemExit(
            f"--strict: {len(result.problems)} problem(s) in the input; see {result.output_dir / QUARANTINE_NAME}"
        )
    return result


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
