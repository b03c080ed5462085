"""`avlabel review`: the queue (confidence, disagreement, catalog), its budget and expected errors, the
Label Studio files it writes, and the import of annotations back into the recipe layout and the dataset card.

The Label Studio server itself is exercised in tests/test_labelstudio.py; here the exported files are
checked with the SDK's own parser of labeling configurations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from avlabel.core import schema
from avlabel.core.layouts import CAMERA_SUFFIX
from avlabel.demo import synthetic
from avlabel.eval.review import ReviewArguments, choose, differing_fields, main
from avlabel.hub.labelstudio import (
    import_annotations, label_to_results, labeling_config, queue_to_tasks, results_to_label,
)
from eval_labels import load_label_file

CLOSED = list(schema.CLOSED_FIELD_NAMES)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Eight small synthetic clips with their human labels, in the recipe layout: (root, {id: label})."""
    root = tmp_path_factory.mktemp("review_raw")
    ids = synthetic.generate(root, 8, seed=3, width=64, height=36, seconds=1.0, fps=4, workers=1, progress=False)
    return root, {i: load_label_file(root / "metas" / f"{i}.label.json") for i in ids}


def _wrong(spec: schema.LabelField, value):
    """Another valid answer for a closed field."""
    if spec.kind == "multi_category":
        return [c for c in spec.choices if c not in (value or [])][:1]
    other = next(c for c in spec.choices if c != str(value))
    return int(other) if spec.kind == "difficulty" else other


