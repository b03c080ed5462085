"""Is a run's confidence right as often as it says? Measure it (ECE, reliability) and fit a calibration.

A caption record gives, per closed-set field, the probability p of the answer it chose (infer/confidence.py).
Against human labels each answer is right or wrong, so per field:

* ECE, the expected calibration error over equal-width bins of p: the mean over answers of
  |accuracy of the bin - mean p of the bin| (0 when each bin is right as often as it claims);
* the reliability diagram: accuracy against mean p, bin by bin;
* a Platt fit, p' = sigmoid(a * logit(p) + b) (avlabel/core/calibration.py saves and applies it).

Why Platt on logit(p): a record keeps only the chosen answer's probability, not the distribution over
the answers, so a softmax temperature can't be refitted; a temperature on that logit alone
(sigmoid(logit(p) / T)) keeps every p above 0.5 above 0.5, while a small model is often sure of a field
it gets right less than half the time. The intercept b brings it down; the slope a (kept >= 0, so the
order of answers never flips) spreads or squeezes the rest.

Fit on held-out labeled clips, never on the test split the report reads (HELD_OUT: a folder of clips and labels,
or a dataset of one split, `train` when `avlabel build --test_size 0` made it):

    avlabel caption --model MODEL --input HELD_OUT --split train --output_dir captions/held_out
    avlabel calibrate --captions captions/held_out --labels HELD_OUT --model MODEL

writes MODEL/calibration.json; `avlabel caption` then applies it, and `avlabel compare` shows the test
split's ECE before (the records' `confidence_raw`) and after (`confidence`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from avlabel.core import schema
from avlabel.core.calibration import CALIBRATION_FILE, Calibration, logit, platt
from avlabel.core.charts import png_bytes
from avlabel.core.layouts import METADATA_NAME

from .data import REFERENCES_HELP, Run

NAME = "calibrate"
BINS = 10


# ----------------------------------------------------------------------------- measuring


def outcomes(run: Run, raw: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per closed-set field: (p, right) over the clips whose record gives the field a confidence;
    `raw`: the model's own p (`confidence_raw`) rather than the calibrated one."""
    from .review import same_answer

    found: dict[str, tuple[list[float], list[bool]]] = {name: ([], []) for name in schema.CLOSED_FIELD_NAMES}
    for clip_id in run.clip_ids:
        prediction = run.predictions[clip_id]
        confidence = prediction.confidence_raw if raw else prediction.confidence
        for name in schema.CLOSED_FIELD_NAMES:
            if name in confidence:
                found[name][0].append(float(confidence[name]))
                found[name][1].append(same_answer(schema.FIELDS_BY_NAME[name], prediction.label[name],
                                                  run.references[clip_id][name]))
    return {name: (np.array(p, dtype=float), np.array(right, dtype=bool)) for name, (p, right) in found.items() if p}


def reliability(p: np.ndarray, right: np.ndarray, bins: int = BINS) -> list[dict[str, Any]]:
    """The non-empty equal-width bins of p (the last one holds p = 1): range, answers, mean p, accuracy."""
    index = np.minimum((p * bins).astype(int), bins - 1)
    rows = []
    for b in np.unique(index):
        mine = index == b
        rows.append({"low": b / bins, "high": (b + 1) / bins, "n": int(mine.sum()),
                     "confidence": float(p[mine].mean()), "accuracy": float(right[mine].mean())})
    return rows


def expected_calibration_error(p: np.ndarray, right: np.ndarray, bins: int = BINS) -> float:
    """ECE over equal-width bins. Written here: scikit-learn has the reliability curve (calibration_curve)
    but not the error, and its curve drops the bin sizes the error weighs by."""
    return float(sum(row["n"] * abs(row["accuracy"] - row["confidence"]) for row in reliability(p, right, bins)) / len(p))


def calibration_report(runs: Mapping[str, Run], bins: int = BINS) -> dict[str, Any]:
    """Per run that carries confidence, per closed-set field: answers, accuracy, mean p and ECE, raw and
    (when the records are calibrated) calibrated, with their reliability bins; and the mean ECE over fields."""
    report: dict[str, Any] = {"bins": bins, "binning": "equal-width", "runs": {}}
    for name, run in runs.items():
        calibrated = any(prediction.calibrated for prediction in run.predictions.values())
        kinds = {"raw": outcomes(run, raw=True), **({"calibrated": outcomes(run)} if calibrated else {})}
        if not kinds["raw"]:
            continue
        fields = {}
        for field_name, (p, right) in kinds["raw"].items():
            fields[field_name] = {"n": len(p), "accuracy": float(right.mean())}
            for kind, found in kinds.items():
                kind_p, kind_right = found[field_name]
                fields[field_name][kind] = {"mean_confidence": float(kind_p.mean()),
                                            "ece": expected_calibration_error(kind_p, kind_right, bins),
                                            "reliability": reliability(kind_p, kind_right, bins)}
        report["runs"][name] = {
            "calibrated": calibrated,
            "fields": fields,
            "mean_ece": {kind: float(np.mean([entry[kind]["ece"] for entry in fields.values()])) for kind in kinds},
        }
    return report


