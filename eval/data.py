"""Reading what evaluation compares: model predictions and human references, joined on clip id.

Predictions come from `avlabel caption` (a folder with `captions.jsonl`, or the file itself) or
from label files. References come from the builder's dataset (a folder or Hub id, plus a split) or
from human label files. Label files are found by the layout reader every command shares
(`avlabel.core.layouts`): the recipe layout (`metas/`), a flat folder (subfolders such as a caption
run's `labels/` included) or a manifest; caption records are picked by the core's merge rule.

Nothing is dropped silently: unreadable inputs become `Problem`s that the commands print and
the report lists, and clips without a prediction stay in the evaluation as missing answers.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from avlabel.core import schema
from avlabel.core.layouts import InputClip, detect_layout, read_inputs
from avlabel.core.problems import InputError, Problem, warn
from avlabel.core.records import latest_per_clip, read_located, record_files, succeeded


@dataclass
class Prediction:
    """One clip's model answer: the fields that parsed, and whether the whole label was valid."""

    clip_id: str
    label: dict[str, Any] = field(default_factory=dict)
    valid: bool = False
    errors: dict[str, list[str]] = field(default_factory=dict)
    # closed-set fields of a caption record: p of the answer, calibrated when the record says so (`calibration`),
    # and the model's own p (avlabel/core/calibration.py); empty for label files
    confidence: dict[str, float] = field(default_factory=dict)
    confidence_raw: dict[str, float] = field(default_factory=dict)
    calibrated: bool = False
    made_by: str | None = None  # a caption record's adapter, else its model (folder or Hub id); None for label files

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


def _label_inputs(path: Path, problems: list[Problem], split: str | None = None) -> list[InputClip]:
    """The clips with a label in an input, as build and caption read it (a dataset without its videos)."""
    inputs = read_inputs(path, split=split, with_videos=False)
    problems += [replace(problem, stage="read") for problem in inputs.problems]
    return inputs.with_label


def prediction_from_raw(clip_id: str, raw: Any, valid: bool | None = None) -> Prediction:
    label, problems = schema.check_label(raw)
    return Prediction(clip_id, label, not problems if valid is None else valid and not problems, problems)


def prediction_from_json(clip_id: str, text: str | bytes, source: str) -> Prediction:
    """A label the model wrote as JSON text; text that is not JSON is an invalid answer, not an input error."""
    try:
        raw = json.loads((text.decode("utf-8") if isinstance(text, bytes) else text).removeprefix("\ufeff"))
    # ValueError: not JSON, not UTF-8, or past a limit of Python's reader (an integer of over 4,300 digits), as is
    # nesting past its recursion limit; the prediction is then an invalid answer
    except (TypeError, ValueError, RecursionError) as err:
        return Prediction(clip_id, errors={schema.WHOLE_LABEL: [f"{source}: not valid JSON ({err})"]})
    return prediction_from_raw(clip_id, raw)


