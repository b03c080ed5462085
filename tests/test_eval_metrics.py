"""Deterministic metrics against hand-computed values, and reading predictions and references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sacrebleu

from avlabel.core import schema
from avlabel.eval import data, metrics
from avlabel.eval.metrics import MISSING, field_result
from conftest import SYNTHETIC_CLIPS, SYNTHETIC_TEST_CLIPS
from eval_labels import load_label_file

REFERENCE = Path(__file__).parent / "fixtures" / "reference.label.json"  # a label in the recipe's format
SPEC = schema.FIELDS_BY_NAME


def test_category_accuracy_confusion_and_majority():
    refs = ["Clear skies", "Clear skies", "Overcast", "Light rain"]
    answers = ["Clear skies", "Overcast", "Overcast", MISSING]
    res = field_result(SPEC["weather"], refs, answers)
    m = res.metrics
    assert res.metric == "accuracy" and res.value == pytest.approx(0.5)  # 2 right of 4, missing counts wrong
    assert (m["n"], m["answered"], m["missing_rate"]) == (4, 3, 0.25)
    assert m["majority_class"] == "Clear skies" and m["majority_baseline"]["accuracy"] == 0.5
    labels, matrix = m["confusion_matrix"]["labels"], np.array(m["confusion_matrix"]["matrix"])
    assert labels[: len(SPEC["weather"].choices)] == list(SPEC["weather"].choices)
    clear, overcast = labels.index("Clear skies"), labels.index("Overcast")
    assert matrix.sum() == 3  # answered clips only
    assert matrix[clear, clear] == 1 and matrix[clear, overcast] == 1 and matrix[overcast, overcast] == 1


def test_multi_category_as_sets_with_null_as_empty():
    a, b, c = "In-lane nudging", "Yield to VRUs", "Vehicle following"
    refs = [[a, b], None, [a], [c]]
    answers = [[a], None, [b], MISSING]
    res = field_result(SPEC["interactive_expanded_metaaction"], refs, answers)
    m = res.metrics
    # per clip: 2*1/(2+1), both empty = 1, disjoint = 0, missing = 0
    assert res.value == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)
    # answered clips pooled: TP 1, FP 1 (b in clip 3), FN 2 (b in clip 1, a in clip 3)
    assert m["micro_precision"] == pytest.approx(0.5)
    assert m["micro_recall"] == pytest.approx(1 / 3)
    assert m["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    assert m["exact_match"] == pytest.approx(0.25)
    assert m["empty_set_baseline"]["f1"] == pytest.approx(0.25)


def test_difficulty_accuracy_mae_and_quadratic_kappa():
    refs = [1, 2, 3, 4, 2]
    answers = [1, 3, 3, 2, MISSING]
    m = field_result(SPEC["driving_difficulty"], refs, answers).metrics
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["mae"] == pytest.approx((0 + 1 + 0 + 2) / 4)
    # by hand over the 4 answered pairs: sum(w*O) = 5/9, sum(w*E) = 8/9, kappa = 1 - 5/8
    assert m["qwk"] == pytest.approx(0.375)
    assert m["majority_class"] == 2
    assert m["majority_baseline"] == {"accuracy": pytest.approx(0.4), "mae": pytest.approx(0.8)}


def test_boolean_balanced_accuracy_f1_mcc_and_majority_baseline():
    refs = ["True", "False", "False", "False", "True", "False"]
    answers = ["True", "False", "True", "False", "True", MISSING]
    res = field_result(SPEC["rule_violation"], refs, answers)
    m = res.metrics
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recall of "True" 2/2, of "False" 2/4 (the missing answer counts wrong)
    assert res.metric == "balanced_accuracy" and res.value == pytest.approx(0.75) == m["balanced_accuracy"]
    # answered: TP 2, FP 1, FN 0, TN 2
    assert m["f1_true"] == pytest.approx(0.8)
    assert m["mcc"] == pytest.approx((2 * 2 - 1 * 0) / np.sqrt(3 * 2 * 3 * 2))
    assert m["majority_class"] == "False"
    assert m["majority_baseline"]["accuracy"] == pytest.approx(4 / 6)
    assert m["majority_baseline"]["balanced_accuracy"] == pytest.approx(0.5)
    assert m["majority_baseline"]["f1_true"] == 0 and m["majority_baseline"]["mcc"] == 0


def test_always_false_is_exposed_by_balanced_accuracy():
    refs = ["False"] * 9 + ["True"]
    res = field_result(SPEC["rule_violation"], refs, ["False"] * 10)
    assert res.metrics["accuracy"] == pytest.approx(0.9)
    assert res.value == pytest.approx(0.5) and res.metrics["mcc"] == 0


def test_text_chrf_bleu_rouge_and_null_handling():
    refs = ["A pedestrian crossing is marked ahead.", None, None, "School zone.", "Road works ahead, one lane."]
    answers = ["A pedestrian crossing is marked ahead.", None, "Road works.", MISSING, "Road works, lane closed."]
    res = field_result(SPEC["additional_traffic_rules"], refs, answers)
    m = res.metrics
    partial = sacrebleu.sentence_chrf(answers[4], [refs[4]]).score / 100
    assert 0 < partial < 1
    # identical = 1, null vs null = 1, null vs text = 0, missing = 0
    assert res.value == pytest.approx((1 + 1 + 0 + 0 + partial) / 5)
    assert m["text_pairs"] == 2
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu([answers[0], answers[4]], [[refs[0], refs[4]]]).score)
    assert 0 < m["rougeL"] < 1
    assert m["null_agreement"] == pytest.approx(3 / 4)  # answered clips 0, 1 agree, 2 does not, 4 agrees
    assert m["null_rate_reference"] == pytest.approx(0.4)


def test_identical_text_scores_full_marks():
    text = "The ego vehicle waits at the red light, then turns left."
    m = field_result(SPEC["safety_analysis"], [text], [text]).metrics
    assert m["sentence_chrf"] == pytest.approx(1.0)
    assert m["chrf"] == pytest.approx(100) and m["bleu"] == pytest.approx(100) and m["rougeL"] == pytest.approx(1)


def test_json_valid_and_missing_rates_over_a_run():
    reference = load_label_file(REFERENCE)
    partial = {k: v for k, v in reference.items() if k != "weather"}
    predictions = [data.Prediction("a", reference, True), data.Prediction("b", partial, False), data.Prediction("c")]
    run = metrics.evaluate_predictions("r", [reference] * 3, predictions)
    assert run.json_valid_rate == pytest.approx(1 / 3)
    assert run.fields["weather"].metrics["missing_rate"] == pytest.approx(2 / 3)
    assert run.fields["lighting"].metrics["missing_rate"] == pytest.approx(1 / 3)
    assert set(run.fields) == set(schema.FIELD_NAMES)
    assert {res.metric for res in run.fields.values()} == set(metrics.PRIMARY.values())


# --------------------------------------------------------------------------- inputs


def _record(clip_id, label, **extra):
    return {"clip_id": clip_id, "video": f"{clip_id}.mp4", "model": "m", "adapter": None, "prompt_sha": "x",
            "generation": {}, "raw": json.dumps(label), "label": label, "valid": True, "errors": {},
            "prompt_tokens": 1, "completion_tokens": 1, "seconds": 0.1, "status": "ok", "error": None, **extra}


def test_captions_jsonl_reading_reports_bad_lines_and_keeps_failures(tmp_path):
    reference = load_label_file(REFERENCE)
    partial = {k: v for k, v in reference.items() if k != "weather"}
    lines = [
        json.dumps(_record("good", reference)),
        json.dumps(_record("partial", partial, valid=False, errors={"weather": ["is missing"]})),
        json.dumps(_record("failed", {}, valid=False, status="failed", error="video unreadable")),
        "{not json",
        json.dumps(_record("good", {}, valid=False, status="failed", error="retry failed")),
        json.dumps(_record("failed", reference)),
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    predictions, problems = data.load_predictions(tmp_path)
    assert set(predictions) == {"good", "partial", "failed"}
    assert predictions["good"].valid and predictions["good"].label == reference
    assert not predictions["partial"].valid and not predictions["partial"].has("weather") and predictions["partial"].has("lighting")
    assert predictions["good"].valid and predictions["failed"].valid  # a success beats a failure, either order
    reasons = [str(p) for p in problems]
    assert any("captions.jsonl:4" in r and "not a caption record" in r for r in reasons)
    assert any("captions.jsonl:5" in r and "earlier successful record is used" in r for r in reasons)
    assert any("captions.jsonl:6" in r and "later record is used" in r for r in reasons)
    (tmp_path / "captions.jsonl").write_text(lines[2] + "\n")
    failed, _ = data.load_predictions(tmp_path / "captions.jsonl")
    assert failed["failed"].label == {} and not failed["failed"].valid


def test_label_folders_join_missing_and_extra(tmp_path):
    reference = load_label_file(REFERENCE)
    (tmp_path / "refs" / "metas").mkdir(parents=True)
    for clip in ("c1", "c2", "c3"):
        (tmp_path / "refs" / "metas" / f"{clip}.label.json").write_text(json.dumps(reference))
    (tmp_path / "refs" / "metas" / "bad.label.json").write_text(json.dumps({**reference, "weather": "Sandstorm"}))
    (tmp_path / "refs" / "metas" / "deep.label.json").write_text('{"weather": ' + "[" * 5000 + "]" * 5000 + "}")
    (tmp_path / "preds").mkdir()
    (tmp_path / "preds" / "c1.label.json").write_text(json.dumps(reference))
    (tmp_path / "preds" / "c2.label.json").write_text("{ this is not json")
    (tmp_path / "preds" / "c3.label.json").write_text('{"weather": ' + "[" * 5000 + "]" * 5000 + "}")  # past Python's reader
    (tmp_path / "preds" / "zz.label.json").write_text(json.dumps(reference))
    for clip in ("c4", "c5", "c6"):
        (tmp_path / "refs" / "metas" / f"{clip}.label.json").write_text(json.dumps(reference))
    (tmp_path / "preds" / "c4.label.json").symlink_to("/mnt/not-mounted/c4.label.json")  # a disk that is not there
    (tmp_path / "preds" / "c5.label.json").write_text("")
    (tmp_path / "preds" / "c6.label.json").write_text(json.dumps([reference]))

    references, problems = data.load_references(tmp_path / "refs")
    assert sorted(references) == ["c1", "c2", "c3", "c4", "c5", "c6"]
    assert [(Path(p.path).name, p.reason.split(" (")[0]) for p in problems] == [
        ("bad.label.json", "weather unknown category 'Sandstorm'"),
        ("deep.label.json", "nests arrays or objects deeper than Python's JSON reader goes: re-export the label")]

    run = data.load_run("model", tmp_path / "preds", references)
    # a prediction file that can't be read is named and its clip scored as missing; the rest are still read
    assert run.missing == ["c4"] and run.extra == ["zz"]
    assert run.predictions["c1"].valid
    for clip in ("c2", "c3", "c5", "c6"):  # invalid JSON is an invalid answer, and the file is named
        assert not run.predictions[clip].valid and run.predictions[clip].label == {}
    named = {p.path: p.reason for p in run.problems}
    assert set(named) == {f"c{i}.label.json" for i in range(2, 7)}, named
    assert named["c4.label.json"] == "can't be read (No such file or directory)"
    assert named["c6.label.json"] == "must be a JSON object, got list"
    result = metrics.evaluate_run(run)
    assert result.json_valid_rate == pytest.approx(1 / 6)
    assert result.fields["weather"].value == pytest.approx(1 / 6)


def test_references_from_a_dataset_folder(tmp_path):
    """The builder's dataset is read through `datasets.load_dataset` with the schema's typed columns."""
    reference = load_label_file(REFERENCE)
    rows = []
    for i, weather in enumerate(["Overcast", "Light rain"]):
        row = schema.label_to_row({**reference, "weather": weather})
        rows.append({"clip_id": f"clip{i}", **row, "duration": 5.0, "fps": 30.0, "width": 64, "height": 64, "codec": "h264"})
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    references, problems = data.load_references(tmp_path, split="test")
    assert problems == []
    assert references["clip1"]["weather"] == "Light rain"
    assert references["clip0"]["rule_violation"] == "False" and references["clip0"]["interesting_scenario"] == "True"
    assert references["clip0"]["interactive_expanded_metaaction"] == reference["interactive_expanded_metaaction"]


def test_metrics_command_writes_json(tmp_path, capsys):
    reference = load_label_file(REFERENCE)
    for folder, weather in (("refs", "Light rain"), ("preds", "Overcast")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "c1.label.json").write_text(json.dumps({**reference, "weather": weather}))
    args = metrics.MetricsArguments(predictions=str(tmp_path / "preds"), references=str(tmp_path / "refs"),
                                    output_dir=str(tmp_path / "out"))
    metrics.main(args)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["fields"]["weather"]["value"] == 0 and written["fields"]["lighting"]["value"] == 1
    assert written["json_valid_rate"] == 1 and written["missing_clips"] == []
    assert "weather" in capsys.readouterr().out


def test_builder_dataset_references_match_the_raw_labels(synthetic_dataset_dir, synthetic_raw_dir):
    """The builder's dataset (videofolder, typed columns) read back as references, joined on clip id."""
    references, problems = data.load_references(synthetic_dataset_dir, split="test")
    assert problems == [] and len(references) == SYNTHETIC_TEST_CLIPS
    run = data.load_run("raw", synthetic_raw_dir, references)  # the human labels themselves as predictions
    assert run.missing == [] and len(run.extra) == SYNTHETIC_CLIPS - SYNTHETIC_TEST_CLIPS  # the train clips have no test reference
    result = metrics.evaluate_run(run)
    assert result.json_valid_rate == 1
    assert all(res.value == pytest.approx(1.0) for res in result.fields.values())