def _write_run(folder: Path, root: Path, labels: dict, confidence: dict[str, float] | None, wrong: dict[str, int]):
    """A caption run: each clip's human label with its first `wrong[id]` closed fields changed, and every closed
    field's confidence `confidence[id]` (none when None)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for clip_id, label in labels.items():
        answer = dict(label)
        for name in CLOSED[: wrong.get(clip_id, 0)]:
            answer[name] = _wrong(schema.FIELDS_BY_NAME[name], label[name])
        record = {"clip_id": clip_id, "video": str(root / "videos" / f"{clip_id}{CAMERA_SUFFIX}.mp4"),
                  "label": json.loads(schema.label_to_json(answer)), "valid": True, "status": "ok"}
        if confidence is not None:
            record["confidence"] = dict.fromkeys(CLOSED, confidence[clip_id])
            record["clip_confidence"] = confidence[clip_id]
        lines.append(json.dumps(record) + "\n")
    (folder / "captions.jsonl").write_text("".join(lines))
    return folder


def test_confidence_order_budget_and_expected_wrong(clips, tmp_path, capsys):
    root, labels = clips
    ids = sorted(labels)
    confidence = {clip_id: 0.5 + 0.05 * n for n, clip_id in enumerate(ids)}  # ids[0] least sure
    run = _write_run(tmp_path / "run", root, labels, confidence, {})
    queue = main(ReviewArguments(captions=str(run), budget="25%"))
    assert queue.order == "confidence" and queue.candidates == 8
    assert [c.clip_id for c in queue.chosen] == ids[:2]  # ceil(8 * 25%) = 2, lowest confidence first
    expected = sum(len(CLOSED) * (1 - confidence[c]) for c in ids[:2])
    assert math.isclose(queue.expected_wrong, expected)
    out = capsys.readouterr().out
    assert f"Expected wrong fields in the queue: {expected:.1f}" in out
    lines = [json.loads(line) for line in (run / "review" / "queue.jsonl").read_text().splitlines()]
    assert [line["clip_id"] for line in lines] == ids[:2] and lines[0]["rank"] == 1
    assert lines[0]["confidence"]["weather"] == confidence[ids[0]]

    count = choose(ReviewArguments(captions=str(run), budget="3"))
    assert [c.clip_id for c in count.chosen] == ids[:3]
    # a count past the candidates queues them all, and says so; the default budget (50) is not the user's ask
    for budget, said in (("20", True), (None, False)):
        capsys.readouterr()
        assert len(main(ReviewArguments(captions=str(run), budget=budget)).chosen) == 8
        assert ("--budget 20 is more than the 8 candidate(s): all are queued" in capsys.readouterr().out) is said


def test_a_failed_or_unanswered_record_counts_its_fields_as_wrong(clips, tmp_path):
    root, labels = clips
    ids = sorted(labels)
    run = _write_run(tmp_path / "run", root, labels, dict.fromkeys(ids, 0.9), {})
    records = [json.loads(line) for line in (run / "captions.jsonl").read_text().splitlines()]
    records[3] = {"clip_id": records[3]["clip_id"], "status": "failed", "error": "out of memory", "label": {}}
    del records[5]["label"]["weather"]
    records[5]["errors"] = {"weather": ["is missing"]}
    records[6]["cut_fields"] = {"road_type": "token budget"}  # constrained decoding closed it: not the model's answer
    (run / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    queue = choose(ReviewArguments(captions=str(run), budget="3"))
    assert [c.clip_id for c in queue.chosen] == [records[3]["clip_id"], records[6]["clip_id"], records[5]["clip_id"]]
    assert queue.chosen[0].expected_wrong == len(schema.FIELDS)
    assert math.isclose(queue.chosen[1].expected_wrong, 1 + len(CLOSED) * 0.1)
    assert math.isclose(queue.chosen[2].expected_wrong, 1 + (len(CLOSED) - 1) * 0.1)


def test_disagreement_order_counts_differing_closed_fields(clips, tmp_path):
    root, labels = clips
    ids = sorted(labels)
    base = _write_run(tmp_path / "base", root, labels, None, {})
    tuned = _write_run(tmp_path / "tuned", root, labels, None, {ids[6]: 4, ids[2]: 1, ids[4]: 2})
    queue = choose(ReviewArguments(captions=str(tuned), other=str(base), budget="3"))
    assert queue.order == "disagreement"
    assert [c.clip_id for c in queue.chosen] == [ids[6], ids[4], ids[2]]
    assert queue.chosen[0].differing == CLOSED[:4]
    assert queue.expected_wrong is None  # no confidence in these records


def test_catalog_query_chooses_the_clips(clips, tmp_path):
    root, labels = clips
    run = _write_run(tmp_path / "run", root, labels, None, {})
    weather = labels[sorted(labels)[0]]["weather"]
    queue = choose(ReviewArguments(captions=str(run), where=[f"weather={weather}"], budget="100%"))
    assert queue.order == "catalog"
    assert {c.clip_id for c in queue.chosen} == {i for i, label in labels.items() if label["weather"] == weather}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--budget", "five"], 2, "--budget 'five': expected a clip count (50) or a share of the clips (5%)"),
        (["--budget", "0%"], 2, "--budget '0%'"),
        ([], 1, "the records carry no `confidence`; give --other <run>"),
        (["--where", "weather=Sunny spells"], 2, "--where: "),
        (["--captions", "no/such/run"], 2, "--captions no/such/run: no such file or folder"),
        (["--captions", "."], 1, ": no captions.jsonl (expected an `avlabel caption` output folder"),
    ],
)
def test_bad_input_is_one_line(clips, tmp_path, capsys, args, code, message):
    """A wrong argument exits 2, a run that can't be ordered 1; either way one line naming it."""
    from avlabel.cli import main as avlabel

    root, labels = clips
    run = _write_run(tmp_path / "run", root, labels, None, {})
    if "--budget" in args:  # confidence present, so only the budget is wrong
        run = _write_run(tmp_path / "run", root, labels, dict.fromkeys(labels, 0.5), {})
    with pytest.raises(SystemExit) as err:
        avlabel(["review", "--captions", str(run), "--output_dir", str(tmp_path / "q"), *args])
    lines = capsys.readouterr().err.splitlines()
    assert err.value.code == code and len(lines) == 1 and lines[0].startswith("avlabel review: error: "), lines
    assert message in lines[0], lines