def reliability_chart(report: Mapping[str, Any]) -> bytes:
    """Reliability diagrams as PNG bytes: one panel per closed-set field, accuracy against mean confidence per
    bin for each run (raw dashed, calibrated solid), the point's area the bin's share of answers."""
    import matplotlib
    from matplotlib.figure import Figure

    fields = [name for name in schema.CLOSED_FIELD_NAMES if any(name in run["fields"] for run in report["runs"].values())]
    columns = min(3, len(fields))
    rows = -(-len(fields) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.9 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, field_name in zip(axes.flat, fields):
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8, label="calibrated exactly")
        for color, (run_name, run) in zip(colors, report["runs"].items()):
            entry = run["fields"].get(field_name)
            if entry is None:
                continue
            for kind, style in (("raw", "--"), ("calibrated", "-")):
                if kind not in entry:
                    continue
                bins = entry[kind]["reliability"]
                x = [b["confidence"] for b in bins]
                y = [b["accuracy"] for b in bins]
                label = f"{run_name}{' (raw)' if kind == 'raw' and run['calibrated'] else ''}: ECE {entry[kind]['ece']:.2f}"
                axis.plot(x, y, style, color=color, marker="o", linewidth=1, markersize=3, label=label)
                axis.scatter(x, y, s=[300 * b["n"] / entry["n"] for b in bins], color=color, alpha=0.25)
        axis.set_title(field_name, fontsize=9)
        axis.set_xlim(0, 1.02)
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel("confidence (mean p of the bin)", fontsize=8)
        axis.set_ylabel("accuracy", fontsize=8)
        axis.legend(fontsize=6, loc="upper left")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(fields):]:
        axis.set_visible(False)
    figure.suptitle(f"Reliability of closed-set answers ({report['bins']} equal-width bins)")
    figure.tight_layout()
    return png_bytes(figure, dpi=100)


# ----------------------------------------------------------------------------- fitting


def fit_platt(p: np.ndarray, right: np.ndarray) -> tuple[float, float]:
    """(a, b) of sigmoid(a * logit(p) + b) by maximum likelihood, with Platt's (1999) smoothed targets,
    (N+ + 1) / (N+ + 2) for a right answer and 1 / (N- + 2) for a wrong one, so a field answered right
    every time is not fitted to certainty. scikit-learn's fit of the same (_SigmoidCalibration) is private;
    this is its loss, minimised by scipy."""
    from scipy.optimize import minimize

    x = np.array([logit(value) for value in p])
    positives = int(right.sum())
    target = np.where(right, (positives + 1) / (positives + 2), 1 / (len(right) - positives + 2))

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        z = params[0] * x + params[1]
        residual = 1 / (1 + np.exp(-z)) - target  # d loss / d z
        return float(np.sum(np.logaddexp(0, z) - target * z)), np.array([residual @ x, residual.sum()])

    result = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(0, None), (None, None)])
    return float(result.x[0]), float(result.x[1])


def fit(run: Run, bins: int = BINS, min_clips: int = 10) -> tuple[Calibration, list[str]]:
    """A Platt fit per closed-set field with at least `min_clips` answers with a confidence, on the model's
    own probabilities; and the fields left out (too few answers)."""
    found = outcomes(run, raw=True)
    fitted, left_out = {}, []
    for name in schema.CLOSED_FIELD_NAMES:
        p, right = found.get(name, (np.array([]), np.array([], dtype=bool)))
        if len(p) < min_clips:
            left_out.append(f"{name} ({len(p)} answers)")
            continue
        a, b = fit_platt(p, right)
        after = np.array([platt(value, a, b) for value in p])
        fitted[name] = {"a": round(a, 6), "b": round(b, 6), "clips": len(p), "accuracy": round(float(right.mean()), 4),
                        "ece_before": round(expected_calibration_error(p, right, bins), 4),
                        "ece_after": round(expected_calibration_error(after, right, bins), 4)}
    return Calibration(fitted, bins=bins), left_out


# ----------------------------------------------------------------------------- command line


