"""Frame sampling: the one function that turns a video file into model frames.

The builder, training and inference all call `sample_frames`, so a clip is never seen
with different frames in training than in inference. The rules are Qwen's (the
`qwen-vl-utils` reference sampler, which the tests use as an oracle):

* frame count: duration x target fps, clamped to [min_frames, max_frames] and to the
  number of frames in the file, rounded down to an even number (Qwen's temporal patch
  merges two frames);
* frame positions: evenly spaced from the first to the last frame, rounded;
* frame size: both sides multiples of the patch factor (the model family's:
  avlabel/families), aspect ratio kept, pixel count within [min_pixels, max_pixels].

Decoding uses PyAV, which bundles FFmpeg and so reads H.264, HEVC, VP9, AV1 and 10-bit
files the same on every machine. Real-world quirks are handled here: variable frame
rate (positions are chosen by timestamp), rotation metadata (frames are turned upright),
odd sizes, audio streams (ignored), clips shorter than one sampling interval, AVI
files with dropped frames (their index counts frames the file never stores), and files with
more than one video stream (`video_stream`: a cover picture or a second camera).

What a clip is, for every command: a file whose video stream demuxes and decodes, judged
by what is there (packets and their timestamps), never by a frame count the container
claims. It is truncated when its timestamps end short of the length the container
records (an index or a header); containers that record none (MPEG-TS, MPEG-PS, a fragmented
mp4) end where their data ends, at the last frame FFmpeg shows. Frames FFmpeg never shows (before
the first keyframe, hidden by an edit list) are no part of it. A still image given a video's name
(a JPEG renamed .mp4) is no clip.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from avlabel.families import DEFAULT_FAMILY, FAMILIES, family_of

SAMPLING_FILE = "sampling_config.json"  # in a model folder: the sampling it was trained with
TEMPORAL_PATCH = 2  # Qwen2.5-VL / Qwen3-VL merge two consecutive frames into one token grid


class VideoError(RuntimeError):
    """A clip that can't be decoded; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str, from_os: bool = False):
        self.path = str(path)
        self.reason = reason
        self.from_os = from_os  # the system refused the file (permissions, I/O): nothing said of its bytes
        super().__init__(f"{path}: {reason}")


SAMPLING_FLAGS = ("fps", "max_frames", "min_pixels", "max_pixels")


def pixel_budget(family, name: str) -> str:
    """A family's default `min_pixels` or `max_pixels` as tokens x factor x factor ("128*28*28"), for the help."""
    defaults = family.sampling_defaults()
    return f"{defaults[name] // defaults['factor'] ** 2}*{defaults['factor']}*{defaults['factor']}"


SAMPLING_HELP = {
    "fps": "Frames sampled per second of video",
    "max_frames": "Most frames taken from one clip",
    "min_pixels": "Fewest pixels a frame is resized to",
    "max_pixels": "Most pixels a frame is resized to",
}


def sampling_flag(name: str, unset: str):
    """The field of one of SAMPLING_FLAGS, its help ending in what applies when it is not given."""
    return field(default=None, metadata={"help": f"{SAMPLING_HELP[name]} ({unset})."})


def _family_budgets(name: str) -> str:
    """Each family's default `min_pixels` or `max_pixels`, for the flags' help."""
    return ", ".join(f"{pixel_budget(family, name)} for {family.title}" for family in FAMILIES.values())


