"""Reading what evaluation compares: model predictions and human references, joined on clip id.

Predictions come from `avlabel caption` (a folder with `captions.jsonl`, or the file itself) or
from a folder of `<clip_id>.label.json` files. References come from the builder's dataset (a
folder or Hub id that `datasets.load_dataset` reads, plus a split) or from a folder of human
`<clip_id>.label.json` files in the recipe layout (`metas/`) or flat.

Nothing is dropped silently: unreadable inputs become `Problem`s that the commands print and
the report lists, and clips without a prediction stay in the evaluation as missing answers.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avlabel.core import schema
from avlabel.core.layouts import LABEL_SUFFIX


@dataclass(frozen=True)
class Problem:
    """An input that was set aside, and why."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class Prediction:
    """One clip's model answer: the fields that parsed, and whether the whole label was valid."""

    clip_id: str
    label: dict[str, Any] = field(default_factory=dict)
    valid: bool = False
    errors: dict[str, list[str]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.label


@dataclass
class Run:
    """One model's predictions joined with the references (every reference clip, in order)."""

    name: str
    clip_ids: list[str]
    references: dict[str, dict[str, Any]]
    predictions: dict[str, Prediction]  # clip ids without an answer map to an empty Prediction
    missing: list[str]  # reference clips the run has no prediction for
    extra: list[str]  # predictions for clips that have no reference
    problems: list[Problem]


def _clip_id(path: Path) -> str:
    return path.name[: -len(LABEL_SUFFIX)]


def _label_files(folder: Path) -> list[Path]:
    """The label files of a folder: recipe layout (`metas/`), infer layout (`labels/`) or flat."""
    for sub in ("metas", "labels", "."):
        files = sorted((folder / sub).glob(f"*{LABEL_SUFFIX}"))
        if files:
            return files
    return []


def prediction_from_raw(clip_id: str, raw: Any, valid: bool | None = None) -> Prediction:
    label, problems = schema.check_label(raw)
    return Prediction(clip_id, label, not problems if valid is None else valid and not problems, problems)


def prediction_from_json(clip_id: str, text: str | bytes, source: str) -> Prediction:
    """A label the model wrote as JSON text; text that is not JSON is an invalid answer, not an input error."""
    try:
        raw = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return Prediction(clip_id, errors={schema.WHOLE_LABEL: [f"{source}: not valid JSON ({err})"]})
    return prediction_from_raw(clip_id, raw)


def load_predictions(path: str | Path) -> tuple[dict[str, Prediction], list[Problem]]:
    """Read a run's predictions; returns ({clip_id: Prediction}, problems)."""
    from avlabel.infer.records import record_files

    path = Path(path)
    # a captions folder: captions.jsonl, plus the per-process shards of an unfinished multi-process run
    caption_files = record_files(path) if path.is_dir() else [path] if path.suffix == ".jsonl" else []
    problems: list[Problem] = []
    predictions: dict[str, Prediction] = {}
    statuses: dict[str, bool] = {}
    for captions in caption_files:
        with captions.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{captions}:{number}"
                try:
                    record = json.loads(line)
                    clip_id = record["clip_id"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    problems.append(Problem(where, f"not a caption record ({err})"))
                    continue
                ok = record.get("status", "ok") == "ok"
                if clip_id in predictions:  # infer's rule: a success beats a failure, else the later record wins
                    keep_earlier = statuses[clip_id] and not ok
                    problems.append(Problem(where, f"clip {clip_id} appears again; the "
                                            f"{'earlier successful' if keep_earlier else 'later'} record is used"))
                    if keep_earlier:
                        continue
                statuses[clip_id] = ok
                if not ok:
                    # a failed caption is a real answer of the run: every field missing
                    predictions[clip_id] = Prediction(clip_id, errors={"<caption>": [str(record.get("error"))]})
                    continue
                predictions[clip_id] = prediction_from_raw(clip_id, record.get("label") or {}, bool(record.get("valid")))
    if caption_files:
        return predictions, problems
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no captions.jsonl and not a folder of {LABEL_SUFFIX} files")
    files = _label_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no captions.jsonl and no {LABEL_SUFFIX} files")
    for file in files:
        clip_id = _clip_id(file)
        predictions[clip_id] = prediction_from_json(clip_id, file.read_bytes(), str(file))
    return predictions, problems


def load_references(path: str | Path, split: str = "test") -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """Read the human labels; returns ({clip_id: normalised label}, problems)."""
    folder = Path(path)
    files = _label_files(folder) if folder.is_dir() else []
    problems: list[Problem] = []
    references: dict[str, dict[str, Any]] = {}
    if files:
        for file in files:
            try:
                references[_clip_id(file)] = schema.load_label_file(file)
            except schema.LabelError as err:
                problems.append(Problem(str(file), str(err).removeprefix(f"{file}: ")))
        return references, problems

    from avlabel.core.loading import load_clip_dataset

    dataset = load_clip_dataset(path, split=split)
    # only the label columns: touching `video` would decode every clip
    dataset = dataset.select_columns(["clip_id", *schema.FIELD_NAMES])
    for index, row in enumerate(dataset):
        try:
            references[row["clip_id"]] = schema.normalize_label(schema.row_to_label(row))
        except (schema.LabelError, KeyError, TypeError, ValueError) as err:
            problems.append(Problem(f"{path}[{split}][{index}]", str(err)))
    return references, problems


def join(name: str, references: dict[str, dict[str, Any]], predictions: dict[str, Prediction],
         problems: list[Problem] | None = None) -> Run:
    """Align a run with the references: every reference clip is evaluated, missing ones as empty answers."""
    clip_ids = sorted(references)
    missing = [clip for clip in clip_ids if clip not in predictions]
    extra = sorted(set(predictions) - set(references))
    joined = {clip: predictions.get(clip) or Prediction(clip, errors={"<clip>": ["no prediction"]}) for clip in clip_ids}
    return Run(name, clip_ids, references, joined, missing, extra, list(problems or []))


REFERENCES_HELP = "the builder's dataset (folder or Hub id) or a folder of human <clip_id>.label.json"
SPLIT_HELP = "dataset split holding the references"


@dataclass
class RunArguments:
    """What `avlabel metrics` and `avlabel judge` read (one run against the references); each names its outputs."""

    predictions: str = field(metadata={"help": "captions folder or captions.jsonl from `avlabel caption`, or a folder of <clip_id>.label.json"})
    references: str = field(metadata={"help": REFERENCES_HELP})
    output_dir: str = field(metadata={"help": "where the outputs are written"})
    split: str = field(default="test", metadata={"help": SPLIT_HELP})


def load_run(name: str, predictions: str | Path, references: dict[str, dict[str, Any]]) -> Run:
    preds, problems = load_predictions(predictions)
    return join(name, references, preds, problems)


def read_run(predictions: str | Path, references: str | Path, split: str = "test") -> Run:
    """One run as the commands read it (named after its folder), with every problem printed."""
    refs, problems = load_references(references, split)
    path = Path(predictions)
    run = load_run((path.parent if path.is_file() else path).name, path, refs)
    run.problems[:0] = problems
    print_problems(run)
    return run


def print_problems(run: Run) -> None:
    for problem in run.problems:
        print(f"set aside: {problem}", file=sys.stderr)
    for clips, what in ((run.missing, "clip(s) have no prediction (scored as missing)"),
                        (run.extra, "prediction(s) have no reference and are ignored")):
        if clips:
            print(f"{run.name}: {len(clips)} {what}: " + ", ".join(clips[:10]) + (" ..." if len(clips) > 10 else ""),
                  file=sys.stderr)


def render_value(value: Any) -> str:
    """A field value as text for the judge and the report (null and lists spelled out)."""
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return "; ".join(map(str, value))
    return str(value)