@dataclass
class CalibrateArguments:
    captions: str = field(
        metadata={"help": "Captions of held-out labeled clips (an `avlabel caption` output folder or its captions.jsonl), "
                  "made by the model to calibrate; never the test split you report on."}
    )
    labels: str = field(metadata={"help": f"The human labels of those clips: {REFERENCES_HELP}."})
    split: str | None = field(
        default=None,
        metadata={"help": "Split of --labels holding the held-out clips, when it is a dataset (default: its only split; "
                  "one of several splits, or of a Hub dataset, must be named)."},
    )
    model: str | None = field(
        default=None,
        metadata={"help": f"Model (or adapter) folder to write {CALIBRATION_FILE} into (default: the folder the captions "
                  "name as their --adapter, else --model)."},
    )
    bins: int = field(default=BINS, metadata={"help": "Equal-width confidence bins of the ECE."})
    min_clips: int = field(default=10, metadata={"help": "Fields with fewer answers than this are left uncalibrated."})

    def __post_init__(self):
        from avlabel.core.parser import check_path, check_source, check_split

        check_path(self.captions, f"--captions {self.captions}")
        check_source(self.labels, "--labels", "dataset")
        self.split = check_split(self.labels, self.split, "--labels")
        if self.model is not None:
            _check_model_folder(self.model, f"--model {self.model}")


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    if subparsers is not None:
        return subparsers.add_parser(NAME, dataclass_types=[CalibrateArguments])
    return ArgumentParser(dataclass_types=[CalibrateArguments], prog=f"avlabel {NAME}")


def _check_model_folder(model: str, shown: str) -> Path:
    """`model` as a folder; `shown` says where it came from (the flag, or the captions)."""
    from avlabel.core.errors import UsageError

    if not Path(model).is_dir():
        raise UsageError(f"{shown}: not a local folder; {CALIBRATION_FILE} is written into the model's folder "
                         "(download a Hub model first, and give its local copy with --model)")
    written = Path(model) / CALIBRATION_FILE
    if not (os.access(written, os.W_OK) if written.exists() else os.access(model, os.W_OK | os.X_OK)):
        raise UsageError(f"{shown}: {written} can't be written (no permission, or a read-only file system); "
                         "copy the model to a folder you can write to and give that with --model")
    return Path(model)


def _model_folder(args: CalibrateArguments, run: Run) -> Path:
    """--model, else the one model (or adapter) folder the run's records name."""
    from avlabel.core.errors import UsageError

    if args.model is not None:
        return Path(args.model)
    named = {prediction.made_by for prediction in run.predictions.values()} - {None}
    if len(named) != 1:
        raise UsageError(f"--model: give the model folder to write {CALIBRATION_FILE} into (the captions name "
                         f"{', '.join(sorted(named)) or 'no model'})")
    model = named.pop()
    return _check_model_folder(model, f"the model the captions name, {model} (no --model given)")


def main(args: CalibrateArguments) -> Calibration:
    from rich.console import Console
    from rich.table import Table

    from avlabel.core.errors import UsageError

    from .data import read_run

    if args.bins < 1 or args.min_clips < 1:
        raise UsageError(f"--bins {args.bins} / --min_clips {args.min_clips}: give whole numbers of at least 1")
    run_path = Path(args.captions)
    run = read_run(run_path, args.labels, args.split)
    folder = _model_folder(args, run)
    if args.split == "test" and (Path(args.labels) / "test" / METADATA_NAME).is_file():
        print(f"warning: fitting on the test split of {args.labels}: the report's ECE after calibration on that split "
              "will look better than it is; hold out other clips", file=sys.stderr)
    if not any(prediction.confidence_raw for prediction in run.predictions.values()):
        labels = args.labels + (f" ({args.split})" if args.split else "")
        answers = [run.predictions[clip_id] for clip_id in run.clip_ids if clip_id not in run.missing]
        # read_run leaves at least one answer; a record gives a confidence only to fields it answered, so with no
        # valid answer captioning again would not help
        if not any(prediction.label for prediction in answers):
            raise UsageError(f"--captions {args.captions}: none of the {len(answers)} answers for clips of {labels} is "
                             "schema-valid, so no record gives a confidence to fit; calibrate a model that answers in "
                             "the label format (see the records' `errors`)")
        raise UsageError(f"--captions {args.captions}: no record gives a confidence for any clip of {labels}; "
                         "caption those clips with `avlabel caption` first")
    calibration, left_out = fit(run, args.bins, args.min_clips)
    calibration.fitted_on = {"captions": run_path.name, "labels": Path(args.labels).name, "split": args.split,
                             "clips": len(run.clip_ids)}
    if not calibration.fields:
        raise UsageError(f"--captions {args.captions}: no field has {args.min_clips} answers with a confidence to fit")
    path = calibration.save(folder)

    table = Table(title=f"Platt calibration per field, fitted on {len(run.clip_ids)} held-out clip(s) "
                        f"(ECE: {args.bins} equal-width bins, on these clips)")
    for column in ("field", "answers", "accuracy", "a", "b", "ECE before", "ECE after"):
        table.add_column(column)
    for name, entry in calibration.fields.items():
        table.add_row(name, str(entry["clips"]), f"{entry['accuracy']:.2f}", f"{entry['a']:.3f}", f"{entry['b']:.3f}",
                      f"{entry['ece_before']:.3f}", f"{entry['ece_after']:.3f}")
    Console().print(table)
    if left_out:
        print(f"left uncalibrated (fewer than --min_clips {args.min_clips}): {', '.join(left_out)}", file=sys.stderr)
    print(f"wrote {path}; `avlabel caption --model {folder}` now writes calibrated confidence")
    return calibration


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command(NAME)
