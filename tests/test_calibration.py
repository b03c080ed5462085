"""Confidence calibration (issue 19): ECE and reliability bins (eval/calibration.py), the Platt fit, the file saved
with a model and how a record applies it (avlabel/core/calibration.py), `avlabel calibrate`, `avlabel caption`
applying a saved calibration, and the comparison report's ECE table before and after."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from avlabel.core import schema
from avlabel.core.calibration import CALIBRATION_FILE, Calibration, platt
from avlabel.core.errors import UsageError
from avlabel.core.schema import CLOSED_FIELD_NAMES
from avlabel.eval.calibration import (
    CalibrateArguments, expected_calibration_error, fit_platt, main, reliability,
)

sys.path.insert(0, str(Path(__file__).parent))
from eval_labels import random_label, write_labels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _answers(groups: list[tuple[float, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(p, right) from (p, answers, of which right) groups."""
    p = np.concatenate([np.full(n, value) for value, n, _ in groups])
    right = np.concatenate([np.arange(n) < k for _, n, k in groups])
    return p, right


def test_ece_is_zero_when_each_bin_is_right_as_often_as_it_says_and_the_gap_otherwise():
    # in each of the 10 bins, 20 answers at its centre c, exactly 20c of them right
    calibrated = _answers([(c, 20, round(20 * c)) for c in np.arange(0.05, 1, 0.1)])
    assert expected_calibration_error(*calibrated) == pytest.approx(0, abs=1e-12)
    # sure (0.9) but right 60% of the time: off by 0.3; half the answers there and half calibrated at 0.5: 0.15
    assert expected_calibration_error(*_answers([(0.9, 50, 30)])) == pytest.approx(0.3)
    assert expected_calibration_error(*_answers([(0.9, 50, 30), (0.5, 50, 25)])) == pytest.approx(0.15)
    # equal-width bins, p = 1 in the last one; only non-empty bins are listed
    rows = reliability(np.array([1.0, 0.95, 0.12]), np.array([True, False, False]))
    assert [(r["low"], r["high"], r["n"]) for r in rows] == [(0.1, 0.2, 1), (0.9, 1.0, 2)]
    assert rows[1]["accuracy"] == 0.5 and rows[1]["confidence"] == pytest.approx(0.975)


def test_platt_fit_recovers_known_parameters():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.999, 20000)
    right = rng.random(p.size) < np.array([platt(value, 0.6, -0.4) for value in p])
    a, b = fit_platt(p, right)
    assert a == pytest.approx(0.6, abs=0.05) and b == pytest.approx(-0.4, abs=0.08)


def test_platt_fit_lowers_overconfidence_and_keeps_the_order():
    # a model that says 0.999 and 0.9 where it is right 60% and 30% of the time
    p, right = _answers([(0.999, 100, 60), (0.9, 100, 30)])
    a, b = fit_platt(p, right)
    assert a > 0  # the surer answer stays the surer one
    assert platt(0.999, a, b) == pytest.approx(0.6, abs=0.03) and platt(0.9, a, b) == pytest.approx(0.3, abs=0.03)
    after = np.array([platt(value, a, b) for value in p])
    assert expected_calibration_error(p, right) > 0.45 and expected_calibration_error(after, right) < 0.03
    # always right is not fitted to certainty: Platt's smoothed target (N+ + 1) / (N+ + 2)
    a, b = fit_platt(np.full(30, 0.999), np.ones(30, dtype=bool))
    assert platt(0.999, a, b) == pytest.approx(31 / 32, abs=1e-3)


def test_calibration_file_and_what_a_record_holds(tmp_path):
    Calibration({"weather": {"a": 0.5, "b": -1.0}, "rule_violation": {"a": 1.0, "b": 0.0}}).save(tmp_path)
    loaded = Calibration.for_model(None, tmp_path)
    assert loaded.fields["weather"] == {"a": 0.5, "b": -1.0}
    record = loaded.calibrate({"confidence": {"weather": 0.9, "lighting": 0.3, "rule_violation": 0.7},
                               "text_mean_logprob": {"road_type": -0.2}, "clip_confidence": 0.3})
    assert record["confidence_raw"] == {"weather": 0.9, "lighting": 0.3, "rule_violation": 0.7}
    assert record["confidence"]["weather"] == pytest.approx(platt(0.9, 0.5, -1.0), rel=1e-5)
    assert record["confidence"]["weather"] < 0.9
    assert record["confidence"]["lighting"] == 0.3  # no fit for it: unchanged
    assert record["confidence"]["rule_violation"] == pytest.approx(0.7)  # a = 1, b = 0 is the identity
    assert record["clip_confidence"] == min(record["confidence"].values()) and record["text_mean_logprob"] == {"road_type": -0.2}
    assert loaded.record_entry() == {"method": "platt", "fields": {"weather": [0.5, -1.0], "rule_violation": [1.0, 0.0]}}

    empty = tmp_path / "no_calibration"
    empty.mkdir()
    assert Calibration.for_model(empty) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CALIBRATION_FILE).write_text(json.dumps({"fields": {"road_type": {"a": 1, "b": 0}}}))
    with pytest.raises(ValueError, match=f"bad/{CALIBRATION_FILE}: not a valid calibration .*not a closed-set field"):
        Calibration.for_model(bad)