def test_labeling_config_and_tasks_are_valid_for_label_studio(clips):
    # absent from scripts/check_floors.sh's venv: label-studio-sdk 2 needs a newer Pillow than the package's floor
    sdk = pytest.importorskip("label_studio_sdk.label_interface", reason="pip install 'avlabel[labelstudio]'")
    LabelInterface = sdk.LabelInterface

    root, labels = clips
    interface = LabelInterface(labeling_config())
    controls = {control.name: control for control in interface.controls}
    assert list(controls) == list(schema.FIELD_NAMES)
    for spec in schema.FIELDS:
        assert controls[spec.name].tag == ("TextArea" if spec.kind == "text" else "Choices")
        if spec.closed:
            assert list(controls[spec.name].labels) == list(spec.choices)
    assert controls["interactive_expanded_metaaction"].attr["choice"] == "multiple"

    clip_id, label = next(iter(labels.items()))
    entry = {"clip_id": clip_id, "video": str(root / "videos" / f"{clip_id}{CAMERA_SUFFIX}.mp4"), "label": label,
             "confidence": {"weather": 0.25}, "clip_confidence": 0.4}
    (task,) = queue_to_tasks([entry], media_root=str(root))
    assert task["data"]["video"] == f"/data/local-files/?d=videos/{clip_id}{CAMERA_SUFFIX}.mp4"
    prediction = task["predictions"][0]
    assert prediction["score"] == 0.4
    assert next(r for r in prediction["result"] if r["from_name"] == "weather")["score"] == 0.25
    assert interface.validate_prediction({"result": prediction["result"]})
    assert schema.normalize_label(results_to_label(prediction["result"])) == label  # the answer survives the trip


def test_import_writes_reviewed_labels_and_the_build_counts_them(clips, tmp_path):
    from avlabel.data_builder.build import BuildArguments, build

    root, labels = clips
    ids = sorted(labels)
    corrected = dict(labels[ids[0]], weather=_wrong(schema.FIELDS_BY_NAME["weather"], labels[ids[0]]["weather"]))
    video = str(root / "videos" / f"{ids[0]}{CAMERA_SUFFIX}.mp4")
    export = [
        {"id": 1, "data": {"clip_id": ids[0], "path": video, "model_label": labels[ids[0]]}, "predictions": [7],
         "annotations": [{"id": 10, "completed_by": 1, "updated_at": "2025-01-01T00:00:00Z",
                          "result": label_to_results(labels[ids[0]])},
                         {"id": 11, "completed_by": 2, "updated_at": "2025-01-02T00:00:00Z",
                          "result": label_to_results(corrected)},
                         {"id": 12, "was_cancelled": True, "updated_at": "2025-01-03T00:00:00Z", "result": []}]},
        {"id": 2, "data": {"clip_id": ids[1], "path": video}, "annotations": []},
        {"id": 3, "data": {"clip_id": ids[2], "path": video},
         "annotations": [{"id": 30, "result": [r for r in label_to_results(labels[ids[2]]) if r["from_name"] != "lighting"]}]},
    ]
    out = tmp_path / "reviewed"
    result = import_annotations(export, out)
    assert [p.name for p in result.written] == [f"{ids[0]}.label.json"] and result.corrected_fields == 1
    reasons = {p.path: p.reason for p in result.problems}
    assert reasons["export: task 2 (clip %s)" % ids[1]] == "has no submitted annotation yet"
    assert "lighting is null but the field is required" in reasons["export: task 3 (clip %s)" % ids[2]]
    written = json.loads(result.written[0].read_text())
    assert schema.normalize_label({k: v for k, v in written.items() if k != "review"}) == corrected
    assert written["review"] == {"tool": "label-studio", "task": 1, "annotation": 11, "annotator": 2,
                                 "corrected": ["weather"]}
    assert (out / "videos" / f"{ids[0]}{CAMERA_SUFFIX}.mp4").read_bytes() == Path(video).read_bytes()

    dataset = tmp_path / "dataset"
    build(BuildArguments(input=str(out), output_dir=str(dataset), test_size=0, num_proc=1))
    card = (dataset / "README.md").read_text()
    assert "1 label(s) came from review" in card and "corrected 1 field(s)" in card


