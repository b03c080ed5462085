"""Synthetic clips: deterministic, valid labels, and pixels that carry those labels."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import av
import numpy as np
import pytest

from avlabel.demo import synthetic
from avlabel.core.sampling import SamplingConfig, probe, sample_frames
from conftest import SYNTHETIC_CLIPS
from eval_labels import load_label_file

# the tiny training recipe's view of a clip: 2 fps, at most 112x112 pixels (140x84 for 16:9)
TINY_VIEW = SamplingConfig(min_pixels=56 * 56, max_pixels=112 * 112)


def _clips(raw_dir):
    videos = sorted((raw_dir / "videos").glob(f"*{synthetic.VIDEO_SUFFIX}"))
    return [(v, raw_dir / "metas" / v.name.replace(synthetic.VIDEO_SUFFIX, synthetic.LABEL_SUFFIX)) for v in videos]


@pytest.fixture(scope="module")
def sampled(synthetic_raw_dir):
    """(label, frames at the tiny model's resolution) of every fixture clip."""
    return [(load_label_file(meta), sample_frames(video, TINY_VIEW).frames) for video, meta in _clips(synthetic_raw_dir)]


def test_recipe_layout_with_valid_labels_and_h264_clips(synthetic_raw_dir):
    clips = _clips(synthetic_raw_dir)
    assert len(clips) == SYNTHETIC_CLIPS
    assert sorted(p.name for p in (synthetic_raw_dir / "metas").iterdir()) == sorted(m.name for _, m in clips)
    for index, (video, meta) in enumerate(sorted(clips, key=lambda c: c[0].name)):
        clip_id = video.name.removesuffix(synthetic.VIDEO_SUFFIX)
        assert str(uuid.UUID(clip_id)) == clip_id
        load_label_file(meta)  # fails on any invalid field
        info = probe(video)
        assert (info.width, info.height, info.codec, info.num_frames) == (256, 144, "h264", 30)
        assert info.duration == pytest.approx(3.0, abs=0.01)
        with av.open(str(video)) as container:
            assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    ids = {synthetic.clip_id(0, i) for i in range(SYNTHETIC_CLIPS)}
    assert {v.name.removesuffix(synthetic.VIDEO_SUFFIX) for v, _ in clips} == ids


def test_same_seed_same_bytes_other_seed_other_clips(tmp_path):
    first = synthetic.generate(tmp_path / "a", num_clips=3, seed=7, seconds=1.0, workers=1, progress=False)
    second = synthetic.generate(tmp_path / "b", num_clips=3, seed=7, seconds=1.0, workers=2, progress=False)
    other = synthetic.generate(tmp_path / "c", num_clips=3, seed=8, seconds=1.0, workers=1, progress=False)
    assert first == second and not set(first) & set(other)
    for name in first:
        for sub, suffix in (("videos", synthetic.VIDEO_SUFFIX), ("metas", synthetic.LABEL_SUFFIX)):
            assert (tmp_path / "a" / sub / f"{name}{suffix}").read_bytes() == (tmp_path / "b" / sub / f"{name}{suffix}").read_bytes()
    # clip i of a seed does not depend on how many clips were asked for
    assert synthetic.generate(tmp_path / "a", num_clips=1, seed=7, seconds=1.0, progress=False) == first[:1]


def test_resume_keeps_finished_clips_and_writes_missing_ones(tmp_path):
    names = synthetic.generate(tmp_path, num_clips=2, seed=1, seconds=1.0, workers=1, progress=False)
    kept = tmp_path / "videos" / f"{names[0]}{synthetic.VIDEO_SUFFIX}"
    before = kept.stat().st_mtime_ns
    (tmp_path / "metas" / f"{names[1]}{synthetic.LABEL_SUFFIX}").unlink()
    synthetic.generate(tmp_path, num_clips=2, seed=1, seconds=1.0, workers=1, progress=False)
    assert kept.stat().st_mtime_ns == before
    assert (tmp_path / "metas" / f"{names[1]}{synthetic.LABEL_SUFFIX}").exists()


def test_labels_follow_the_scene():
    scenes = [synthetic.sample_scene(3, i) for i in range(300)]
    for scene in scenes:
        label = synthetic.scene_label(scene)
        actions = label["interactive_expanded_metaaction"] or []
        assert ("Yield to VRUs" in actions) == scene.pedestrian
        assert ("Vehicle following" in actions) == scene.lead
        assert (scene.light == "none") == (label["traffic_light"] == "No traffic light")
        if scene.light != "none":
            assert scene.light in label["traffic_light"]
        assert (label["additional_map_rules"] is None) == (not scene.crosswalk)
        assert label["rule_violation"] == str(scene.pedestrian and not scene.crosswalk)
        calm = scene.weather in ("Clear skies", "Partly cloudy", "Overcast") and not scene.night
        if calm and not scene.pedestrian and not scene.vehicles:
            assert label["driving_difficulty"] == 1
        if scene.weather in ("Heavy rain", "Dense fog"):
            assert label["driving_difficulty"] >= (4 if scene.pedestrian else 3)
        if scene.lighting == "Daytime (direct sunlight)":
            assert scene.weather in ("Clear skies", "Partly cloudy")


def test_class_distribution_is_not_degenerate():
    labels = synthetic.scene_labels(400, seed=0)
    for field in ("weather", "lighting", "traffic_light", "driving_difficulty"):
        counts = Counter(str(label[field]) for label in labels)
        assert len(counts) >= 4, field
        assert max(counts.values()) / len(labels) < 0.42, (field, counts.most_common(2))
    assert Counter(label["rule_violation"] for label in labels)["True"] > 0


def _luma(frames: np.ndarray) -> float:
    return float((frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).mean() / 255)


def _lamp_pixels(frames: np.ndarray) -> dict[str, float]:
    """Mean count per frame of saturated red/yellow/green pixels in the top third, where the signal hangs."""
    top = frames[:, : frames.shape[1] // 3].astype(np.float32) / 255
    r, g, b = top[..., 0], top[..., 1], top[..., 2]
    masks = {
        "red": (r > 0.7) & (g < 0.35) & (b < 0.35),
        "yellow": (r > 0.7) & (g > 0.55) & (b < 0.3),
        "green": (g > 0.7) & (r < 0.45) & (b < 0.8),
    }
    return {name: float(mask.sum() / len(frames)) for name, mask in masks.items()}


def test_night_is_darker_than_day(sampled):
    night = [_luma(frames) for label, frames in sampled if label["lighting"].startswith("Night")]
    day = [_luma(frames) for label, frames in sampled if label["lighting"].startswith("Daytime")]
    assert night and day
    assert max(night) < min(day)


def test_traffic_light_state_is_visible_at_the_tiny_resolution(sampled):
    states = Counter()
    for label, frames in sampled:
        text = label["traffic_light"]
        expected = next((c for c in ("red", "yellow", "green") if c in text), "none")
        states[expected] += 1
        counts = _lamp_pixels(frames)
        if expected == "none":
            assert max(counts.values()) < 15, (text, counts)
        else:
            # the lit lamp is at least ~20 px across after downscaling: hundreds of pixels a frame
            assert counts[expected] > 200, (text, counts)
            assert all(counts[other] < 0.2 * counts[expected] for other in counts if other != expected), counts
    assert len(states) == 4, states


def test_sky_colour_follows_the_weather_by_day():
    """By day a clear or partly cloudy sky is blue; overcast, rain, snow and fog skies are grey."""
    scenes = [synthetic.sample_scene(5, i) for i in range(120)]
    # no overhead signal, which would cover much of the sky
    scenes = [s for s in scenes if s.light == "none" and not s.night][:16]
    blueness = {}
    for scene in scenes:
        sky = synthetic.render_frames(scene, 128, 72, fps=0.4, seconds=5.0)[:, :20].astype(np.float32) / 255
        blueness.setdefault(scene.weather in ("Clear skies", "Partly cloudy"), []).append(float((sky[..., 2] - sky[..., 0]).mean()))
    assert min(blueness[True]) > 0.15 and max(blueness[False]) < 0.05


def test_a_linear_probe_reads_weather_lighting_and_signal_from_pixels():
    """Pixels carry the labels: a ridge classifier on colour thumbnails beats the majority class by far."""

    def features(frames):
        f = frames.astype(np.float32) / 255
        t, h, w, _ = f.shape
        thumb = f.reshape(t, 8, h // 8, 16, w // 16, 3).mean((2, 4))
        texture = np.abs(np.diff(f, axis=1)).mean((1, 2))  # rain streaks and snow are fine vertical detail
        return np.concatenate([thumb.mean(0).ravel(), thumb.std(0).ravel(), texture.mean(0)])

    scenes = [synthetic.sample_scene(11, i) for i in range(160)]
    # 4 frames over 5 s, as the tiny training recipe samples them
    x = np.array([features(synthetic.render_frames(s, 128, 72, fps=0.8, seconds=5.0)) for s in scenes])
    x = np.c_[(x - x.mean(0)) / (x.std(0) + 1e-6), np.ones(len(x))]
    labels = [synthetic.scene_label(s) for s in scenes]
    train, test = slice(0, 110), slice(110, None)
    for field, minimum in (("weather", 0.5), ("lighting", 0.8), ("traffic_light", 0.8)):
        y = np.array([label[field] for label in labels])
        classes = np.array(sorted(set(y)))
        onehot = (y[:, None] == classes[None]).astype(np.float64)
        weights = np.linalg.solve(x[train].T @ x[train] + np.eye(x.shape[1]), x[train].T @ onehot[train])
        accuracy = float((classes[(x[test] @ weights).argmax(1)] == y[test]).mean())
        majority = max(float((y[test] == c).mean()) for c in classes)
        assert accuracy >= minimum and accuracy > majority + 0.2, (field, accuracy, majority)


def test_label_files_are_the_recipe_json(synthetic_raw_dir):
    _, meta = _clips(synthetic_raw_dir)[0]
    raw = json.loads(meta.read_text())
    assert list(raw) == list(load_label_file(meta))
    assert raw["rule_violation"] in ("True", "False") and isinstance(raw["driving_difficulty"], int)