def _records(labels: dict[str, dict], references: dict[str, dict], p: float) -> str:
    return "".join(json.dumps({"clip_id": clip, "label": label, "valid": True, "status": "ok",
                               "confidence": dict.fromkeys(CLOSED_FIELD_NAMES, p), "clip_confidence": p}) + "\n"
                   for clip, label in labels.items())


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """40 reference labels, and answers whose weather is right on the first 20 clips only (the rest are right)."""
    root = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(0)
    references = {f"clip{i:03d}": random_label(rng) for i in range(40)}
    write_labels(root / "refs" / "metas", references)
    answers = {}
    for i, (clip, label) in enumerate(references.items()):
        wrong = next(c for c in schema.FIELDS_BY_NAME["weather"].choices if c != label["weather"])
        answers[clip] = {**label, "weather": label["weather"] if i < 20 else wrong}
    return root, references, answers


def test_calibrate_command_writes_the_fit_into_the_model_folder(labeled, tmp_path, capsys):
    root, references, answers = labeled
    (tmp_path / "held_out").mkdir()
    (tmp_path / "held_out" / "captions.jsonl").write_text(_records(answers, references, 0.99))
    model = tmp_path / "model"
    model.mkdir()
    args = CalibrateArguments(captions=str(tmp_path / "held_out"), labels=str(root / "refs"), model=str(model))
    main(args)
    saved = json.loads((model / CALIBRATION_FILE).read_text())
    weather, lighting = saved["fields"]["weather"], saved["fields"]["lighting"]
    assert weather["clips"] == 40 and weather["accuracy"] == 0.5
    assert platt(0.99, weather["a"], weather["b"]) == pytest.approx(0.5, abs=0.02)  # sure, right half the time
    assert platt(0.99, lighting["a"], lighting["b"]) > 0.97  # sure and always right
    assert weather["ece_before"] == pytest.approx(0.49) and weather["ece_after"] < 0.02
    assert saved["fitted_on"] == {"captions": "held_out", "labels": "refs", "split": None, "clips": 40}  # label files
    assert "Platt calibration per field" in capsys.readouterr().out

    (tmp_path / "nowhere").mkdir()
    for bad, message in (({"model": str(tmp_path / "not_here")}, "--model .*not_here: not a local folder"),
                         ({"model": None}, "--model: give the model folder"),
                         ({"captions": str(tmp_path / "nowhere")}, "no captions.jsonl, and no label files")):
        with pytest.raises((UsageError, FileNotFoundError), match=message):
            main(CalibrateArguments(**{**vars(args), **bad}))