def load_predictions(path: str | Path) -> tuple[dict[str, Prediction], list[Problem]]:
    """Read a run's predictions; returns ({clip_id: Prediction}, problems)."""
    path = Path(path)
    # a captions folder: captions.jsonl, plus the per-process shards of an unfinished multi-process run
    caption_files = record_files(path) if path.is_dir() else [path] if path.suffix == ".jsonl" else []
    problems: list[Problem] = []
    if caption_files:
        located = [pair for captions in caption_files for pair in read_located(captions, problems)]
        predictions = {}
        for clip_id, record in latest_per_clip(located, problems).items():
            made_by = record.get("adapter") or record.get("model")
            if succeeded(record):
                prediction = prediction_from_raw(clip_id, record.get("label") or {}, bool(record.get("valid")))
                # a field constrained decoding had to cut holds a placeholder or a stub, not an answer: missing
                for name, reason in (record.get("cut_fields") or {}).items():
                    prediction.label.pop(name, None)
                    prediction.errors.setdefault(name, []).append(f"cut short by the {reason}")
                confidence = record.get("confidence") or {}
                raw = record.get("confidence_raw") or confidence  # records written before calibration existed
                prediction.confidence = {name: p for name, p in confidence.items() if prediction.has(name)}
                prediction.confidence_raw = {name: p for name, p in raw.items() if prediction.has(name)}
                prediction.calibrated = bool(record.get("calibration"))
                prediction.made_by = made_by
                predictions[clip_id] = prediction
            else:  # a failed caption is a real answer of the run: every field missing
                predictions[clip_id] = Prediction(clip_id, errors={"<caption>": [str(record.get("error"))]}, made_by=made_by)
        return predictions, problems
    try:
        clips = _label_inputs(path, problems)
    except InputError as err:
        raise FileNotFoundError(f"{path}: no captions.jsonl, and no label files ({err})") from None
    predictions = {}
    for clip in clips:
        if not isinstance(clip.label, Path):
            predictions[clip.clip_id] = prediction_from_raw(clip.clip_id, clip.label)
            continue
        try:
            text = clip.label.read_bytes()
        except OSError as err:  # a broken link, a file without read permission: named, and the clip scored as missing
            problems.append(Problem(clip.label_name, "read", f"can't be read ({err.strerror or err})"))
            continue
        predictions[clip.clip_id] = prediction = prediction_from_json(clip.clip_id, text, clip.label_name)
        # label files are someone's deliverable, not a model's free output: one that isn't a JSON label is named too
        for reason in prediction.errors.get(schema.WHOLE_LABEL, []):
            problems.append(Problem(clip.label_name, "read", reason.removeprefix(f"{clip.label_name}: ")))
    return predictions, problems


def load_references(path: str | Path, split: str | None = "test") -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """Read the human labels; returns ({clip_id: normalised label}, problems)."""
    references: dict[str, dict[str, Any]] = {}
    problems: list[Problem] = []
    for clip in _label_inputs(Path(path), problems, split):
        label, _, reason = schema.read_label(clip.label)  # keys beyond the schema don't cost a reference
        if reason:
            problems.append(Problem(clip.label_name, "read", reason))
        else:
            references[clip.clip_id] = label
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

    def __post_init__(self):
        from avlabel.core.parser import check_path

        check_path(self.predictions, f"--predictions {self.predictions}")
        check_references(self)


def check_references(args) -> None:
    """`--references` and `--split` of an evaluation command: a path that isn't there, or a split its dataset
    lacks, is a command-line mistake (exit 2), said before anything is read."""
    from avlabel.core.parser import check_source, check_split  # the parser imports TRL: not at module import

    check_source(args.references, "--references", "dataset")
    args.split = check_split(args.references, args.split, "--references")


def load_run(name: str, predictions: str | Path, references: dict[str, dict[str, Any]]) -> Run:
    preds, problems = load_predictions(predictions)
    return join(name, references, preds, problems)


def check_overlap(run: Run, predictions: str | Path, references: str | Path, split: str | None) -> None:
    """Refuse a run that shares no clip with the references: every clip would score as a missing answer, a
    table of zeros that reads as a real score. A wrong split or folder is the usual cause."""
    if len(run.missing) < len(run.clip_ids):
        return
    dataset = split is not None and detect_layout(str(references)) == "dataset"
    raise InputError(f"{predictions}: no clip has both a prediction here ({len(run.extra)} clips) and a reference in "
                     f"{references}{f', split {split}' if dataset else ''} ({len(run.clip_ids)} clips); check "
                     f"{'--split and ' if dataset else ''}that both folders hold the same clips")


def read_run(predictions: str | Path, references: str | Path, split: str | None = "test") -> Run:
    """One run as the commands read it (named after its folder), with every problem printed."""
    refs, problems = load_references(references, split)
    path = Path(predictions)
    run = load_run((path.parent if path.is_file() else path).name, path, refs)
    run.problems[:0] = problems
    check_overlap(run, predictions, references, split)  # before the per-clip warnings: its one line says it all
    print_problems(run)
    return run


def print_problems(run: Run) -> None:
    warn(run.problems)
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
