"""The project's own collection of odd but real inputs, written by generators (nothing is downloaded).

`write_collection(root)` writes it in the recipe layout (`videos/<id>.<ext>`, `metas/<id>.label.json`):
containers and codecs (WebM VP9, Matroska, QuickTime, AVI with dropped frames in MPEG-4 Part 2 and in
Cinepak, MPEG-TS, MPEG-PS), sizes, rotation metadata, a variable frame rate, a cover picture muxed in before
the video, broken files (a still image named .mp4 among them), and the label
variants real exports write. `ROWS`, `SET_ASIDE` and `PARTNERS` say what the builder does with each file;
the README's table of accepted and refused inputs is checked against what it prints.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

REFERENCE = Path(__file__).parent / "fixtures" / "reference.label.json"  # a label in the recipe's format
# clip ids that become rows
ROWS = {
    "mp4_h264", "webm_vp9", "mkv_h264", "mov_mpeg4", "avi_mpeg4_dropped_frames", "avi_cinepak_dropped_frames",
    "ts_h264", "mpg_mpeg2", "odd_size_251x141", "portrait_rotated_90", "variable_frame_rate", "with_audio",
    "uppercase_extension", "duplicate_id", "label_with_bom", "label_with_extra_keys", "label_normalized_values",
    "cover_before_video",
}
# the files set aside for a reason of their own: file -> (stage, a part of the reason)
SET_ASIDE = {
    "videos/zero_bytes.mp4": ("probe", "empty file (0 bytes)"),
    "videos/truncated_mp4.mp4": ("probe", "not a readable video container"),
    "videos/truncated_webm.webm": ("probe", "truncated: the container records"),
    "videos/text_renamed_mp4.mp4": ("probe", "not a readable video container"),
    "videos/audio_only.mp4": ("probe", "no video stream (streams: audio)"),
    "videos/still_image.mp4": ("probe", "a still image (JPEG data named as a video), not a video"),
    "videos/extreme_aspect_3200x14.mp4": ("probe", "aspect ratio 3200x14 is too extreme for the vision encoder"),
    "videos/duplicate_id.mp4": ("scan", "duplicate clip id 'duplicate_id' (also videos/duplicate_id.mov)"),
    "videos/no_label.mp4": ("scan", "clip without a label"),
    "videos/notes.txt": ("scan", "not a clip (extension .txt"),
    "videos/mdvr_channel1.h264": ("scan", "a bare H.264 stream with no container (no timestamps to sample by): "
                                  "wrap it, e.g. `ffmpeg -framerate <fps> -i mdvr_channel1.h264 -c copy "
                                  "mdvr_channel1.mp4`"),
    "metas/label_missing_field.label.json": ("label", "lighting is missing"),
    "metas/label_wrong_value.label.json": ("label", "weather unknown category 'Sandstorm'"),
    "metas/label_invalid_json.label.json": ("label", "is not valid JSON"),
    "metas/label_not_an_object.label.json": ("label", "is not a JSON object"),
    "metas/label_not_utf8.label.json": ("label", "is not UTF-8 text"),
    "metas/label_nested_too_deep.label.json": ("label", "nests arrays or objects deeper than Python's JSON reader goes"),
    "metas/label_huge_number.label.json": ("label", "can't be read as JSON (Exceeds the limit (4300 digits)"),
    "metas/label_white_space.label.json": ("label", "holds only white space, no JSON"),
    "metas/label_conflicting_key.label.json": ("label", "gives 'weather' twice, as 'Heavy rain' and as "),
    "metas/no_clip.label.json": ("scan", "label without a clip"),
    "metas/notes.md": ("scan", "not a label file"),
}
# the files set aside because their partner was: file -> its partner
PARTNERS = {
    **{f"metas/{name}.label.json": f"videos/{name}.{ext}" for name, ext in (
        ("zero_bytes", "mp4"), ("truncated_mp4", "mp4"), ("truncated_webm", "webm"), ("text_renamed_mp4", "mp4"),
        ("audio_only", "mp4"), ("still_image", "mp4"), ("extreme_aspect_3200x14", "mp4"))},
    **{f"videos/{name}.mp4": f"metas/{name}.label.json" for name in (
        "label_missing_field", "label_wrong_value", "label_invalid_json", "label_not_an_object", "label_not_utf8",
        "label_nested_too_deep", "label_huge_number", "label_white_space", "label_conflicting_key")},
}
EXTRA_KEYS = {"objects": [{"class": "car", "track_id": 3}], "annotator": "A-17"}


def _pattern(index: int, height: int, width: int) -> np.ndarray:
    """A frame that changes with its index (a moving bar), so encoders keep every frame."""
    frame = np.full((height, width, 3), 40, np.uint8)
    frame[:, (index * 3) % width] = 255
    frame[..., 1] = (index * 17) % 256
    return frame


def write_video(path: Path, container: str | None = None, codec: str = "libx264", *, count: int = 8,
                width: int = 64, height: int = 36, fps: int = 4, pts: list[int] | None = None,
                pix_fmt: str = "yuv420p", rotation: int = 0, audio: bool = False, options: dict | None = None) -> Path:
    """Encode `count` frames; `pts` (in 1/fps units) leaves gaps, which the AVI muxer writes as dropped frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=container) as output:
        stream = output.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options or {}
        if rotation:
            stream.set_display_rotation(rotation)
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, fps)
        sound = _audio_stream(output) if audio else None
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(_pattern(i, height, width), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, fps)
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
        if sound is not None:
            mux_tone(output, sound, samples=16000 * count // fps)
    return path


def write_damaged_recording(path: Path) -> Path:
    """An HEVC MPEG-TS recording with a stretch of zeroed data in the middle (a failing memory card): every packet is
    there, so a probe (the packets and the first frame) passes it, but the frames whose data was hit don't decode."""
    write_video(path, "mpegts", "libx265", count=40, width=160, height=96, fps=10,
                options={"crf": "18", "x265-params": "log-level=error:keyint=10:min-keyint=10:scenecut=0"})
    data = bytearray(path.read_bytes())
    packets = len(data) // 188
    for k in range(packets * 4 // 10, packets // 2):
        data[k * 188 + 4 : (k + 1) * 188] = bytes(184)  # the payload, not the 4-byte header
    path.write_bytes(data)
    return path


def write_with_cover(path: Path, count: int = 8) -> Path:
    """A Matroska clip with a one-frame cover picture (MJPEG) muxed in before the video, as some exports write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="matroska") as output:
        cover = output.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 36, "yuvj420p"
        video = output.add_stream("libx264", rate=4)
        video.width, video.height, video.pix_fmt = 64, 36, "yuv420p"
        output.mux(cover.encode(av.VideoFrame.from_ndarray(np.zeros((36, 64, 3), np.uint8), format="rgb24")))
        output.mux(cover.encode())
        for i in range(count):
            output.mux(video.encode(av.VideoFrame.from_ndarray(_pattern(i, 36, 64), format="rgb24")))
        output.mux(video.encode())
    return path


def write_still_image(path: Path) -> Path:
    """A JPEG photo under a video's name."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pattern(0, 36, 64)).save(path, format="JPEG")
    return path


def _audio_stream(output):
    sound = output.add_stream("aac", rate=16000)
    sound.layout = "mono"
    return sound


def mux_tone(output, sound, samples: int) -> None:
    """Encode and mux a mono sine tone of `samples` samples at 16 kHz into the audio stream `sound`."""
    tone = (0.2 * np.sin(np.arange(samples) / 8.0)).astype(np.float32)[None]
    for start in range(0, samples, 1024):
        block = av.AudioFrame.from_ndarray(tone[:, start : start + 1024], format="fltp", layout="mono")
        block.sample_rate, block.pts = 16000, start
        for packet in sound.encode(block):
            output.mux(packet)
    for packet in sound.encode():
        output.mux(packet)


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as output:
        mux_tone(output, _audio_stream(output), samples=8000)
    return path


def _cut(path: Path, fraction: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])


def reference_label() -> dict:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


def write_videos(videos: Path) -> None:
    """The clips, the broken videos and a file that is no clip."""
    dropped = [0, 1, 5, 6, 7, 15, 16, 23]  # 8 frames stored over 24 frame slots: 16 dropped
    write_video(videos / "mp4_h264.mp4")
    write_video(videos / "webm_vp9.webm", "webm", "libvpx-vp9")
    write_video(videos / "mkv_h264.mkv", "matroska")
    write_video(videos / "mov_mpeg4.mov", "mov", "mpeg4")
    write_video(videos / "avi_mpeg4_dropped_frames.avi", "avi", "mpeg4", pts=dropped)
    write_video(videos / "avi_cinepak_dropped_frames.avi", "avi", "cinepak", pts=dropped, pix_fmt="rgb24")
    write_video(videos / "ts_h264.ts", "mpegts")
    write_video(videos / "mpg_mpeg2.mpg", "mpeg", "mpeg2video", fps=25, count=12)
    write_video(videos / "odd_size_251x141.mp4", width=251, height=141, pix_fmt="yuv444p")
    write_video(videos / "portrait_rotated_90.mp4", rotation=90)
    # 2 s at 8 fps, then 1 s at 2 fps, timestamps in 1/8 s
    write_video(videos / "variable_frame_rate.mkv", "matroska", count=18, fps=8, pts=[*range(16), 20, 24])
    write_video(videos / "with_audio.mp4", audio=True)
    write_with_cover(videos / "cover_before_video.mkv")
    write_video(videos / "uppercase_extension.MP4", "mp4")
    write_video(videos / "duplicate_id.mov", "mov")
    write_video(videos / "duplicate_id.mp4")  # the .mov sorts first and keeps the id
    for name in ("label_with_bom", "label_with_extra_keys", "label_normalized_values", "label_missing_field",
                 "label_wrong_value", "label_invalid_json", "label_not_an_object", "label_not_utf8",
                 "label_nested_too_deep", "label_huge_number", "label_white_space", "label_conflicting_key", "no_label"):
        write_video(videos / f"{name}.mp4")
    write_video(videos / "extreme_aspect_3200x14.mp4", width=3200, height=14)  # decodes; no Qwen-VL model takes it
    (videos / "zero_bytes.mp4").write_bytes(b"")
    _cut(write_video(videos / "truncated_mp4.mp4", count=24))
    _cut(write_video(videos / "truncated_webm.webm", "webm", "libvpx-vp9", count=24))
    (videos / "text_renamed_mp4.mp4").write_text("meeting notes, not a video\n" * 20, encoding="utf-8")
    write_audio_only(videos / "audio_only.mp4")
    write_still_image(videos / "still_image.mp4")
    (videos / "notes.txt").write_text("camera 3 was dirty on Tuesday\n", encoding="utf-8")
    write_video(videos / "mdvr_channel1.h264", "h264")  # a mobile DVR's bare stream


def write_labels(metas: Path) -> None:
    """One label per clip id that has one: the reference label, varied as exports vary it; and a stray file."""
    metas.mkdir(parents=True, exist_ok=True)
    label = reference_label()
    text = json.dumps(label, ensure_ascii=False, indent=2)
    special = {
        "label_with_bom": "\ufeff" + text,
        "label_with_extra_keys": json.dumps({**label, **EXTRA_KEYS}, ensure_ascii=False),
        "label_normalized_values": json.dumps({**label, "weather": "  light RAIN ", "rule_violation": False,
                                               "driving_difficulty": "2", "interactive_expanded_metaaction": []}),
        "label_missing_field": json.dumps({k: v for k, v in label.items() if k != "lighting"}),
        "label_wrong_value": json.dumps({**label, "weather": "Sandstorm"}),
        "label_invalid_json": text[:-20],
        "label_not_an_object": json.dumps([label]),
        # valid JSON past what Python's reader takes (a broken exporter's output)
        "label_nested_too_deep": json.dumps(label)[:-1] + ', "objects": ' + "[" * 5000 + "]" * 5000 + "}",
        "label_huge_number": json.dumps(label)[:-1] + ', "track_id": ' + "9" * 5000 + "}",
        "label_white_space": "\n  \n",
        # two edits of one label: json.loads would keep the last without a word
        "label_conflicting_key": '{"weather": "Heavy rain", ' + json.dumps(label)[1:],
    }
    unlabelled = {"no_label", "notes", "mdvr_channel1"}
    labelled = ROWS | {Path(path).name.split(".")[0] for path in [*SET_ASIDE, *PARTNERS]} - unlabelled
    (metas / "notes.md").write_text("labelled by the night shift\n", encoding="utf-8")
    for clip_id in sorted(labelled):
        if clip_id == "label_not_utf8":
            (metas / f"{clip_id}.label.json").write_bytes(text.encode("utf-16"))
            continue
        (metas / f"{clip_id}.label.json").write_text(special.get(clip_id, text), encoding="utf-8")


def write_collection(root: Path) -> Path:
    """The whole collection in the recipe layout under `root`; returns `root`."""
    write_videos(root / "videos")
    write_labels(root / "metas")
    return root


def input_files(root: Path) -> set[str]:
    """Every file of the collection, relative to `root`: what the build report has to account for."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
