"""One definition of a clip and one reader of inputs: build, caption and eval over the odd-input collection.

The collection (tests/odd_inputs.py) holds the containers, codecs, sizes, broken files and label variants
real data brings; these tests check what becomes a row, what is set aside and why, that every input file
is accounted for, that the three commands read the same clips, and that the README's table says so.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avlabel.core import schema
from avlabel.core.layouts import STORED_EXTENSIONS, VIDEO_EXTENSIONS, read_inputs
from avlabel.core.problems import InputError
from avlabel.core.sampling import VideoError, aspect_problem, probe, sample_frames
from avlabel.data_builder import build
from avlabel.data_builder.build import BuildArguments
from avlabel.eval.data import load_references
from avlabel.infer.inputs import resolve_inputs
from eval_labels import load_label_file
from odd_inputs import (
    EXTRA_KEYS, PARTNERS, ROWS, SET_ASIDE, input_files, reference_label, write_collection, write_still_image,
    write_video, write_with_cover,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    return write_collection(tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="module")
def built(collection, tmp_path_factory) -> build.BuildResult:
    out = tmp_path_factory.mktemp("odd_built") / "dataset"
    return build.build(BuildArguments(input=str(collection), output_dir=str(out), test_size=0, num_proc=1))


def _rows(result: build.BuildResult) -> dict[str, dict]:
    return {row["clip_id"]: row for rows in result.rows.values() for row in rows}


# ----------------------------------------------------------------------------- the builder


def test_every_odd_input_gets_its_fate(collection, built):
    rows = _rows(built)
    assert set(rows) == ROWS
    own = {p.path: p for p in built.problems if p.stage != "partner"}
    assert set(own) == set(SET_ASIDE)
    for path, (stage, reason) in SET_ASIDE.items():
        assert own[path].stage == stage and reason in own[path].reason, own[path]
    partners = {p.path: p.partner for p in built.problems if p.stage == "partner"}
    assert partners == PARTNERS
    for path, partner in PARTNERS.items():
        kind = "label" if partner.startswith("metas/") else "clip"
        assert any(p.path == path and p.reason == f"its {kind} {partner} was set aside" for p in built.problems)

    # every input file is accounted for: in a row, or set aside
    files = input_files(collection)
    assert set(built.inputs) == files
    in_rows = {f"metas/{clip_id}.label.json" for clip_id in rows} | {
        f"videos/{p.name}" for p in (collection / "videos").iterdir() if p.stem in rows and f"videos/{p.name}" not in own}
    assert len(in_rows) == 2 * len(ROWS)
    assert in_rows | set(built.set_aside) == files and not in_rows & set(built.set_aside)
    assert len(files) == len(in_rows) + len(built.set_aside)
    report = [json.loads(line) for line in (built.output_dir / build.QUARANTINE_NAME).read_text().splitlines()]
    assert report == [problem.to_dict() for problem in built.problems]

    printed = io.StringIO()
    build.print_summary(built, file=printed)
    summary = " ".join(printed.getvalue().split())
    assert f"Read {len(files)} input file(s): {len(in_rows)} in the {len(ROWS)} row(s), {len(built.set_aside)} set aside." in summary
    assert "3 clip(s) remuxed into Matroska (.mkv)" in summary  # the .webm, .ts and .mpg clips
    assert "1 label(s) had keys beyond the schema: kept in the `extra` column." in summary
    assert "1 clip(s) hold more than one video stream (a second camera, a cover picture)" in summary


def test_labels_as_exports_write_them(collection, built):
    rows = _rows(built)
    reference = load_label_file(collection / "metas" / "mp4_h264.label.json")
    assert schema.row_to_label(rows["label_with_bom"]) == reference
    assert schema.row_to_label(rows["label_with_extra_keys"]) == reference
    assert json.loads(rows["label_with_extra_keys"]["extra"]) == EXTRA_KEYS
    assert all(row["extra"] is None for clip_id, row in rows.items() if clip_id != "label_with_extra_keys")
    loose = schema.row_to_label(rows["label_normalized_values"])
    assert (loose["weather"], loose["rule_violation"], loose["driving_difficulty"]) == ("Light rain", "False", 2)
    assert loose["interactive_expanded_metaaction"] is None


def test_the_odd_rows_load_and_keep_their_frames(collection, built, tmp_path):
    """Every row loads through `datasets` and decodes; a remuxed clip holds the original's frames."""
    import datasets

    rows = _rows(built)
    assert {Path(row["file_name"]).suffix for row in rows.values()} <= set(STORED_EXTENSIONS)
    in_matroska = {clip_id for clip_id, row in rows.items() if row["file_name"].endswith(".mkv")}
    assert in_matroska == {"webm_vp9", "ts_h264", "mpg_mpeg2", "mkv_h264", "variable_frame_rate", "cover_before_video"}
    assert built.remuxed == 3  # the three .mkv clips were Matroska already: linked, not remuxed
    loaded = datasets.load_dataset(str(built.output_dir), split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(loaded["clip_id"]) == sorted(ROWS)
    for row in loaded:
        assert row["video"][0].shape[0] == 3, row["clip_id"]
    original = sample_frames(collection / "videos" / "webm_vp9.webm")
    stored = sample_frames(built.output_dir / "train" / "webm_vp9.mkv")
    assert stored.indices == original.indices and (stored.frames == original.frames).all()
    assert (rows["portrait_rotated_90"]["width"], rows["portrait_rotated_90"]["height"]) == (36, 64)
    dropped = rows["avi_cinepak_dropped_frames"]  # 8 frames over 6 s: not "truncated", not 2 s long
    assert dropped["codec"] == "cinepak" and dropped["duration"] > 5


def test_strict_refuses_extra_keys(collection, tmp_path):
    out = tmp_path / "strict"
    command = [sys.executable, "-m", "data_builder", "build", "--input", str(collection), "--output_dir", str(out),
               "--num_proc", "1", "--test_size", "0", "--strict"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    assert done.returncode == 1 and "--strict" in done.stderr and "Traceback" not in done.stderr
    report = {entry["path"]: entry for entry in map(json.loads, (out / build.QUARANTINE_NAME).read_text().splitlines())}
    refused = report["metas/label_with_extra_keys.label.json"]
    assert refused["reason"] == "has keys beyond the schema: objects, annotator (refused by --strict)"
    assert report["videos/label_with_extra_keys.mp4"]["partner"] == "metas/label_with_extra_keys.label.json"


def test_json_cut_short_in_a_string_is_named_once_with_its_place(collection, tmp_path):
    """A label and a manifest line that end inside a string: json's "Unterminated string starting at" reads with
    the position once ("starting at line 3 column 16"), not "at at"."""
    label = tmp_path / "torn.json"
    label.write_text('{\n  "weather": "Clear skies",\n  "lighting": "Dayl', encoding="utf-8")
    assert schema.read_label(label)[2] == "is not valid JSON (Unterminated string starting at line 3 column 15)"
    manifest = tmp_path / "clips.jsonl"
    good = {"video": str(collection / "videos" / "mp4_h264.mp4"), "label": str(collection / "metas" / "mp4_h264.label.json")}
    manifest.write_text(json.dumps(good) + '\n{"video": "a.mp4", "label": "metas/a.lab\n', encoding="utf-8")
    listed = build.build(BuildArguments(input=str(manifest), output_dir=str(tmp_path / "out"), num_proc=1))
    assert [str(p) for p in listed.problems] == ["clips.jsonl:2: line is not valid JSON (Unterminated string starting at column 29)"]


def test_a_manifest_line_past_pythons_json_reader_is_set_aside(collection, tmp_path):
    """A line json.loads stops on without calling it malformed (nesting past the recursion limit) is one reason, not
    the end of the build."""
    manifest = tmp_path / "clips.jsonl"
    good = {"video": str(collection / "videos" / "mp4_h264.mp4"), "label": str(collection / "metas" / "mp4_h264.label.json")}
    manifest.write_text(json.dumps(good) + "\n" + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    listed = build.build(BuildArguments(input=str(manifest), output_dir=str(tmp_path / "out"), num_proc=1))
    assert listed.num_rows == 1
    assert [p.reason for p in listed.problems] == ["line is not valid JSON (nests arrays or objects too deeply)"]


def test_a_manifest_from_a_windows_tool_reads_its_backslashes_as_folders(collection, tmp_path):
    """An export written on Windows names `videos\\clip.mp4`; on Linux that is one file name, which no file has."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "metas").mkdir()
    shutil.copy(collection / "videos" / "mp4_h264.mp4", tmp_path / "videos" / "clip.mp4")
    shutil.copy(collection / "metas" / "mp4_h264.label.json", tmp_path / "metas" / "clip.label.json")
    manifest = tmp_path / "clips.csv"
    manifest.write_text("video,label\r\nvideos\\clip.mp4,metas\\clip.label.json\r\n", encoding="utf-8")
    listed = build.build(BuildArguments(input=str(manifest), output_dir=str(tmp_path / "out"), num_proc=1, test_size=0))
    assert listed.problems == [] and [row["clip_id"] for row in listed.rows["train"]] == ["clip"]


def test_an_empty_input_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_builder", "build", "--input", str(tmp_path / "empty"), "--output_dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no clips or labels found" in lines[0] and str(tmp_path / "empty") in lines[0]
    assert "the recipe layout (videos/ + metas/)" in lines[0] and "a manifest" in lines[0]
    assert not out.exists()
    with pytest.raises(InputError, match="no clips or labels found"):
        resolve_inputs(str(tmp_path / "empty"))


def _write_links(tmp_path: Path) -> Path:
    """A flat folder whose clips are partly links: a day's folder linked in from another disk (and linked twice),
    a link back up (a loop), and a clip linked to a disk that is not mounted."""
    text = json.dumps(reference_label())
    flat, disk = tmp_path / "linked", tmp_path / "disk"
    for folder, clip_id in ((flat / "day1", "own"), (disk / "day2", "linked")):
        write_video(folder / f"{clip_id}.mp4")
        (folder / f"{clip_id}.json").write_text(text, encoding="utf-8")
    (flat / "day2").symlink_to(disk / "day2")
    (flat / "latest").symlink_to(disk / "day2")
    (flat / "day1" / "up").symlink_to(flat)
    (flat / "unmounted.mp4").symlink_to(tmp_path / "nas" / "unmounted.mp4")
    (flat / "unmounted.json").write_text(text, encoding="utf-8")
    return flat


def test_linked_folders_are_read_once_and_a_dangling_link_is_named(tmp_path):
    flat = _write_links(tmp_path)
    (flat / "a_day1").symlink_to(flat / "day1")  # sorts before the folder it links to, which is the one read
    result = build.build(BuildArguments(input=str(flat), output_dir=str(tmp_path / "out"), test_size=0, num_proc=1))
    assert set(_rows(result)) == {"own", "linked"}
    reasons = {p.path: p.reason for p in result.problems}
    assert reasons == {
        "latest": f"a link to {(tmp_path / 'disk' / 'day2').resolve()}, a folder already read",
        "day1/up": f"a link to {flat.resolve()}, a folder already read",
        "a_day1": f"a link to {(flat / 'day1').resolve()}, a folder already read",
        "unmounted.mp4": f"a link to {tmp_path / 'nas' / 'unmounted.mp4'}, which does not exist",
        "unmounted.json": "its clip unmounted.mp4 was set aside",
    }
    # named where they sit in the input, not where the links point
    assert {"day1/own.mp4", "day2/linked.mp4", "day2/linked.json"} < set(result.inputs)
    assert len(result.inputs) == 4 + len(result.set_aside)
    # a glob lists the dangling link too, for caption to report
    assert [c.clip_id for c in resolve_inputs(str(flat / "*.mp4"))] == ["unmounted"]


def test_a_folder_of_clips_with_its_own_split_named_table_is_a_folder_of_clips(tmp_path):
    """`test_routes.csv` or a README in another encoding beside the clips does not make the folder a dataset."""
    from avlabel.core.layouts import detect_layout

    text = json.dumps(reference_label())
    fleet, recipe = tmp_path / "fleet", tmp_path / "recipe"
    for clip_id in ("a", "b"):
        write_video(fleet / f"{clip_id}.mp4")
        (fleet / f"{clip_id}.json").write_text(text, encoding="utf-8")
        write_video(recipe / "videos" / f"{clip_id}.mp4")
        (recipe / "metas").mkdir(exist_ok=True)
        (recipe / "metas" / f"{clip_id}.label.json").write_text(text, encoding="utf-8")
    for folder in (fleet, recipe):
        (folder / "test_routes.csv").write_text("date,route\n2024-05-01,A4\n", encoding="utf-8")
        (folder / "README.md").write_bytes("Flotte \u00e9t\u00e9 2024\n".encode("latin-1"))
    result = build.build(BuildArguments(input=str(fleet), output_dir=str(tmp_path / "out"), test_size=0, num_proc=1))
    assert result.layout == "flat" and set(_rows(result)) == {"a", "b"}
    assert {p.path for p in result.problems} == {"test_routes.csv", "README.md"}
    assert {c.clip_id for c in resolve_inputs(str(fleet), problems=[])} == {"a", "b"} == set(load_references(fleet)[0])
    assert detect_layout(str(recipe)) == "recipe"
    # split-named data files alone still make a dataset
    (tmp_path / "data" / "test.jsonl").parent.mkdir()
    (tmp_path / "data" / "test.jsonl").write_text("{}\n", encoding="utf-8")
    assert detect_layout(str(tmp_path / "data")) == "dataset"


# ----------------------------------------------------------------------------- one definition of a clip


def _container(extension: str) -> tuple[str, str]:
    """A muxer and a codec that write a clip with this extension."""
    return {".m4v": ("ipod", "libx264"), ".mov": ("mov", "libx264"), ".3gp": ("3gp", "libx264"),
            ".mkv": ("matroska", "libx264"), ".webm": ("webm", "libvpx-vp9"), ".avi": ("avi", "mpeg4"),
            ".mpeg": ("mpeg", "mpeg2video"), ".mpg": ("mpeg", "mpeg2video"), ".ts": ("mpegts", "libx264"),
            ".m2ts": ("mpegts", "libx264"), ".mts": ("mpegts", "libx264"), ".flv": ("flv", "libx264"),
            ".wmv": ("asf", "wmv2"), ".asf": ("asf", "msmpeg4"), ".mxf": ("mxf", "mpeg2video"),
            ".mp4": ("mp4", "libx264")}[extension]  # fmt: skip


def test_every_clip_extension_is_read_built_and_loaded(tmp_path):
    """One clip per extension the reader calls a clip: build stores each (remuxed where needed), caption and eval
    read the same ids, and `datasets` decodes every stored clip."""
    import datasets

    flat = tmp_path / "flat"
    text = json.dumps(reference_label())
    for extension in VIDEO_EXTENSIONS:
        clip_id = f"clip_{extension[1:]}"
        write_video(flat / f"{clip_id}{extension}", *_container(extension), fps=25, count=10)
        (flat / f"{clip_id}.json").write_text(text, encoding="utf-8")
    result = build.build(BuildArguments(input=str(flat), output_dir=str(tmp_path / "out"), test_size=0, num_proc=1))
    ids = {f"clip_{extension[1:]}" for extension in VIDEO_EXTENSIONS}
    assert set(_rows(result)) == ids and not result.problems
    assert {c.clip_id for c in resolve_inputs(str(flat))} == ids == set(load_references(flat)[0])
    loaded = datasets.load_dataset(str(result.output_dir), split="train", cache_dir=str(tmp_path / "cache"))
    for row in loaded:
        assert row["video"][0].shape == (3, 36, 64), row["clip_id"]
    for clip_id, row in _rows(result).items():  # stored as is, remuxed, or (WMV in Matroska) re-encoded losslessly
        original = sample_frames(flat / f"{clip_id}.{clip_id.removeprefix('clip_')}")
        stored = sample_frames(result.output_dir / "train" / row["file_name"])
        assert stored.indices == original.indices and (stored.frames == original.frames).all(), clip_id


def test_an_avi_with_dropped_frames_is_whole(tmp_path):
    """The AVI index counts 24 frames, the file stores 8 packets over 6 s: a whole clip, sampled evenly in time."""
    import av

    path = write_video(tmp_path / "dropped.avi", "avi", "cinepak", pts=[0, 1, 5, 6, 7, 15, 16, 23], pix_fmt="rgb24")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 24  # what the old check compared with
    info = probe(path)
    assert info.num_frames == 8 and info.duration > 5.5
    clip = sample_frames(path)
    assert len(clip.frames) == 8  # 2 fps over ~6 s asks for 12; only 8 are stored, every one is taken
    assert clip.timestamps[-1] == pytest.approx(23 / 4)


def test_a_truncated_matroska_file_is_named_truncated(tmp_path):
    path = write_video(tmp_path / "cut.webm", "webm", "libvpx-vp9", count=24)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VideoError, match=r"truncated: the container records 6\.00 s but the frames end at"):
        probe(path)


def _caption_with_the_tiny_model(source: Path, model_dir: Path, out: Path) -> dict[str, dict]:
    """`avlabel caption` of `source` with the tiny recipe, in this process on one thread; its records by clip id."""
    import torch

    from avlabel.infer.caption import main, make_parser

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--config", str(REPO / "recipes" / "infer" / "tiny.yaml"), "--model", str(model_dir),
                "--input", str(source), "--output_dir", str(out), "--max_new_tokens", "4"]
        main(*make_parser().parse_args_and_config(args=argv))
    finally:
        torch.set_num_threads(before)
    return {r["clip_id"]: r for r in map(json.loads, (out / "captions.jsonl").read_text().splitlines())}


def _fleet_folder(folder: Path) -> Path:
    """A flat folder of what dashcams and fleet pipelines write, each clip with its label."""
    from fractions import Fraction

    hevc = {"codec": "libx265", "options": {"x265-params": "log-level=error:keyint=8:min-keyint=8:scenecut=0"}}
    write_video(folder / "hevc_10bit.mov", "mov", pix_fmt="yuv420p10le", **hevc)
    write_video(folder / "hevc_29_97.ts", "mpegts", fps=Fraction(30000, 1001), count=24, **hevc)
    write_video(folder / "upside_down.mp4", rotation=180)
    write_video(folder / "motion_jpeg.avi", "avi", "mjpeg", pix_fmt="yuvj420p")
    running = write_video(folder / "running.ts", "mpegts", count=24, **hevc)  # a keyframe every 2 s
    data = running.read_bytes()
    (folder / "segment.ts").write_bytes(data[: 2 * 188] + data[(2 + len(data) // 188 // 4) * 188 :])  # cut mid-GOP
    running.unlink()
    write_with_cover(folder / "with_cover.mkv")
    write_still_image(folder / "snapshot.mp4")
    text = json.dumps(reference_label())
    for clip in list(folder.iterdir()):
        (folder / f"{clip.stem}.json").write_text(text, encoding="utf-8")
    return folder


def test_a_fleet_folder_builds_and_captions(tiny_model_dir, tmp_path):
    """HEVC (10-bit, 29.97 fps, MPEG-TS), a camera mounted upside down, Motion-JPEG AVI, a TS segment cut between
    keyframes, a cover picture before the video: each a row holding the frames caption samples from the original,
    and a record; a photo named .mp4 is set aside with its reason and fails its caption with the same."""
    folder = _fleet_folder(tmp_path / "fleet")
    clips = {"hevc_10bit", "hevc_29_97", "upside_down", "motion_jpeg", "segment", "with_cover"}
    result = build.build(BuildArguments(input=str(folder), output_dir=str(tmp_path / "out"), test_size=0, num_proc=1))
    rows = _rows(result)
    assert set(rows) == clips
    still = "a still image (JPEG data named as a video), not a video: give the camera's video file"
    assert {(p.path, p.reason) for p in result.problems} == {
        ("snapshot.mp4", still), ("snapshot.json", "its clip snapshot.mp4 was set aside")}
    assert (rows["hevc_10bit"]["codec"], rows["hevc_29_97"]["fps"], rows["segment"]["duration"]) == ("hevc", 29.97, 4.0)
    assert result.more_streams == 1
    for clip_id, row in rows.items():  # stored as is or remuxed: the same frames as the original
        original = sample_frames(next(folder.glob(f"{clip_id}.[!j]*")))
        stored = sample_frames(result.output_dir / "train" / row["file_name"])
        assert stored.indices == original.indices and (stored.frames == original.frames).all(), clip_id

    records = _caption_with_the_tiny_model(folder, tiny_model_dir, tmp_path / "captions")
    assert {c for c, r in records.items() if r["status"] == "ok"} == clips
    assert records["snapshot"]["status"] == "failed" and still in records["snapshot"]["error"]


@pytest.mark.parametrize("command", [["build"], ["caption", "--model", "model"]])
def test_a_bare_stream_given_as_the_input_says_how_to_wrap_it(tmp_path, command):
    """build and caption answer a bare stream given as --input with one line (exit 2): what it is and the command
    that wraps it, quoted for the shell (a camera's names hold spaces)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')  # a model folder to the checks
    command = [str(tmp_path / arg) if arg == "model" else arg for arg in command]
    path = write_video(tmp_path / "ch 2.h265", "hevc", "libx265", options={"x265-params": "log-level=error"})
    done = subprocess.run([sys.executable, "-m", "avlabel", *command, "--input", str(path), "--output_dir",
                           str(tmp_path / "out")], capture_output=True, text=True, check=False, cwd=REPO)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"avlabel {command[0]}: error: --input {path}: a bare HEVC stream with no container (no timestamps to "
        "sample by): wrap it, e.g. `ffmpeg -framerate <fps> -i 'ch 2.h265' -c copy 'ch 2.mp4'`"], done.stderr[-2000:]


# ----------------------------------------------------------------------------- one reader for build, caption, eval


def _layouts(source: Path, tmp_path: Path) -> dict[str, Path]:
    """The same 4 clips in the recipe layout, flat, in a manifest, and as a dataset the builder made."""
    ids = sorted(p.name.split(".")[0] for p in (source / "videos").iterdir())[:4]
    recipe, flat = tmp_path / "recipe", tmp_path / "flat"
    for clip_id in ids:
        video = next((source / "videos").glob(f"{clip_id}.*"))
        for folder, label_name in ((recipe, f"metas/{clip_id}.label.json"), (flat, f"{clip_id}.json")):
            (folder / "videos" if folder == recipe else folder).mkdir(parents=True, exist_ok=True)
            (folder / "metas").mkdir(exist_ok=True) if folder == recipe else None
            shutil.copy(video, (folder / "videos" if folder == recipe else folder) / video.name)
            shutil.copy(source / "metas" / f"{clip_id}.label.json", folder / label_name)
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text("".join(json.dumps({"video": f"recipe/videos/{next((recipe / 'videos').glob(f'{i}.*')).name}",
                                            "label": f"recipe/metas/{i}.label.json"}) + "\n" for i in ids))
    dataset = build.build(BuildArguments(input=str(recipe), output_dir=str(tmp_path / "dataset"), test_size=0,
                                         num_proc=1)).output_dir
    return {"recipe": recipe, "flat": flat, "manifest": manifest, "dataset": dataset}


def test_build_caption_and_eval_read_the_same_clips_in_every_layout(synthetic_raw_dir, tmp_path):
    layouts = _layouts(synthetic_raw_dir, tmp_path)
    expected = None
    for layout, source in layouts.items():
        assert read_inputs(source).layout == layout
        built = build.build(BuildArguments(input=str(source), output_dir=str(tmp_path / f"out_{layout}"),
                                           test_size=0, num_proc=1))
        captioned = [clip.clip_id for clip in resolve_inputs(str(source), split="train", cache_dir=tmp_path / "clips")]
        references, problems = load_references(source, split="train")
        assert not built.problems and not problems, layout
        assert set(_rows(built)) == set(captioned) == set(references), layout
        expected = expected or set(captioned)
        assert set(captioned) == expected and len(expected) == 4


def test_a_row_is_a_clip_caption_can_read_with_a_reference_eval_can_read(collection, built):
    """On the odd collection: rows = the clips caption finds that decode at a size the model takes, with a label
    eval accepts."""
    problems = []
    usable = set()
    for clip in resolve_inputs(str(collection), problems=problems):
        try:
            info = probe(clip.path)
        except VideoError:
            continue
        if aspect_problem(info.height, info.width) is None:
            usable.add(clip.clip_id)
    references, _ = load_references(collection)
    assert set(_rows(built)) == usable & set(references)
    assert {p.path for p in problems} == {"videos/duplicate_id.mp4", "videos/notes.txt", "videos/mdvr_channel1.h264",
                                         "metas/notes.md"}
    assert {"label_with_bom", "label_with_extra_keys"} <= set(references)  # eval takes what exports write, too


def test_caption_runs_over_the_odd_collection(collection, tiny_model_dir, tmp_path, capsys):
    """The tiny model captions every clip caption reads: the decodable ones succeed, the broken ones fail, each
    named on the console with its reason."""
    records = _caption_with_the_tiny_model(collection, tiny_model_dir, tmp_path / "captions")
    broken = {"zero_bytes", "truncated_mp4", "truncated_webm", "text_renamed_mp4", "audio_only", "still_image",
              "extreme_aspect_3200x14"}
    assert {c for c, r in records.items() if r["status"] == "failed"} == broken
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("failed: ")]
    assert sorted(printed) == sorted(f"failed: {records[c]['video']}: {records[c]['error']}" for c in broken)
    assert all(Path(records[c]["video"]).parent == collection / "videos" and records[c]["error"] for c in broken)
    ok = {c for c, r in records.items() if r["status"] == "ok"}
    assert ok == ROWS | {"no_label"} | {Path(p).stem for p in PARTNERS if p.startswith("videos/")}


# ----------------------------------------------------------------------------- the README's table


def _readme_reasons() -> list[str]:
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## What the builder accepts")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    cells = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]
    assert all(len(row) == 3 for row in cells)  # input | outcome | reason printed
    return [reason for row in cells for reason in re.findall(r"`([^`]+)`", row[2])]


def _pattern(reason: str) -> re.Pattern:
    """A README reason as a regex: each <placeholder> stands for any text."""
    return re.compile("".join(".+?" if part.startswith("<") else re.escape(part)
                              for part in re.split(r"(<[^>]+>)", reason)))


def test_readme_table_matches_what_the_builder_prints(collection, built, tmp_path):
    printed = [p.reason for p in built.problems]
    flat = build.build(BuildArguments(input=str(collection), output_dir=str(tmp_path / "flat"), layout="flat",
                                      test_size=0, num_proc=1))
    printed += [p.reason for p in flat.problems]
    pair = tmp_path / "pair"
    pair.mkdir()
    for name in ("videos/label_with_extra_keys.mp4", "metas/label_with_extra_keys.label.json"):
        shutil.copy(collection / name, pair)
    strict = build.build(BuildArguments(input=str(pair), output_dir=str(tmp_path / "strict"), strict=True, num_proc=1))
    printed += [p.reason for p in strict.problems]
    manifest = tmp_path / "clips.jsonl"
    good = {"video": str(collection / "videos" / "mp4_h264.mp4"), "label": str(collection / "metas" / "mp4_h264.label.json")}
    bad_lines = ('{"video": "a.mp4"\n[1]\n{"clip_id": "x"}\n{"video": "b.mp4", "clip_id": "../b"}\n'
                 '{"video": "s3://fleet-bucket/c.mp4", "label": "c.json"}\n')
    manifest.write_text(json.dumps(good) + "\n" + bad_lines, encoding="utf-8")
    listed = build.build(BuildArguments(input=str(manifest), output_dir=str(tmp_path / "manifest"), num_proc=1))
    assert listed.num_rows == 1 and len(listed.problems) == 5
    printed += [p.reason for p in listed.problems]
    linked = build.build(BuildArguments(input=str(_write_links(tmp_path)), output_dir=str(tmp_path / "linked_out"),
                                        test_size=0, num_proc=1))
    printed += [p.reason for p in linked.problems]
    (tmp_path / "empty").mkdir()
    with pytest.raises(build.BuildError) as caught:
        build.build(BuildArguments(input=str(tmp_path / "empty"), output_dir=str(tmp_path / "none")))
    printed.append(str(caught.value))

    patterns = {reason: _pattern(reason) for reason in _readme_reasons()}
    unexplained = [reason for reason in printed if not any(p.fullmatch(reason) for p in patterns.values())]
    assert not unexplained, f"reasons the README's table does not list: {unexplained}"
    unseen = [reason for reason, p in patterns.items() if not any(p.fullmatch(r) for r in printed)]
    assert not unseen, f"reasons the README lists that no test input produced: {unseen}"