def test_import_keeps_each_clips_latest_answer_and_reports_the_rest(clips, tmp_path):
    """The clip's tasks imported twice into one project: the latest annotation over both is the label, the older
    one is reported; a skipped task says so; a clip id that is a path writes nothing anywhere."""
    root, labels = clips
    clip_id = sorted(labels)[0]
    label = labels[clip_id]
    weather = schema.FIELDS_BY_NAME["weather"]
    first = dict(label, weather=_wrong(weather, label["weather"]))
    second = dict(label, weather=next(c for c in weather.choices if c not in (label["weather"], first["weather"])))
    data = {"clip_id": clip_id, "path": str(root / "videos" / f"{clip_id}{CAMERA_SUFFIX}.mp4"), "model_label": label}
    export = [
        {"id": 6, "data": data, "annotations": [{"id": 60, "updated_at": "2025-01-02T00:00:00Z",
                                                 "result": label_to_results(second)}]},
        {"id": 10, "data": data, "annotations": [{"id": 100, "updated_at": "2025-01-01T00:00:00Z",
                                                  "result": label_to_results(first)}]},
        {"id": 11, "data": {**data, "clip_id": "../../escaped"}, "annotations": [{"id": 110, "result": label_to_results(label)}]},
        {"id": 12, "data": {**data, "clip_id": "skipped"}, "annotations": [{"id": 120, "was_cancelled": True, "result": []}]},
    ]
    out = tmp_path / "deep" / "reviewed"
    result = import_annotations(export, out)
    (written,) = result.written
    assert schema.normalize_label({k: v for k, v in json.loads(written.read_text()).items() if k != "review"}) == second
    assert result.corrected_fields == 1  # one label, one field
    reasons = {p.path: (p.stage, p.reason) for p in result.problems}
    assert reasons[f"export: task 10 (clip {clip_id})"] == (
        "superseded", "annotation 100 is older than annotation 60 of task 6 for the same clip; the latest is imported")
    assert reasons["export: task 11 (clip ../../escaped)"][1].startswith("clip id '../../escaped' can't be used as a file name")
    assert reasons["export: task 12 (clip skipped)"][1].startswith("was skipped by every reviewer")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")) == [
        f"deep/reviewed/metas/{clip_id}.label.json"]


@pytest.mark.parametrize(("content", "message"), [
    ('[{"id": 5, "clip_id": "a", "weather": "Clear skies", "annotator": 1}]', "a JSON-MIN export"),
    ("[1, 2]", "not a Label Studio JSON export (expected a list of task objects)"),
    (None, "can't be read (No such file or directory); give the path of the project's JSON export"),
])
def test_an_export_of_another_shape_is_named(tmp_path, content, message):
    export = tmp_path / "export.json"
    if content is not None:
        export.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        import_annotations(export, tmp_path / "reviewed")
    assert str(err.value).startswith(f"{export}: ") and message in str(err.value)
    assert not (tmp_path / "reviewed").exists()


def test_a_clip_outside_the_media_root_is_refused(clips, tmp_path):
    root, labels = clips
    clip_id = sorted(labels)[0]
    entry = {"clip_id": clip_id, "video": str(root / "videos" / f"{clip_id}{CAMERA_SUFFIX}.mp4"), "label": labels[clip_id]}
    with pytest.raises(ValueError, match=r"is not under --media_root .*: give the folder that holds every clip"):
        queue_to_tasks([entry], media_root=str(tmp_path))


def test_a_run_without_answers_is_reviewed_and_an_empty_run_is_named(clips, tmp_path):
    """Records whose text held no label (no closed field, so no confidence) are the most urgent: every field
    unanswered; a run with no records says so."""
    root, labels = clips
    run = _write_run(tmp_path / "run", root, labels, dict.fromkeys(labels, 0.9), {})
    records = [json.loads(line) for line in (run / "captions.jsonl").read_text().splitlines()]
    records[2].update(label={}, valid=False, confidence={}, clip_confidence=None)
    (run / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    queue = choose(ReviewArguments(captions=str(run), budget="1"))
    assert [c.clip_id for c in queue.chosen] == [records[2]["clip_id"]]
    assert queue.expected_wrong == len(schema.FIELDS)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "captions.jsonl").write_text("")
    with pytest.raises(ValueError, match="no caption records to review; caption the clips first"):
        choose(ReviewArguments(captions=str(tmp_path / "empty"), budget="1"))


@pytest.mark.parametrize(("content", "reason"), [
    (b'[{"id": 1, "data": {"clip_id": "a"}, "annotations": [', "Expecting value at line 1 column 54"),  # cut short
    (b"id,clip_id,weather\n1,a,Clear skies\n", "Expecting value at line 1 column 1"),  # the CSV export
    ("[]".encode("utf-16"), "not UTF-8"),
])
def test_an_export_that_is_no_json_export_is_named(tmp_path, content, reason):
    export = tmp_path / "export.json"
    export.write_bytes(content)
    with pytest.raises(ValueError) as err:
        import_annotations(export, tmp_path / "reviewed")
    assert str(err.value) == f"{export}: not a Label Studio JSON export ({reason}); export the project as JSON"