@dataclass
class SamplingArguments:
    """The frame-sampling flags of `build`, `train` and `caption` (their argument dataclasses inherit these).

    Unset, a model's own sampling applies (`sampling_config.json`, saved with it by training), else
    the recipe's defaults (`SamplingConfig`); what is set overrides either. `build` reads no model, and
    says so in its own help.
    """

    fps: float | None = sampling_flag("fps", "unset: the model's own, else 2")
    max_frames: int | None = sampling_flag("max_frames", "unset: the model's own, else 768")
    min_pixels: int | None = sampling_flag(
        "min_pixels", f"unset: the model's own, else its family's: {_family_budgets('min_pixels')}"
    )
    max_pixels: int | None = sampling_flag(
        "max_pixels", f"unset: the model's own, else its family's: {_family_budgets('max_pixels')}"
    )

    def __post_init__(self):
        from avlabel.core.errors import UsageError
        from avlabel.core.parser import check_at_least

        check_at_least(1, max_frames=self.max_frames, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        if self.fps is not None and not self.fps > 0:
            raise UsageError(f"--fps {self.fps}: give a rate above 0 frames per second")

    def sampling_overrides(self) -> dict:
        """The flags that were set."""
        return {name: getattr(self, name) for name in SAMPLING_FLAGS if getattr(self, name) is not None}

    def resolve_sampling(self, model_config=None, *sources: str | Path | None, factor: int | None = None) -> SamplingConfig:
        """These flags over a model's saved sampling (`sources`: model folders or Hub ids, searched in order)
        and the defaults; without a model config, over the defaults with `factor`."""
        if model_config is not None:
            return SamplingConfig.for_model(model_config, *sources, **self.sampling_overrides())
        return SamplingConfig(**self.sampling_overrides(), **({"factor": factor} if factor else {}))


@dataclass(frozen=True)
class SamplingConfig:
    """How frames are taken from a clip. Defaults are the Cosmos recipe's: 2 fps, and the pixel budget and
    patch factor of its model family (`DEFAULT_FAMILY`: 252x448 for 16:9)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = DEFAULT_FAMILY.sampling_defaults()["min_pixels"]
    max_pixels: int = DEFAULT_FAMILY.sampling_defaults()["max_pixels"]
    factor: int = DEFAULT_FAMILY.sampling_defaults()["factor"]  # frame sides are multiples of this

    @classmethod
    def for_model(cls, model_config, *sources: str | Path | None, **overrides) -> SamplingConfig:
        """The sampling for a model: the `sampling_config.json` saved with it, else its family's defaults, then `overrides`.

        A model carries the sampling it was trained on, so captioning it with no settings
        given sees the frames training saw. `sources` are model folders or Hub ids, searched
        in order (an adapter before its base model); overrides that are None are ignored; the
        patch factor always comes from the model's family (avlabel/families).
        """
        defaults = family_of(model_config).sampling_defaults(model_config)
        saved = _saved_sampling(sources) or {}
        given = {name: value for name, value in overrides.items() if value is not None}
        return cls(**{**defaults, **saved, **given, "factor": defaults["factor"]})

    def save(self, folder: str | Path) -> Path:
        """Write `sampling_config.json` into a model folder, next to its config.json."""
        path = Path(folder) / SAMPLING_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def to_dict(self) -> dict:
        return asdict(self)


def _saved_sampling(sources: tuple[str | Path | None, ...]) -> dict | None:
    """The settings in `sampling_config.json` of the first of `sources` that has one, or None."""
    from .loading import saved_with_model

    def checked(**saved) -> dict:
        SamplingConfig(**saved)
        return saved

    return saved_with_model(sources, SAMPLING_FILE, "sampling config", checked)


@dataclass(frozen=True)
class ClipInfo:
    """What probing a clip tells: the builder stores these as columns."""

    duration: float
    fps: float
    width: int  # as displayed, after rotation
    height: int
    codec: str
    num_frames: int
    rotation: int
    has_audio: bool
    video_streams: int = 1  # more than one: the others (a second camera, a cover picture) are not read


@dataclass
class Clip:
    """Sampled frames as the processor takes them, in training and in inference."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, T even
    sample_fps: float

    def processor_metadata(self) -> dict:
        """`video_metadata` for a Qwen-VL processor called with `do_sample_frames=False`.

        The processor derives the seconds per temporal grid from `fps`; the frames are
        already sampled, so that is the sampling rate, not the file's.
        """
        count = len(self.frames)
        return {"fps": self.sample_fps, "total_num_frames": count, "frames_indices": list(range(count))}


@dataclass
class SampledClip(Clip):
    """A `Clip` fresh from `sample_frames`, with where its frames came from."""

    indices: list[int]  # positions of the frames in the decoded stream
    timestamps: list[float]  # seconds from the start of the clip
    info: ClipInfo


# ----------------------------------------------------------------------------- Qwen's rules


MAX_ASPECT_RATIO = 200  # Qwen's smart_resize refuses a longer side over 200 times the shorter one


def aspect_problem(height: int, width: int) -> str | None:
    """Why no Qwen-VL model can take a clip of this size (its aspect ratio), or None."""
    if max(height, width) / max(1, min(height, width)) > MAX_ASPECT_RATIO:
        return (f"aspect ratio {width}x{height} is too extreme for the vision encoder (at most "
                f"{MAX_ASPECT_RATIO}:1): crop the clip or leave it out")
    return None


def resized_size(height: int, width: int, config: SamplingConfig) -> tuple[int, int]:
    """Qwen's `smart_resize`: sides multiple of the factor, pixels in budget, aspect kept."""
    factor = config.factor
    if (problem := aspect_problem(height, width)) is not None:
        raise ValueError(problem)
    if height % factor == 0 and width % factor == 0 and height * width <= config.max_pixels:
        # Already model-sized (a clip presampled by the builder, say). Qwen would scale it up
        # to min_pixels, which adds tokens but no detail, and would make a presampled clip
        # look different in training than the original does in inference.
        return height, width
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > config.max_pixels:
        beta = math.sqrt(height * width / config.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < config.min_pixels:
        beta = math.sqrt(config.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_count(total_frames: int, video_fps: float, config: SamplingConfig) -> int:
    """Qwen's `smart_nframes`, extended to clips with fewer frames than one temporal patch."""
    if total_frames < TEMPORAL_PATCH:
        return TEMPORAL_PATCH  # a single frame is repeated to fill the temporal patch
    min_frames = math.ceil(config.min_frames / TEMPORAL_PATCH) * TEMPORAL_PATCH
    max_frames = math.floor(min(config.max_frames, total_frames) / TEMPORAL_PATCH) * TEMPORAL_PATCH
    wanted = total_frames / video_fps * config.fps
    count = min(max(wanted, min_frames), max_frames, total_frames)
    return max(TEMPORAL_PATCH, math.floor(count / TEMPORAL_PATCH) * TEMPORAL_PATCH)


def frame_positions(timestamps: list[float], count: int) -> list[int]:
    """Which decoded frames to keep: evenly spaced in time.

    For a constant frame rate this is exactly Qwen's `linspace(0, n-1, count).round()`.
    For a variable frame rate, evenly spaced indices would bunch up where frames are
    dense, so each evenly spaced instant takes the frame nearest to it instead.
    """
    total = len(timestamps)
    if total == 1:
        return [0] * count
    steps = np.diff(timestamps)
    constant_rate = steps.size == 0 or (steps.max() - steps.min()) <= 0.1 * max(float(np.median(steps)), 1e-9)
    if constant_rate:
        # torch.linspace(...).round() rounds half to even, as numpy does
        return [int(i) for i in np.round(np.linspace(0, total - 1, count))]
    ts = np.asarray(timestamps)
    wanted = np.linspace(ts[0], ts[-1], count)
    right = np.clip(np.searchsorted(ts, wanted), 1, total - 1)
    left = right - 1
    nearest = np.where(wanted - ts[left] <= ts[right] - wanted, left, right)
    return [int(i) for i in nearest]


# ----------------------------------------------------------------------------- decoding


def _ffmpeg_reason(err: Exception) -> str:
    """FFmpeg's message without the file name it appends (VideoError names the file once, first)."""
    return getattr(err, "strerror", None) or str(err)


def missing_file_reason(path: Path) -> str:
    """Why a listed clip isn't there: a link to a missing file (a disk not mounted) names where it points."""
    return f"a link to {os.readlink(path)}, which does not exist" if path.is_symlink() else "file not found"


def _open(path: Path):
    import av

    from .layouts import raw_stream_reason

    if not path.exists():
        raise VideoError(path, missing_file_reason(path))
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")
    # a manifest or a dataset can name one too: FFmpeg opens it, but its packets carry no times ("no frames")
    if reason := raw_stream_reason(path):
        raise VideoError(path, reason)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        # FFmpeg's errors of the system (av.error.PermissionError, ...) are OSErrors; those of the bytes are not
        raise VideoError(path, f"not a readable video container ({_ffmpeg_reason(err)})",
                         from_os=isinstance(err, OSError)) from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]  # before close(), which empties streams
        container.close()
        raise VideoError(path, f"no video stream (streams: {', '.join(kinds)})")
    return container


def video_stream(container):
    """The video stream that is the clip: FFmpeg's pick (`av_find_best_stream`, what players show).

    It takes the stream flagged default, then one with more than a single frame: a cover picture or
    thumbnail muxed in before the video is not the clip, and of a front and a rear camera in one file
    the camera flagged default is. The builder stores and every command samples this same stream.
    """
    return container.streams.best("video")


def _image_format(container) -> str | None:
    """The image format FFmpeg read the file as (JPEG, PNG, ...), or None for a video container."""
    name = container.format.name
    if name.endswith("_pipe"):  # FFmpeg's image demuxers: jpeg_pipe, png_pipe, webp_pipe, ...
        return name.removesuffix("_pipe").upper()
    if name in ("image2", "image2pipe"):
        return video_stream(container).codec_context.name.upper()
    return None


def _frame_timestamps(container, path: Path) -> list[float]:
    """Presentation times of every frame, from the packets (decoding only the last group of pictures of a file that
    records no length, or whose data ends inside a frame)."""
    import av

    stream = video_stream(container)
    stored = _stored_duration(container, stream)
    packets = []  # (pts, keyframe, shown) in decoding order
    try:
        for packet in container.demux(stream):
            if packet.pts is not None and packet.size > 0:
                packets.append((packet.pts, packet.is_keyframe, not packet.is_discard))
                cut = packet.is_corrupt  # of the last packet: the data ends inside it
    except av.error.FFmpegError as err:
        raise VideoError(path, f"corrupt or truncated data ({_ffmpeg_reason(err)})") from None
    if packets and (cut or stored is None):
        # A recording that lost power mid-write ends in a frame whose data is cut, and the frames that need it don't
        # decode either. A container that records a length is checked against it below; one that records none (a
        # fragmented mp4, MPEG-TS, MPEG-PS) does not always flag the cut packet (an MPEG-TS never does), so there
        # the clip ends where FFmpeg's frames do, found by decoding from the last keyframe.
        keys = [p for p, key, _ in packets if key]
        last_key = keys[-1] if keys else packets[0][0]
        # from the keyframe before: a seek in MPEG-TS can land past its target, and the last group's frames with it
        shown = _shown_from(path, keys[-2] if len(keys) > 1 else None)
        if last_key not in shown and len(keys) > 1:  # landed past that one too (or the last keyframe is cut)
            shown = _shown_from(path, None)
        packets = [(p, key, visible and (p < last_key or p in shown)) for p, key, visible in packets]
    # Frames that are never shown have no place in the clip:
    # * a file cut from a running stream (a TS segment cut on time, a loop recording after a power cut) can start
    #   inside a group of pictures: the frames before its first keyframe need frames it does not hold, and FFmpeg
    #   drops them, so the clip starts at that keyframe (a stream that flags no keyframe keeps every frame);
    # * a discarded packet is decoded only as a reference: an mp4 cut with `ffmpeg -ss ... -c copy` starts at a
    #   keyframe before the cut, and its edit list hides the frames up to the cut.
    first_key = next((p for p, key, _ in packets if key), None)
    pts = [p for p, _, shown in packets if shown and (first_key is None or p >= first_key)]
    if not pts:
        raise VideoError(path, "the video stream holds no frames")
    image = _image_format(container)
    if image and len(packets) == 1:
        # a photo named .mp4 decodes as a one-frame clip; a model labelling motion from it would guess
        raise VideoError(path, f"a still image ({image} data named as a video), not a video: "
                               "give the camera's video file")
    pts.sort()
    base = float(stream.time_base)
    timestamps = [(p - pts[0]) * base for p in pts]
    # A file cut short (an mp4 with its index at the front, a Matroska file) demuxes without error,
    # just fewer packets: compare the time they cover with the length the container records. Not
    # the frame count: an AVI index also counts dropped frames, which have no packet.
    fps = _decoded_fps(stream, timestamps)
    # where the frames end, from the clip's first frame or from the container's zero (a header's length
    # counts from there when the first frame starts late, as in an MPEG-PS stream copied into Matroska)
    covered = max(timestamps[-1], pts[-1] * base) + 1 / fps
    if stored is not None and stored - covered > 2 / fps + 0.01:
        raise VideoError(path, f"truncated: the container records {stored:.2f} s but the frames end at {covered:.2f} s")
    return timestamps


def _shown_from(path: Path, start: int | None) -> set[int]:
    """The presentation times of the frames FFmpeg shows from the keyframe at `start` (stream time; None: the first
    frame) to the end.

    On a container of its own: decoding opens the codec, whose threading sample_frames sets before it opens."""
    import av

    shown = set()
    with av.open(str(path)) as container:
        stream = video_stream(container)
        if start is not None:
            container.seek(start, stream=stream)  # to the keyframe at or before `start`, or (MPEG-TS) near it
        try:
            for frame in container.decode(stream):
                if frame.pts is not None:
                    shown.add(frame.pts)
        except av.error.FFmpegError:
            pass  # the cut frame: those decoded before it are counted
    return shown


def _stored_duration(container, stream) -> float | None:
    """The video's length as the container records it: an index (mp4, mov, avi) or a Matroska/WebM header.

    None where it records none: MPEG-TS and MPEG-PS durations are FFmpeg's estimates from the data.
    """
    if stream.frames and stream.duration:
        return float(stream.duration * stream.time_base)
    if container.format.name.startswith("matroska"):
        tag = stream.metadata.get("DURATION")  # the track's own length, e.g. 00:00:04.000000000
        if tag:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        if len(container.streams) == 1 and container.duration:  # the segment's length is the video's
            return container.duration / 1_000_000
    return None


def _open_indexed(path: Path):
    """The open container, rewound, and the presentation time of each of its frames."""
    container = _open(path)
    try:
        timestamps = _frame_timestamps(container, path)
    except VideoError:
        container.close()
        raise
    container.seek(0)
    return container, timestamps


def probe(path: str | Path) -> ClipInfo:
    """Read a clip's metadata and check that its frames can be decoded.

    Decodes the first frame (to catch files that demux but don't decode) and walks the
    packets (to count frames and catch truncation). Raises VideoError naming the file.
    """
    path = Path(path)
    container, timestamps = _open_indexed(path)
    with container:
        first = _first_frame(container, path)
        return _info(container, video_stream(container), first, timestamps)


def _first_frame(container, path: Path):
    import av

    try:
        for frame in container.decode(video_stream(container)):
            return frame
    except av.error.FFmpegError as err:
        raise VideoError(path, f"frames can't be decoded ({_ffmpeg_reason(err)})") from None
    raise VideoError(path, "no frame could be decoded (truncated or corrupt data)")


def _info(container, stream, first_frame, timestamps: list[float]) -> ClipInfo:
    rotation = int(first_frame.rotation or 0) % 360
    width, height = first_frame.width, first_frame.height
    if rotation in (90, 270):
        width, height = height, width
    count = len(timestamps)
    fps = _decoded_fps(stream, timestamps)
    duration = timestamps[-1] + 1.0 / fps if count else 0.0
    return ClipInfo(
        duration=round(duration, 3),
        fps=round(fps, 3),
        width=width,
        height=height,
        codec=stream.codec_context.name,
        num_frames=count,
        rotation=rotation,
        has_audio=bool(container.streams.audio),
        video_streams=len(container.streams.video),
    )


def _upright(frame, size: tuple[int, int], rotation: int, reformatter) -> np.ndarray:
    """One frame as RGB at the target size, turned upright by its rotation metadata."""
    height, width = size
    if rotation in (90, 270):
        height, width = width, height  # resize in stored orientation, then turn
    # swscale's bicubic does the resize in the same pass as the colour conversion
    image = reformatter.reformat(frame, width=width, height=height, format="rgb24", interpolation="BICUBIC").to_ndarray()
    # display rotation is counter-clockwise in degrees; np.rot90 turns counter-clockwise
    return np.ascontiguousarray(np.rot90(image, k=rotation // 90)) if rotation else image


def sample_frames(path: str | Path, config: SamplingConfig = SamplingConfig()) -> SampledClip:
    """Decode `path` and return the frames the model sees, at the model's size.

    This is the function every stage uses. It raises VideoError, naming the file and
    the reason, for files with no video stream, no bytes, or data that won't decode.
    """
    import av
    from av.video.reformatter import VideoReformatter

    path = Path(path)
    container, timestamps = _open_indexed(path)
    # this clip's own swscale context, not frame.reformat's: PyAV 19 shares one per thread, and a DataLoader worker
    # forked from a process that had sampled a clip waited forever on the slice threads of the parent's copy
    reformatter = VideoReformatter()
    with container:
        stream = video_stream(container)
        stream.thread_type = "AUTO"
        count = frame_count(len(timestamps), _decoded_fps(stream, timestamps), config)
        positions = frame_positions(timestamps, count)
        wanted = set(positions)

        frames: dict[int, np.ndarray] = {}
        info = None
        size = None
        index = -1
        try:
            for index, frame in enumerate(container.decode(stream)):
                if info is None:
                    info = _info(container, stream, frame, timestamps)
                    size = resized_size(info.height, info.width, config)
                if index in wanted:
                    frames[index] = _upright(frame, size, info.rotation, reformatter)
                    if len(frames) == len(wanted):
                        break
        except av.error.FFmpegError as err:
            raise VideoError(path, f"decoding failed at frame {index + 1} ({_ffmpeg_reason(err)})") from None
        if len(frames) < len(wanted):  # the packets are all there (a cut file fails earlier): some don't decode
            raise VideoError(path, f"corrupt data: {index + 1} of its {len(timestamps)} frames decode; copy the clip "
                                   "from the camera again, or leave it out")

    sample_fps = count / len(timestamps) * info.fps if len(timestamps) > 1 else config.fps
    return SampledClip(
        frames=np.stack([frames[i] for i in positions]),
        indices=positions,
        timestamps=[round(timestamps[i], 4) for i in positions],
        info=info,
        sample_fps=sample_fps,
    )


def _decoded_fps(stream, timestamps: list[float]) -> float:
    """Frames per second of what is stored: the container's rate, unless the timestamps disagree.

    They disagree in an AVI with dropped frames: 68 packets over 29.5 s at a nominal 15 fps. A
    variable frame rate that averages out stays within the tolerance and keeps the nominal rate.
    """
    nominal = float(stream.average_rate) if stream.average_rate else None
    count, span = len(timestamps), timestamps[-1]
    if count > 1 and span > 0 and (nominal is None or abs(span - (count - 1) / nominal) > 0.1 * span + 2 / nominal):
        return (count - 1) / span
    return nominal or 1.0