def test_calibrate_reads_the_only_split_of_a_built_dataset_and_asks_among_several(synthetic_raw_dir, synthetic_dataset_dir,
                                                                                 tmp_path):
    """A held-out dataset built with --test_size 0 has one split, read without --split (the README's command);
    among several, or a split the dataset lacks, --split is a command-line mistake (exit 2), worded as caption's."""
    import subprocess

    from avlabel.data_builder.build import BuildArguments, build
    from avlabel.eval.data import load_references

    held_out = tmp_path / "held_out"
    assert not build(BuildArguments(input=str(synthetic_raw_dir), output_dir=str(held_out), test_size=0)).problems
    references, _ = load_references(held_out, "train")
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "captions.jsonl").write_text(_records(references, references, 0.9))
    model = tmp_path / "model"
    model.mkdir()
    main(CalibrateArguments(captions=str(tmp_path / "captions"), labels=str(held_out), model=str(model)))
    fitted_on = json.loads((model / CALIBRATION_FILE).read_text())["fitted_on"]
    assert fitted_on["split"] == "train" and fitted_on["clips"] == len(references) == 24

    several = f"--labels {synthetic_dataset_dir} has the split"
    for split, line in (((), f"--split: {several}s test, train; name the one to read with --split"),
                        (("--split", "validation"), f"--split validation: {several}(s) test, train")):
        done = subprocess.run([sys.executable, "-m", "avlabel", "calibrate", "--captions", str(tmp_path / "captions"),
                               "--labels", str(synthetic_dataset_dir), "--model", str(model), *split],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert (done.returncode, done.stderr) == (2, f"avlabel calibrate: error: {line}\n")
    done = subprocess.run([sys.executable, "-m", "avlabel", "caption", "--input", str(held_out), "--split", "validation"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert (done.returncode, done.stderr) == (
        2, f"avlabel caption: error: --split validation: --input {held_out} has the split(s) train\n")


def test_answers_none_of_them_valid_are_named_as_the_reason_no_record_gives_a_confidence(labeled, tmp_path):
    """Captions of every clip, none schema-valid (a model not answering in the label format): that is the cause,
    not clips left uncaptioned."""
    root, references, _ = labeled
    (tmp_path / "held_out").mkdir()
    (tmp_path / "held_out" / "captions.jsonl").write_text("".join(
        json.dumps({"clip_id": clip, "raw": "no label here", "label": {}, "valid": False, "status": "ok",
                    "errors": {"<label>": ["no JSON object in the output"]}, "confidence": {}, "confidence_raw": {}}) + "\n"
        for clip in references))
    (tmp_path / "model").mkdir()
    args = CalibrateArguments(captions=str(tmp_path / "held_out"), labels=str(root / "refs"), model=str(tmp_path / "model"))
    with pytest.raises(UsageError) as caught:
        main(args)
    assert str(caught.value) == (
        f"--captions {tmp_path / 'held_out'}: none of the 40 answers for clips of {root / 'refs'} is schema-valid, so "
        "no record gives a confidence to fit; calibrate a model that answers in the label format (see the records' "
        "`errors`)")
    write_labels(tmp_path / "labels_only", references)  # valid answers, but label files carry no confidence
    with pytest.raises(UsageError, match="no record gives a confidence for any clip of .*refs; caption those clips"):
        main(CalibrateArguments(**{**vars(args), "captions": str(tmp_path / "labels_only")}))


# `avlabel calibrate` in a fresh interpreter that lists every opening of a caption record file (an audit hook)
_COUNTING_ENTRY = """\
import json, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0]))
                 if event == "open" and str(args[0]).endswith(".jsonl") else None)
from avlabel.cli import main
main(sys.argv[1:])
print("opened:", json.dumps(opened))
"""


def test_calibrate_reads_the_records_once(labeled, tmp_path):
    """Without --model the folder comes from the model the records name; the records are read once, for both."""
    import os
    import subprocess

    root, references, answers = labeled
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "held_out").mkdir()
    records = [{**json.loads(line), "model": str(model)} for line in _records(answers, references, 0.99).splitlines()]
    (tmp_path / "held_out" / "captions.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    done = subprocess.run([sys.executable, "-c", _COUNTING_ENTRY, "calibrate", "--captions", str(tmp_path / "held_out"),
                           "--labels", str(root / "refs")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((model / CALIBRATION_FILE).read_text())["fields"]["weather"]["clips"] == 40
    opened = json.loads(done.stdout.rsplit("opened: ", 1)[1])
    assert opened == [str(tmp_path / "held_out" / "captions.jsonl")]


def test_captions_of_a_hub_model_need_its_local_folder(labeled, tmp_path):
    """Without --model, captions made by a Hub id name where the id came from, not a --model never given."""
    root, references, answers = labeled
    (tmp_path / "held_out").mkdir()
    records = [{**json.loads(line), "model": "nvidia/Cosmos-Reason1-7B"}
               for line in _records(answers, references, 0.9).splitlines()]
    (tmp_path / "held_out" / "captions.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(UsageError) as caught:
        main(CalibrateArguments(captions=str(tmp_path / "held_out"), labels=str(root / "refs")))
    assert str(caught.value) == (
        "the model the captions name, nvidia/Cosmos-Reason1-7B (no --model given): not a local folder; "
        f"{CALIBRATION_FILE} is written into the model's folder (download a Hub model first, and give its local "
        "copy with --model)")


def test_comparison_report_shows_ece_before_and_after_calibration(labeled, tmp_path):
    from avlabel.eval.compare import compare_runs

    root, references, answers = labeled
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "captions.jsonl").write_text(_records(answers, references, 0.99))
    calibration = Calibration({name: {"a": 1.0, "b": -4.0 if name == "weather" else 0.0} for name in CLOSED_FIELD_NAMES})
    # as `avlabel caption` writes them with that calibration: calibrated values, the raw kept beside them
    calibrated = [{**record, "calibration": calibration.record_entry(),
                   **calibration.calibrate({"confidence": record["confidence"], "text_mean_logprob": {}, "clip_confidence": None})}
                  for record in map(json.loads, (tmp_path / "raw" / "captions.jsonl").read_text().splitlines())]
    (tmp_path / "calibrated").mkdir()
    (tmp_path / "calibrated" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in calibrated))
    write_labels(tmp_path / "labels_only", answers)  # a run without confidence: no calibration entry

    out = tmp_path / "report"
    results = compare_runs({"labels": tmp_path / "labels_only", "raw": tmp_path / "raw", "calibrated": tmp_path / "calibrated"},
                           root / "refs", out, bootstrap_samples=50)
    section = results["calibration"]
    assert section["bins"] == 10 and section["binning"] == "equal-width" and set(section["runs"]) == {"raw", "calibrated"}
    raw, after = section["runs"]["raw"], section["runs"]["calibrated"]
    assert not raw["calibrated"] and set(raw["mean_ece"]) == {"raw"}
    assert raw["fields"]["weather"]["raw"]["ece"] == pytest.approx(0.49)
    assert raw["fields"]["lighting"]["raw"]["ece"] == pytest.approx(0.01)
    assert after["calibrated"] and after["fields"]["weather"]["raw"] == raw["fields"]["weather"]["raw"]
    assert after["fields"]["weather"]["calibrated"]["ece"] == pytest.approx(abs(0.5 - platt(0.99, 1.0, -4.0)), abs=1e-5)
    assert after["mean_ece"]["calibrated"] < after["mean_ece"]["raw"]

    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "Calibration of closed-set confidence (ECE over 10 equal-width bins" in markdown
    assert "| weather | 0.500 (n=40) | 0.990 / 0.490 | 0.500 (n=40) | 0.990 / 0.490 | " in markdown
    assert f"| mean ECE |  | {raw['mean_ece']['raw']:.3f} |" in markdown
    html = (out / "report.html").read_text()
    assert "Calibration of closed-set confidence" in html and "equal-width bins of p" in html
    assert html.count("<img") == 2  # deterministic.png and reliability.png


def test_caption_applies_the_calibration_saved_with_the_model(tiny_model_dir, synthetic_dataset_dir, tmp_path):
    """The tiny model constrained (so its closed-set answers are there), with and without a calibration.json."""
    from avlabel.infer.caption import main as caption
    from avlabel.infer.caption import make_parser

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)

    def run(out: Path) -> list[dict]:
        argv = ["--config", str(REPO / "recipes" / "infer" / "tiny.yaml"), "--model", str(model), "--output_dir", str(out),
                "--input", str(synthetic_dataset_dir), "--limit", "2", "--constrained", "true", "--num_workers", "0",
                "--max_new_tokens", "150"]  # room for the first fields, weather and lighting, and a short run
        caption(*make_parser().parse_args_and_config(args=argv))
        return [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]

    plain = run(tmp_path / "plain")
    assert all(r["calibration"] is None and r["confidence_raw"] == r["confidence"] and r["confidence"] for r in plain)
    calibration = Calibration({"weather": {"a": 0.5, "b": -2.0}, "lighting": {"a": 2.0, "b": 1.0}})
    calibration.save(model)
    calibrated = run(tmp_path / "calibrated")
    for before, after in zip(plain, calibrated):
        assert after["calibration"] == calibration.record_entry()
        assert after["confidence_raw"] == before["confidence"] and after["label"] == before["label"]
        for name, p in before["confidence"].items():
            assert after["confidence"][name] == pytest.approx(calibration.apply(name, p))
        assert "weather" in before["confidence"] and after["confidence"]["weather"] != before["confidence"]["weather"]
        assert after["clip_confidence"] == min(after["confidence"].values())
    with pytest.raises(UsageError, match="different calibration"):  # a folder holds one calibration's records
        run(tmp_path / "plain")