def test_an_export_saved_with_a_byte_order_mark_is_read(clips, tmp_path):
    root, labels = clips
    clip_id = sorted(labels)[0]
    task = {"id": 1, "data": {"clip_id": clip_id, "path": str(root / "videos" / f"{clip_id}{CAMERA_SUFFIX}.mp4")},
            "annotations": [{"id": 10, "result": label_to_results(labels[clip_id])}]}
    export = tmp_path / "export.json"
    export.write_text("\ufeff" + json.dumps([task]), encoding="utf-8")
    result = import_annotations(export, tmp_path / "reviewed")
    assert [p.name for p in result.written] == [f"{clip_id}.label.json"] and not result.problems


def test_differing_fields_normalises_before_comparing():
    label = {"weather": "clear skies", "interactive_expanded_metaaction": ["Yield to VRUs", "Vehicle following"],
             "safety_analysis": "A calm  drive."}
    other = {"weather": "Clear skies", "interactive_expanded_metaaction": ["Vehicle following", "Yield to VRUs"],
             "safety_analysis": "a calm drive."}
    assert differing_fields(label, other) == [f for f in schema.FIELD_NAMES if f not in label]  # only the absent


def test_the_avlabel_command_runs_it(clips, tmp_path, capsys):
    from avlabel.cli import main as avlabel

    root, labels = clips
    run = _write_run(tmp_path / "run", root, labels, dict.fromkeys(labels, 0.75), {})
    with pytest.raises(SystemExit) as err:
        avlabel(["review", "--help"])
    assert err.value.code == 0 and "--budget" in capsys.readouterr().out
    queue = avlabel(["review", "--captions", str(run), "--budget", "5%", "--output_dir", str(tmp_path / "q")])
    assert len(queue.chosen) == 1 and (tmp_path / "q" / "labelstudio" / "tasks.json").is_file()


def test_label_studio_problems_are_one_line_and_keep_the_queue(clips, tmp_path, capsys, monkeypatch):
    import socket

    pytest.importorskip("label_studio_sdk", reason="pip install 'avlabel[labelstudio]'")  # as above

    from avlabel.cli import main as avlabel

    root, labels = clips
    run = _write_run(tmp_path / "run", root, labels, dict.fromkeys(labels, 0.75), {})
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{sock.getsockname()[1]}"
    out = tmp_path / "q"
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    asked = ["review", "--captions", str(run), "--output_dir", str(out), "--label_studio", nowhere]
    cases = [
        (asked, "set LABEL_STUDIO_API_KEY to your access token"),
        (["review", "--label_studio", nowhere, "--project", "3"], "--project needs --labels_dir"),
        (["review", "--project", "3", "--labels_dir", str(tmp_path / "l")], "--project 3 needs --label_studio"),
        (["review", "--project", "3", "--annotations", "x.json", "--labels_dir", str(tmp_path / "l")], "give one"),
        # queue choices given to an import would do nothing: named, not ignored
        (["review", "--annotations", "x.json", "--labels_dir", str(tmp_path / "l"), "--captions", str(run), "--budget", "5"],
         "--captions, --budget with --annotations: these choose a queue"),
        (["review", "--label_studio", nowhere, "--project", "3", "--labels_dir", str(tmp_path / "l"), "--where", "difficulty>=3"],
         "--where with --project: these choose a queue"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as err:
            avlabel(argv)
        message = capsys.readouterr().err.strip() or str(err.value.code)
        assert expected in message and len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert (out / "labelstudio" / "tasks.json").is_file()  # the queue is written before the server is asked
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "a-token")
    for argv in (asked, ["review", "--label_studio", nowhere, "--project", "3", "--labels_dir", str(tmp_path / "l")]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as err:
            avlabel(argv)
        message = capsys.readouterr().err.strip()
        assert err.value.code == 1 and f"--label_studio {nowhere}: can't reach the server" in message, message
        assert len(message.splitlines()) == 1
