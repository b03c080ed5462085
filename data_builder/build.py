"""`avlabel build`: turn dashcam clips and their labels into a Hugging Face dataset folder.

Input: any layout `avlabel.core.layouts.read_inputs` reads (`--layout auto` tells them apart): the recipe's
`videos/` + `metas/`, a flat folder of `<id>.mp4` + `<id>.json`, a CSV/JSONL manifest of videos and labels,
a single clip, or a dataset this command built. A clip is any container and codec the bundled FFmpeg decodes.

Output, the `videofolder` layout that `datasets.load_dataset(folder)` reads without any code, normal or
streaming, and that `huggingface_hub.upload_folder` can push unchanged (nothing in it names a local path):
  README.md                  dataset card written by `card.py`: YAML configs, features and splits, statistics
  statistics.png             the card's histograms
  train/metadata.parquet     one row per clip: file_name, clip_id, the label columns, `extra`, the probe columns
  train/<clip_id>.mp4        the clip: a hardlink or copy of the original; remuxed into .mkv (the video copied,
                             its frames untouched) when its container is one videofolder does not list (.webm,
                             .ts, ...); or (`--presample`) re-encoded at the model's frame rate and resolution
  test/...                   the held-out split, chosen by a hash of the clip id
  quarantine.jsonl           every input file set aside, one {"path", "stage", "reason"[, "partner"]} each
  .build_cache.jsonl         probe results keyed by file, size and mtime: a re-run only probes new clips

Bad input loses nothing: every clip is probed and every label validated, and every input file ends up
either in a row or in the quarantine report with its reason (or its partner's: the video of a bad label,
the label of a bad video); the build goes on with the rest. Keys beyond the schema in a label are kept in
the `extra` column. `--strict` refuses such labels and turns anything set aside into a non-zero exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from avlabel.core.errors import UsageError
from avlabel.core.files import link_or_copy
from avlabel.core.layouts import (
    EXPECTED_LABEL, EXPECTED_VIDEO, EXTRA_COLUMN, METADATA_NAME, STORED_EXTENSIONS, InputClip, InputLayout,
    read_inputs,
)
from avlabel.core.problems import InputError, Problem
from avlabel.core.sampling import (
    SamplingArguments, SamplingConfig, VideoError, aspect_problem, missing_file_reason, pixel_budget, probe,
    sample_frames, sampling_flag, video_stream,
)
from avlabel.core.schema import label_to_row, read_label
from avlabel.families import DEFAULT_FAMILY, FAMILIES

NAME = "build"
SPLITS = ("train", "test")
QUARANTINE_NAME = "quarantine.jsonl"
CACHE_NAME = ".build_cache.jsonl"
DEFAULT_TEST_SIZE = 0.1
CACHE_VERSION = 4  # raise when what a probe records changes: older entries then stop matching
CHECKPOINT_EVERY = 200  # clips probed or presampled between saves of the cache
PROBE_COLUMNS = ("duration", "fps", "width", "height", "codec")
REMUX_SUFFIX = ".mkv"  # Matroska holds any codec, so a stream copy into it always works


@dataclass(kw_only=True)
class BuildArguments(SamplingArguments):
    """The builder's flags; --fps, --max_frames, --min_pixels and --max_pixels (SamplingArguments) apply to --presample."""

    # the sampling flags again, for their help: build reads no model, so unset is the recipe's sampling (SamplingConfig)
    fps: float | None = sampling_flag("fps", f"--presample; unset: {SamplingConfig.fps:g}")
    max_frames: int | None = sampling_flag("max_frames", f"--presample; unset: {SamplingConfig.max_frames}")
    min_pixels: int | None = sampling_flag(
        "min_pixels", f"--presample; unset: {pixel_budget(DEFAULT_FAMILY, 'min_pixels')}, {DEFAULT_FAMILY.title}'s"
    )
    max_pixels: int | None = sampling_flag(
        "max_pixels", f"--presample; unset: {pixel_budget(DEFAULT_FAMILY, 'max_pixels')}, {DEFAULT_FAMILY.title}'s"
    )
    input: str = field(
        metadata={"help": "The clips and labels: a folder (recipe or flat layout), a CSV/JSONL manifest, a clip, or a "
                  "dataset built before."}
    )
    output_dir: str = field(metadata={"help": "Folder to write the dataset to. Re-running updates it in place."})
    layout: InputLayout = field(
        default="auto",
        metadata={"help": "Input layout; `auto` picks dataset, recipe (videos/ + metas/), manifest, file or flat."},
    )
    test_size: float | None = field(
        default=None,
        metadata={"help": "Held-out clips: a fraction below 1, or a count from 1 up (the recipe holds out 1000). "
                  f"Default: the earlier build's in --output_dir, else {DEFAULT_TEST_SIZE}."},
    )
    license: str = field(default="unknown", metadata={"help": "License identifier written into the dataset card."})
    pretty_name: str | None = field(default=None, metadata={"help": "Dataset name for the card's title."})
    copy: bool = field(
        default=False,
        metadata={"help": "Copy the clips instead of hardlinking them (hardlinks fall back to copies anyway)."},
    )
    presample: bool = field(
        default=False,
        metadata={"help": "Store each clip re-encoded (H.264) at the sampling fps and resolution (--fps, --max_pixels...)."},
    )
    factor: int = field(
        default=SamplingConfig.factor,
        metadata={"help": "Presampling: frame sides are multiples of this ("
                  + ", ".join(f"{family.patch_factor()} for {family.title}" for family in FAMILIES.values()) + ")."},
    )
    crf: int = field(default=18, metadata={"help": "Presampling: H.264 quality (lower is better and larger)."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for probing (default: all cores)."})
    strict: bool = field(
        default=False,
        metadata={"help": "Refuse labels with keys beyond the schema, and exit with an error when anything was set aside."},
    )

    def __post_init__(self):
        from avlabel.core.parser import check_input

        super().__post_init__()
        check_input(self.input)  # an --input that is not there is a command-line mistake (exit 2), as in caption

    def sampling(self) -> SamplingConfig:
        return self.resolve_sampling(factor=self.factor)


@dataclass
class BuildResult:
    output_dir: Path
    layout: str
    rows: dict[str, list[dict]]  # split -> metadata rows
    problems: list[Problem]  # one or more per input file set aside
    inputs: list[str]  # every input file (or inline label) read, as the report names it
    probed: int  # files probed in this run (the others came from the cache)
    packed: int  # clips written in this run (linked, copied, remuxed or presampled)
    remuxed: int = 0  # clips stored in Matroska because videofolder does not list their container
    with_extra: int = 0  # rows whose label had keys beyond the schema (kept in the `extra` column)
    more_streams: int = 0  # rows whose clip holds more than one video stream (a second camera, a cover picture)
    kept_splits: int = 0  # clips kept in the split an earlier build gave them where --test_size alone would move them
    left_out: int = 0  # clips of the dataset built before in output_dir that this input no longer holds
    test_size: float = DEFAULT_TEST_SIZE  # the one this build used (given, or the earlier build's)

    @property
    def num_rows(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    @property
    def set_aside(self) -> list[str]:
        return sorted({problem.path for problem in self.problems})


class BuildError(ValueError):
    """A problem with the build as a whole (not one clip): an input that can't be read, an output folder that
    isn't the builder's (exit 1; a wrong argument is a UsageError, exit 2)."""


# ----------------------------------------------------------------------------- dataset features


def column_features():
    """`datasets.Features` of a built dataset: video, clip id, the label columns, `extra`, the probe columns."""
    from datasets import Features, Value, Video

    from avlabel.core.schema import dataset_features

    return Features(
        {
            "video": Video(),
            "clip_id": Value("string"),
            **dataset_features(),
            EXTRA_COLUMN: Value("string"),
            "duration": Value("float64"),
            "fps": Value("float64"),
            "width": Value("int32"),
            "height": Value("int32"),
            "codec": Value("string"),
        }
    )


def stored_suffix(source: Path, presample: bool) -> str:
    """The extension a clip is stored under: one videofolder recognises (see layouts.STORED_EXTENSIONS)."""
    if presample:
        return ".mp4"
    suffix = source.suffix.lower()
    return suffix if suffix in STORED_EXTENSIONS else REMUX_SUFFIX


# ----------------------------------------------------------------------------- probing and packing (worker side)


def _probe_file(path: str) -> dict:
    """The clip's probe, or why it failed; a failure of the system (permissions, I/O), which a fix outside the file
    ends, is marked `os_error` and not cached: the next build probes the file afresh, as the report says it will."""
    try:
        return {"info": asdict(probe(path))}
    except VideoError as err:
        return {"error": err.reason, **({"os_error": True} if err.from_os else {})}
    except OSError as err:
        return {"error": f"can't be read ({err.strerror or err})", "os_error": True}
    except Exception as err:  # noqa: BLE001 - one odd file must not stop the build; its reason is kept
        return {"error": f"unexpected {type(err).__name__} while probing: {err}"}


def _write_and_probe(target: str, write, failing: str) -> dict:
    """`write` the clip to a temporary name, move it into place and probe it; any error is the clip's reason."""
    partial = Path(target).with_suffix(".part")
    try:
        write(partial)
        os.replace(partial, target)
        return {"info": asdict(probe(target))}
    except VideoError as err:
        return {"error": err.reason}
    except Exception as err:  # noqa: BLE001 - see _probe_file
        return {"error": f"{failing}: {type(err).__name__}: {err}"}
    finally:
        partial.unlink(missing_ok=True)


def _presample_file(source: str, target: str, sampling: dict, crf: int) -> dict:
    """Re-encode the frames the model would see as a small H.264 clip, then probe it."""
    import av

    def write(partial: Path) -> None:
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

    return _write_and_probe(target, write, "presampling failed")


def _remux_file(source: str, target: str) -> dict:
    """Store a clip in Matroska with its frames untouched, then probe the copy.

    The video stream is copied packet for packet; a codec Matroska can't hold (WMV, say) is re-encoded
    losslessly (FFV1, the same pixel format), so it still decodes to the same frames.
    """
    import av

    def write(partial: Path) -> None:
        with av.open(source) as original, av.open(str(partial), "w", format="matroska") as copy:
            video = video_stream(original)  # the stream every command samples
            try:
                stream = copy.add_stream_from_template(video)
            except ValueError:  # "'matroska' format does not support '<codec>' codec"
                _reencode_losslessly(original, video, copy)
                return
            for packet in original.demux(video):
                if packet.dts is not None or packet.pts is not None:  # not the demuxer's closing empty packet
                    packet.stream = stream
                    copy.mux(packet)

    return _write_and_probe(target, write, "storing in Matroska failed")


def _reencode_losslessly(original, video, copy) -> None:
    """FFV1: lossless in any pixel format and, unlike H.264, it states no chroma siting of its own, so the
    frames convert to RGB exactly as the original's do."""
    stream = copy.add_stream("ffv1", rate=video.average_rate or video.guessed_rate or 25, options={"threads": "1"})
    stream.width, stream.height = video.codec_context.width, video.codec_context.height
    stream.pix_fmt = video.codec_context.pix_fmt
    stream.codec_context.time_base = video.time_base
    for frame in original.decode(video):
        copy.mux(stream.encode(frame))
    copy.mux(stream.encode())


def _leave_interrupts_to_the_main() -> None:
    """A pool worker ignores Ctrl-C (the terminal sends it to every process of the group): the main process
    saves what is done and stops the workers. A worker that caught it would go on with the jobs queued for it;
    one that died of it while reading the job queue would hold the queue's lock for good. SIGTERM, which the
    main process turns into an interrupt (`errors.run`), ends a worker at once: that is how the main stops them.
    A main process killed outright (SIGKILL, the OOM killer) can stop no one: on Linux the kernel sends its workers
    SIGTERM then (prctl's PR_SET_PDEATHSIG, which neither concurrent.futures nor multiprocessing sets); they would
    otherwise wait on the job queue for good, holding their memory."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _run_parallel(function, jobs: list[tuple], description: str, num_proc: int, chunked: bool = True):
    """Yield `function(*job)` for each job, in order, computed on `num_proc` processes, with a progress bar.

    `chunked=False` sends one job at a time: for long jobs (presampling), so each result comes back, and can be
    recorded, as soon as it is done. Close the generator when stopping early: that stops the workers."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    if not jobs:
        return
    bar = dict(total=len(jobs), desc=description, unit="clip", disable=None)
    if num_proc <= 1 or len(jobs) == 1:
        yield from tqdm((function(*job) for job in jobs), **bar)
        return
    chunksize = max(1, min(32, len(jobs) // (num_proc * 4))) if chunked else 1
    pool = ProcessPoolExecutor(num_proc, initializer=_leave_interrupts_to_the_main)
    try:
        yield from tqdm(pool.map(function, *zip(*jobs), chunksize=chunksize), **bar)
    except BaseException:
        # stopped early (Ctrl-C): what the workers are doing would not be recorded, so end them now rather than
        # wait for the jobs already queued (Python 3.14 calls this ProcessPoolExecutor.terminate_workers)
        for process in pool._processes.values():
            process.terminate()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------- build cache


def file_key(path: Path) -> str:
    """Identity of an input file for the cache: its path (hashed: the cache names no local path), size, mtime."""
    stat = path.stat()
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:20]
    return f"v{CACHE_VERSION}:{digest}:{stat.st_size}:{stat.st_mtime_ns}"


class _Cache:
    """`.build_cache.jsonl`: probe results per input file, what produced each stored clip, the split each clip
    was ever given (kept while it is set aside or gone, so it comes back to the same split) and the test_size."""

    def __init__(self, out: Path):
        self.path = out / CACHE_NAME
        self.probes: dict[str, dict] = {}
        self.outputs: dict[str, dict] = {}  # stored file (relative) -> {"source", "recipe", "info"}
        self.splits: dict[str, str] = {}  # clip id -> "train" | "test"
        self.test_size: float | None = None
        if self.path.exists():
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    record = json.loads(line)
                    if "probe" in record:
                        self.probes[record.pop("probe")] = record
                    elif "clip" in record:
                        self.splits[record["clip"]] = record["split"]
                    elif "test_size" in record:
                        self.test_size = float(record["test_size"])
                    else:
                        self.outputs[record.pop("output")] = record
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                    raise BuildError(
                        f"{self.path}:{number}: not a build cache record ({err}); delete the file to rebuild"
                    ) from None

    def save(self, used_probes: set[str] | None = None) -> None:
        """Write the cache, keeping only `used_probes` when given (the final save of a build)."""
        keys = sorted(self.probes if used_probes is None else used_probes & self.probes.keys())
        lines = [json.dumps({"probe": key, **self.probes[key]}, sort_keys=True) for key in keys]
        lines += [json.dumps({"output": name, **self.outputs[name]}, sort_keys=True) for name in sorted(self.outputs)]
        lines += [json.dumps({"clip": clip_id, "split": self.splits[clip_id]}) for clip_id in sorted(self.splits)]
        if self.test_size is not None:
            lines.append(json.dumps({"test_size": self.test_size}))
        write_if_changed(self.path, "".join(line + "\n" for line in lines))


@contextlib.contextmanager
def _saved_when_interrupted(cache: _Cache, results):
    """Save the cache when Ctrl-C stops the loop inside over `results` (a `_run_parallel`), so the next build
    resumes from the last clip done, not from the last checkpoint (up to CHECKPOINT_EVERY presampled clips to
    encode again); the workers are stopped at once, whichever way the loop ends."""
    with contextlib.closing(results):
        try:
            yield
        except KeyboardInterrupt:
            cache.save()
            raise


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


def _store_original(source: Path, target: Path, copy: bool, probed: dict) -> dict:
    """Store the original clip; returns its probe result (or the error that kept it out)."""
    try:
        link_or_copy(source, target, copy=copy)
    except OSError as err:
        return {"error": f"can't be stored in the dataset ({err.strerror})"}
    return probed


# ----------------------------------------------------------------------------- splitting


def _hash_unit(clip_id: str) -> float:
    """A clip id's place in [0, 1): stable across runs, machines and Python versions."""
    return int(hashlib.sha256(clip_id.encode("utf-8")).hexdigest()[:15], 16) / 16**15


def assign_splits(clip_ids: list[str], test_size: float, previous: dict[str, str] | None = None) -> dict[str, str]:
    """clip id -> "train" | "test", by a hash of the id; a clip of `previous` (the dataset being updated) keeps
    the split it had there.

    A fraction holds out each clip whose hash falls below it, so a clip keeps its split when others are
    added; when that leaves `test` empty (a few clips: 12 at 0.1 often have no hash below it) the new clip
    with the smallest hash is held out, if another is left to train on. A count holds out the new clips
    with the smallest hashes, as many as the count lacks beside the test clips kept. Either way a rebuild
    that adds clips (labels back from review, say) moves no clip between train and test: a moved test clip
    would train the next version on what the last one is tested on.
    """
    if test_size < 0:
        raise UsageError(f"--test_size {test_size:g}: must be at least 0")
    if test_size >= 1 and test_size != int(test_size):
        raise UsageError(f"--test_size {test_size:g}: 1 or more is a clip count and must be whole")
    kept = {c: previous[c] for c in clip_ids if previous and previous.get(c) in SPLITS}
    new = sorted((c for c in clip_ids if c not in kept), key=lambda c: (_hash_unit(c), c))
    if test_size < 1:
        held_out = {c for c in new if _hash_unit(c) < test_size}
        if test_size > 0 and not held_out and "test" not in kept.values() and len(clip_ids) > 1:
            held_out = set(new[:1])
    else:
        room = max(0, int(test_size) - sum(split == "test" for split in kept.values()))
        held_out = set(new[:room])
    return {c: kept.get(c) or ("test" if c in held_out else "train") for c in clip_ids}


def built_splits(out: Path) -> dict[str, str]:
    """clip id -> split of the dataset already built in `out` (none when there is none)."""
    import pyarrow.parquet as pq

    found = {}
    for split in SPLITS:
        path = out / split / METADATA_NAME
        if path.is_file():
            found.update(dict.fromkeys(pq.read_table(path, columns=["clip_id"]).column("clip_id").to_pylist(), split))
    return found


# ----------------------------------------------------------------------------- the build


def _check_output_dir(out: Path, input_path: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / CACHE_NAME).exists():
        raise BuildError(f"{out}: not empty and not made by `avlabel build`; choose a new folder")
    if out.resolve() == input_path.resolve():
        raise UsageError(f"--output_dir {out}: the output folder can't be the input folder")


def build(args: BuildArguments) -> BuildResult:
    """Build (or update) the dataset folder; every input file ends in a row or in the quarantine report."""
    from .card import write_card

    input_path, out = Path(args.input), Path(args.output_dir)
    _check_output_dir(out, input_path)
    try:
        inputs = read_inputs(args.input, args.layout, skip=out.resolve())
    except InputError as err:
        raise BuildError(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    cache = _Cache(out)
    cache.save()  # marks the folder as the builder's from the start, so a build that stops can resume
    num_proc = args.num_proc or os.cpu_count() or 1
    problems = list(inputs.problems)
    clips = inputs.clips

    labels: dict[str, dict] = {}
    extras: dict[str, dict] = {}
    for clip in clips.values():
        if clip.video is None:
            expected = EXPECTED_VIDEO[inputs.layout].format(id=clip.clip_id)
            problems.append(Problem(clip.label_name, "scan", f"label without a clip (expected {expected})"))
            continue
        if clip.label is None:
            expected = EXPECTED_LABEL[inputs.layout].format(id=clip.clip_id)
            problems.append(Problem(clip.video_name, "scan", f"clip without a label (expected {expected})"))
            continue
        label, extra, reason = read_label(clip.label, strict=args.strict)
        if reason:
            problems.append(Problem(clip.label_name, "label", reason))
        else:
            labels[clip.clip_id], extras[clip.clip_id] = label, extra

    # every clip is probed, labelled or not, so one report lists all that is wrong with the input
    keys: dict[str, str] = {}
    for clip in inputs.with_video:
        try:
            keys[clip.clip_id] = file_key(clip.video)
        except OSError as err:
            missing = isinstance(err, FileNotFoundError)
            reason = missing_file_reason(clip.video) if missing else f"can't be read ({err.strerror})"
            problems.append(Problem(clip.video_name, "probe", reason))
    sources = {keys[c]: str(clips[c].video) for c in keys}
    todo = sorted(key for key in sources if key not in cache.probes)
    probed = _run_parallel(_probe_file, [(sources[key],) for key in todo], "Probing", num_proc)
    refused_by_os: dict[str, dict] = {}
    with _saved_when_interrupted(cache, probed):
        for done, (key, result) in enumerate(zip(todo, probed, strict=True), 1):
            (refused_by_os if result.get("os_error") else cache.probes)[key] = result
            if done % CHECKPOINT_EVERY == 0:
                cache.save()  # a build that is killed resumes from here
    infos: dict[str, dict] = {}
    for clip_id, key in keys.items():
        result = refused_by_os.get(key) or cache.probes[key]
        # checked here, not in the cached probe, so a clip probed by an earlier version is checked too: a clip no
        # model of the families can take would pass, and stop training when its length is estimated
        reason = result.get("error") or aspect_problem(result["info"]["height"], result["info"]["width"])
        if reason is not None:
            problems.append(Problem(clips[clip_id].video_name, "probe", reason))
        else:
            infos[clip_id] = result["info"]

    good = sorted(clip_id for clip_id in labels if clip_id in infos)
    test_size = args.test_size if args.test_size is not None else cache.test_size if cache.test_size is not None \
        else DEFAULT_TEST_SIZE
    if not good:  # nothing usable (a disk not mounted, clips without their labels): the version there stays as it was
        problems = _reported(out, problems, clips, {})
        cache.save()
        return BuildResult(out, inputs.layout, {}, problems, sorted(set(inputs.names)), probed=len(todo), packed=0,
                           test_size=test_size)
    built = built_splits(out)  # the version this build replaces
    previous = dict(cache.splits or built)  # a dataset built before splits were cached has them only in its metadata
    splits = assign_splits(good, test_size, previous)
    fresh = assign_splits(good, test_size)
    kept_splits = sum(splits[c] != fresh[c] for c in good if c in previous)
    cache.splits.update(splits)
    cache.test_size = test_size
    cache.save()  # the splits are on record before any metadata names them
    stored, packed = _pack(args, out, cache, clips, keys, splits, num_proc, problems)
    for clip_id in set(good) - stored.keys() - previous.keys():
        del cache.splits[clip_id]  # a new clip set aside while stored keeps no split: fixed, it is drawn as a new one
    if any(splits[c] == "test" and c not in stored for c in good):
        _hold_out_again(out, cache, stored, splits, test_size, previous)

    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for clip_id in good:
        if clip_id not in stored:
            continue
        name, info = stored[clip_id]
        extra = json.dumps(extras[clip_id], ensure_ascii=False, sort_keys=True) if extras[clip_id] else None
        row = {"file_name": Path(name).name, "clip_id": clip_id, **label_to_row(labels[clip_id]), EXTRA_COLUMN: extra}
        row.update({column: info[column] for column in PROBE_COLUMNS})
        rows[splits[clip_id]].append(row)
    rows = {split: split_rows for split, split_rows in rows.items() if split_rows}

    for split in SPLITS:
        metadata = out / split / METADATA_NAME
        if split in rows:
            _write_metadata(metadata, rows[split])
        else:
            metadata.unlink(missing_ok=True)
    problems = _reported(out, problems, clips, stored)
    cache.save(set(keys.values()))
    remuxed = sum(Path(name).suffix != clips[c].video.suffix.lower() for c, (name, _) in stored.items())
    write_card(
        out,
        rows,
        problems,
        layout=inputs.layout,
        test_size=test_size,
        license=args.license,
        pretty_name=args.pretty_name,
        presampled=args.sampling().to_dict() | {"crf": args.crf} if args.presample else None,
        source_bytes=sum(clips[c].video.stat().st_size for c in stored),
        remuxed=0 if args.presample else remuxed,
    )
    return BuildResult(
        out, inputs.layout, rows, problems, sorted(set(inputs.names)), probed=len(todo), packed=packed,
        remuxed=0 if args.presample else remuxed, with_extra=sum(bool(extras[c]) for c in stored),
        more_streams=sum(infos[c]["video_streams"] > 1 for c in stored),
        kept_splits=kept_splits, test_size=test_size, left_out=len(built.keys() - clips.keys()),
    )


def _hold_out_again(out: Path, cache: _Cache, stored: dict, splits: dict[str, str], test_size: float,
                    previous: dict[str, str]) -> None:
    """A clip held out for `test` was set aside while being stored (corrupt past the frames its probe decodes): the
    split is drawn again over the clips stored, and a clip new in this build that it now holds out moves from
    train/ to test/. A clip of an earlier version never moves, as in `assign_splits`."""
    again = assign_splits(sorted(stored), test_size, previous)
    for clip_id, (name, info) in list(stored.items()):
        if again[clip_id] == "test" and splits[clip_id] == "train" and clip_id not in previous:
            moved = f"test/{Path(name).name}"
            (out / "test").mkdir(exist_ok=True)
            os.replace(out / name, out / moved)
            stored[clip_id] = (moved, info)
            cache.outputs[moved] = cache.outputs.pop(name)
            splits[clip_id] = cache.splits[clip_id] = "test"
    cache.save()


def _reported(out: Path, problems: list[Problem], clips: dict[str, InputClip], stored: dict) -> list[Problem]:
    """Every problem, with the partners of the files set aside, in report order, as the quarantine report writes them."""
    problems = sorted(set(problems + _partners(clips, stored, problems)), key=lambda p: (p.path, p.stage, p.reason))
    write_if_changed(out / QUARANTINE_NAME, "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in problems))
    return problems


def _partners(clips: dict[str, InputClip], stored: dict, problems: list[Problem]) -> list[Problem]:
    """The files set aside only because their partner was: the video of a bad label, the label of a bad video."""
    refused = {problem.path for problem in problems}
    partners = []
    for clip in clips.values():
        if clip.clip_id in stored or not (clip.video_name and clip.label_name) or clip.video_name == clip.label_name:
            continue
        for name, kind, other, other_kind in ((clip.video_name, "clip", clip.label_name, "label"),
                                              (clip.label_name, "label", clip.video_name, "clip")):  # fmt: skip
            if name not in refused and other in refused:
                reason = f"its {other_kind} {other} was set aside"
                partners.append(Problem(name, "partner", reason, partner=other))
    return partners


def _pack(args, out, cache, clips, keys, splits, num_proc, problems) -> tuple[dict[str, tuple[str, dict]], int]:
    """Put each good clip at `<split>/<clip_id><ext>`, reusing what an earlier build stored.

    Returns clip id -> (stored file relative to `out`, probe info of the stored file) and how many were written.
    """
    presample = ""
    if args.presample:
        presample = "presample " + json.dumps(args.sampling().to_dict() | {"crf": args.crf}, sort_keys=True)

    def recipe(source: Path) -> str:
        """How a clip is stored: presampled, remuxed, or the original."""
        return presample or ("remux" if stored_suffix(source, False) == REMUX_SUFFIX else "original")

    kept = {name: record for name, record in cache.outputs.items() if (out / name).is_file()}
    cache.outputs = kept  # checkpoints below record each clip as it is written
    # a stored clip is found again by its source file and name, whichever split it was in
    by_source = {(record["source"], Path(name).name): name for name, record in kept.items()}
    stored: dict[str, tuple[str, dict]] = {}
    to_write: list[tuple[str, str]] = []
    for clip_id, split in splits.items():
        source = clips[clip_id].video
        name = f"{split}/{clip_id}{stored_suffix(source, args.presample)}"
        previous = by_source.get((keys[clip_id], Path(name).name))
        if previous is not None and previous != name:
            (out / split).mkdir(exist_ok=True)
            os.replace(out / previous, out / name)  # the clip changed split: move, don't redo
            kept[name] = kept.pop(previous)
        if name in kept and kept[name]["source"] == keys[clip_id] and kept[name]["recipe"] == recipe(source):
            stored[clip_id] = (name, kept[name]["info"])
        else:
            to_write.append((clip_id, name))

    for split in {splits[clip_id] for clip_id, _ in to_write}:
        (out / split).mkdir(exist_ok=True)
    sampling = args.sampling().to_dict()
    jobs = []  # presampling and remuxing decode or rewrite files: on the pool, one clip a job; links are made here
    for clip_id, name in to_write:
        source, how = str(clips[clip_id].video), recipe(clips[clip_id].video)
        jobs.append((source, str(out / name), how, sampling, args.crf, cache.probes[keys[clip_id]], args.copy))
    results = _run_parallel(_store_file, jobs, "Storing", num_proc if any(j[2] != "original" for j in jobs) else 1,
                            chunked=False)
    written = 0
    with _saved_when_interrupted(cache, results):
        for done, ((clip_id, name), result) in enumerate(zip(to_write, results, strict=True), 1):
            if "error" in result:
                problems.append(Problem(clips[clip_id].video_name, "pack", result["error"]))
                continue
            kept[name] = {"source": keys[clip_id], "recipe": recipe(clips[clip_id].video), "info": result["info"]}
            stored[clip_id] = (name, result["info"])
            written += 1
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
    return stored, written


def _store_file(source: str, target: str, how: str, sampling: dict, crf: int, probed: dict, copy: bool) -> dict:
    """Store one clip as `how` says; returns its probe result (or the error that kept it out)."""
    if how.startswith("presample"):
        return _presample_file(source, target, sampling, crf)
    if how == "remux":
        return _remux_file(source, target)
    return _store_original(Path(source), Path(target), copy, probed)


# ----------------------------------------------------------------------------- command line


def print_summary(result: BuildResult, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, highlight=False)
    counts = ", ".join(f"{len(rows)} {split}" for split, rows in result.rows.items()) or "no clips"
    reused = result.num_rows - result.packed
    built = "Built" if result.rows else "Nothing built in"
    console.print(
        f"{built} {result.output_dir} ({result.layout} layout): {counts}; probed {result.probed} file(s), wrote "
        f"{result.packed} clip(s)" + (f", reused {reused} from the last build." if reused > 0 else ".")
    )
    in_rows = len(result.inputs) - len(result.set_aside)
    console.print(
        f"Read {len(result.inputs)} input file(s): {in_rows} in the {result.num_rows} row(s), "
        f"{len(result.set_aside)} set aside."
    )
    if result.left_out:
        console.print(f"{result.left_out} clip(s) of the dataset's last version are not in this input and are left "
                      "out of this one: a build's input is the whole dataset (to keep them, build from a folder "
                      "holding them all).")
    if result.remuxed:
        console.print(f"{result.remuxed} clip(s) remuxed into Matroska ({REMUX_SUFFIX}): datasets' videofolder does "
                      "not list their container; the video is copied, its frames untouched.")
    if result.test_size > 0 and result.rows and "test" not in result.rows:
        why, fix = ("a single clip", "add clips") if result.num_rows == 1 else \
            ("each clip keeps the `train` split an earlier build gave it", "build into a new --output_dir to split afresh")
        console.print(f"No clip is held out for `test` (--test_size {result.test_size:g}, {why}): the recipes' "
                      f"evaluation during training and `avlabel caption` read `test` by default; {fix}.")
    if result.kept_splits:
        console.print(f"{result.kept_splits} clip(s) kept the split an earlier build gave them, where --test_size "
                      f"{result.test_size:g} alone would move them: no test clip of one version trains the next "
                      "(build into a new --output_dir to split afresh).")
    if result.more_streams:
        console.print(f"{result.more_streams} clip(s) hold more than one video stream (a second camera, a cover "
                      "picture): each is labelled from its default stream, the one every command reads; the others "
                      "are not read.")
    if result.with_extra:
        console.print(f"{result.with_extra} label(s) had keys beyond the schema: kept in the `{EXTRA_COLUMN}` column.")
    if not result.problems:
        console.print("Nothing set aside.")
        return
    table = Table(title=f"Set aside: {len(result.set_aside)} input file(s), listed in {QUARANTINE_NAME}",
                  title_justify="left")
    for column in ("path", "stage", "reason"):
        table.add_column(column, overflow="fold")
    for problem in result.problems:
        table.add_row(problem.path, problem.stage, problem.reason)
    console.print(table)
    console.print("Fix or replace these files and run the same build again: it reads them afresh and reuses the "
                  "rest (a test clip that comes back goes back to test).")


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    if subparsers is not None:
        return subparsers.add_parser(NAME, dataclass_types=[BuildArguments])
    return ArgumentParser(dataclass_types=[BuildArguments], prog=f"avlabel {NAME}")


def main(args: BuildArguments) -> BuildResult:
    result = build(args)
    print_summary(result)
    if not result.rows:
        raise BuildError(
            f"nothing usable: all {len(result.set_aside)} input file(s) were set aside, for the reasons listed above "
            f"and in {result.output_dir / QUARANTINE_NAME}; fix them and build again (any dataset there is left as it was)"
        )
    if args.strict and result.problems:
        raise BuildError(
            f"--strict: {len(result.set_aside)} input file(s) set aside; see {result.output_dir / QUARANTINE_NAME}"
        )
    return result


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("build")