def test_no_clip_in_common_is_an_error_not_a_table_of_zeros(synthetic_dataset_dir, tmp_path):
    """Answers for the train clips scored against the test split (a wrong --split): metrics and compare stop with
    one line, exit 1, and write nothing; the right split scores them."""
    import subprocess
    import sys

    train, _ = data.load_references(synthetic_dataset_dir, split="train")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "captions.jsonl").write_text("".join(
        json.dumps({"clip_id": clip, "label": label, "valid": True, "status": "ok"}) + "\n" for clip, label in train.items()))
    line = (f"{tmp_path / 'run'}: no clip has both a prediction here ({len(train)} clips) and a reference in "
            f"{synthetic_dataset_dir}, split test ({SYNTHETIC_TEST_CLIPS} clips); check --split and that both folders "
            "hold the same clips")
    for command in (["metrics", "--predictions", str(tmp_path / "run")], ["compare", "--runs", f"run={tmp_path / 'run'}"]):
        done = subprocess.run([sys.executable, "-m", "avlabel", *command, "--references", str(synthetic_dataset_dir),
                               "--split", "test", "--output_dir", str(tmp_path / command[0])],
                              capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
        assert (done.returncode, done.stderr) == (1, f"avlabel {command[0]}: error: {line}\n")
        assert not (tmp_path / command[0]).exists()
    written = metrics.main(metrics.MetricsArguments(predictions=str(tmp_path / "run"), references=str(synthetic_dataset_dir),
                                                    split="train", output_dir=str(tmp_path / "metrics")))
    assert written["n"] == len(train) and written["fields"]["weather"]["value"] == 1
