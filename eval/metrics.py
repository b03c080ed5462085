"""Deterministic per-field metrics, chosen from each schema field's kind (no LLM needed).

    category        accuracy (exact match after the schema's normalisation), confusion matrix,
                    majority-class baseline
    multi_category  the answer as a set, null = empty set: sample-averaged F1 (two empty sets
                    agree), micro precision/recall/F1, exact set match
    difficulty      accuracy, mean absolute error, quadratic weighted kappa, confusion matrix
    boolean         accuracy, balanced accuracy, F1 of "True", Matthews correlation, and the same
                    numbers for always answering the majority class
    text            sentence chrF per clip; corpus BLEU and chrF (sacrebleu), ROUGE-L (rouge_score);
                    for nullable fields how often null-ness agrees

Every field also gets `n` (clips), `answered` and `missing_rate`. The headline metric of each kind
(`PRIMARY`) is a rate over all clips in which a missing answer counts as wrong, so failing to
answer never helps; the agreement numbers (confusion matrix, MAE, kappa, F1 of "True", MCC, BLEU,
chrF, ROUGE-L, micro P/R/F1) are over the answered clips only and say so with `answered`.

Command: `avlabel metrics --predictions OUT/captions --references DATASET --output_dir DIR`.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from avlabel.core import schema
from avlabel.core.schema import LabelField

from .data import Prediction, Run, RunArguments, read_run

# the headline metric of each kind: a per-clip score in [0, 1] whose (group-)mean is the value
PRIMARY = {
    "category": "accuracy",
    "multi_category": "f1",
    "difficulty": "accuracy",
    "boolean": "balanced_accuracy",
    "text": "sentence_chrf",
}


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()  # a field the model did not produce (distinct from a null answer)


@dataclass
class FieldResult:
    """Metrics of one field for one run, plus the per-clip scores the statistics resample."""

    name: str
    kind: str
    metric: str  # name of the headline metric
    scores: np.ndarray  # per clip, in [0, 1]; missing answers score 0
    groups: np.ndarray | None  # per clip reference class when the headline is class-balanced
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        from .stats import statistic

        return float(statistic(self.scores, self.groups))


@dataclass
class RunMetrics:
    name: str
    n: int
    json_valid_rate: float
    fields: dict[str, FieldResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "n": self.n,
            "json_valid_rate": self.json_valid_rate,
            "missing_rate": {name: res.metrics["missing_rate"] for name, res in self.fields.items()},
            "fields": {
                name: {"kind": res.kind, "metric": res.metric, "value": _num(res.value), **res.metrics}
                for name, res in self.fields.items()
            },
        }


def _num(x: Any) -> float | None:
    """JSON-friendly number: NaN (undefined, e.g. no answered clips) becomes null."""
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _confusion(labels: Sequence[str], refs: Sequence[str], preds: Sequence[str]) -> dict[str, Any]:
    """Rows are the reference, columns the prediction (answered clips only)."""
    labels = list(labels) + sorted({*refs, *preds} - set(labels))
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for ref, pred in zip(refs, preds):
        matrix[index[ref], index[pred]] += 1
    return {"labels": labels, "matrix": matrix.tolist()}


def _exact(refs: list, answers: list) -> np.ndarray:
    """Per clip 1.0 where the answer equals the reference (a missing answer is wrong)."""
    return np.array([a is not MISSING and a == r for r, a in zip(refs, answers)], dtype=float)


def _majority(values: Sequence[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], str(v)))  # ties broken by name, deterministically


def _class_groups(refs: Sequence[Any]) -> np.ndarray:
    classes = {value: i for i, value in enumerate(sorted(set(map(str, refs))))}
    return np.array([classes[str(v)] for v in refs])


def _category(spec: LabelField, refs: list, answers: list) -> tuple[np.ndarray, None, dict]:
    correct = _exact(refs, answers)
    answered = [(str(r), str(a)) for r, a in zip(refs, answers) if a is not MISSING]
    majority = _majority(refs)
    metrics = {
        "accuracy": float(correct.mean()),
        "majority_class": majority,
        "majority_baseline": {"accuracy": float(np.mean([r == majority for r in refs]))},
        "confusion_matrix": _confusion(spec.choices, *zip(*answered)) if answered else None,
    }
    return correct, None, metrics


def _set_f1(ref: set, pred: set) -> float:
    return 1.0 if not ref and not pred else 2 * len(ref & pred) / (len(ref) + len(pred))


def _multi_category(spec: LabelField, refs: list, answers: list) -> tuple[np.ndarray, None, dict]:
    ref_sets = [set(r or ()) for r in refs]
    pred_sets = [None if a is MISSING else set(a or ()) for a in answers]
    f1 = np.array([0.0 if p is None else _set_f1(r, p) for r, p in zip(ref_sets, pred_sets)])
    pairs = [(r, p) for r, p in zip(ref_sets, pred_sets) if p is not None]
    tp = sum(len(r & p) for r, p in pairs)
    fp = sum(len(p - r) for r, p in pairs)
    fn = sum(len(r - p) for r, p in pairs)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    micro_f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    metrics = {
        "f1": float(f1.mean()),
        "exact_match": float(np.mean([p is not None and r == p for r, p in zip(ref_sets, pred_sets)])),
        "micro_precision": precision,
        "micro_recall": recall,
        "micro_f1": micro_f1,
        "empty_set_baseline": {"f1": float(np.mean([not r for r in ref_sets]))},
    }
    return f1, None, metrics


def _difficulty(spec: LabelField, refs: list, answers: list) -> tuple[np.ndarray, None, dict]:
    from sklearn.metrics import cohen_kappa_score

    correct = _exact(refs, answers)
    pairs = [(int(r), int(a)) for r, a in zip(refs, answers) if a is not MISSING]
    levels = [int(c) for c in spec.choices]
    kappa = None
    if pairs:
        with warnings.catch_warnings():  # one class only makes kappa undefined (NaN), reported as null
            warnings.simplefilter("ignore")
            kappa = _num(cohen_kappa_score(*zip(*pairs), labels=levels, weights="quadratic"))
    majority = _majority(refs)
    metrics = {
        "accuracy": float(correct.mean()),
        "mae": mean_or_none([abs(r - a) for r, a in pairs]),
        "qwk": kappa,
        "majority_class": majority,
        "majority_baseline": {
            "accuracy": float(np.mean([r == majority for r in refs])),
            "mae": float(np.mean([abs(r - majority) for r in refs])),
        },
        "confusion_matrix": _confusion(spec.choices, *zip(*[(str(r), str(a)) for r, a in pairs])) if pairs else None,
    }
    return correct, None, metrics


def _boolean_scores(refs: list, preds: list) -> dict[str, float | None]:
    """Agreement of answered "True"/"False" values (sklearn, positive class "True")."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    if not refs:
        return {"f1_true": None, "mcc": None}
    with warnings.catch_warnings():  # a single class is common (e.g. always "False"); sklearn's MCC is then 0
        warnings.simplefilter("ignore")
        return {
            "f1_true": float(f1_score(refs, preds, pos_label="True", labels=["True", "False"], zero_division=0)),
            "mcc": float(matthews_corrcoef(refs, preds)),
        }


def _boolean(spec: LabelField, refs: list, answers: list) -> tuple[np.ndarray, np.ndarray, dict]:
    from .stats import statistic

    correct = _exact(refs, answers)
    groups = _class_groups(refs)
    answered = [(r, a) for r, a in zip(refs, answers) if a is not MISSING]
    majority = _majority(refs)
    majority_correct = np.array([r == majority for r in refs], dtype=float)
    agreement = _boolean_scores([r for r, _ in answered], [a for _, a in answered])
    metrics = {
        "accuracy": float(correct.mean()),
        # mean recall of the two classes: always answering the majority scores 0.5
        "balanced_accuracy": float(statistic(correct, groups)),
        **agreement,
        "positive_rate_reference": float(np.mean([r == "True" for r in refs])),
        "majority_class": majority,
        "majority_baseline": {
            "accuracy": float(majority_correct.mean()),
            "balanced_accuracy": float(statistic(majority_correct, groups)),
            **_boolean_scores(list(refs), [majority] * len(refs)),
        },
    }
    return correct, groups, metrics


_CHRF = None


def _sentence_chrf(hyp: str, ref: str) -> float:
    import sacrebleu

    global _CHRF
    _CHRF = _CHRF or sacrebleu.metrics.CHRF()
    return _CHRF.sentence_score(hyp, [ref]).score / 100


def _text(spec: LabelField, refs: list, answers: list) -> tuple[np.ndarray, None, dict]:
    import sacrebleu
    from rouge_score import rouge_scorer

    def clip_score(ref, ans) -> float:
        if ans is MISSING:
            return 0.0
        if ref is None or ans is None:  # null agrees only with null
            return float(ref is None and ans is None)
        return _sentence_chrf(ans, ref)

    scores = np.array([clip_score(r, a) for r, a in zip(refs, answers)])
    pairs = [(r, a) for r, a in zip(refs, answers) if a is not MISSING and r is not None and a is not None]
    metrics: dict[str, Any] = {"sentence_chrf": float(scores.mean()), "text_pairs": len(pairs)}
    if pairs:
        hyps, ref_texts = [a for _, a in pairs], [r for r, _ in pairs]
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        metrics |= {
            "bleu": sacrebleu.corpus_bleu(hyps, [ref_texts]).score,
            "chrf": sacrebleu.corpus_chrf(hyps, [ref_texts]).score,
            "rougeL": float(np.mean([scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(ref_texts, hyps)])),
        }
    else:
        metrics |= {"bleu": None, "chrf": None, "rougeL": None}
    if spec.nullable:
        answered = [(r, a) for r, a in zip(refs, answers) if a is not MISSING]
        metrics["null_agreement"] = mean_or_none([(r is None) == (a is None) for r, a in answered])
        metrics["null_rate_reference"] = float(np.mean([r is None for r in refs]))
    return scores, None, metrics


_BY_KIND = {
    "category": _category,
    "multi_category": _multi_category,
    "difficulty": _difficulty,
    "boolean": _boolean,
    "text": _text,
}


def field_result(spec: LabelField, refs: list, answers: list) -> FieldResult:
    """Metrics of one field; `answers[i]` is the model's value or MISSING."""
    if not refs:
        raise ValueError(f"{spec.name}: no clips to evaluate")
    scores, groups, metrics = _BY_KIND[spec.kind](spec, refs, answers)
    answered = sum(a is not MISSING for a in answers)
    metrics = {"n": len(refs), "answered": answered, "missing_rate": 1 - answered / len(refs), **metrics}
    return FieldResult(spec.name, spec.kind, PRIMARY[spec.kind], scores, groups, metrics)


def evaluate_predictions(name: str, references: Sequence[dict[str, Any]], predictions: Sequence[Prediction]) -> RunMetrics:
    """Metrics of every schema field over aligned lists of reference labels and predictions."""
    fields = {
        spec.name: field_result(
            spec,
            [ref[spec.name] for ref in references],
            [pred.label[spec.name] if pred.has(spec.name) else MISSING for pred in predictions],
        )
        for spec in schema.FIELDS
    }
    return RunMetrics(name, len(references), float(np.mean([p.valid for p in predictions])), fields)


def evaluate_run(run: Run) -> RunMetrics:
    return evaluate_predictions(
        run.name, [run.references[c] for c in run.clip_ids], [run.predictions[c] for c in run.clip_ids]
    )


# --------------------------------------------------------------------------- command line


@dataclass
class MetricsArguments(RunArguments):
    output_dir: str = field(metadata={"help": "where metrics.json is written"})


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    if subparsers is not None:
        return subparsers.add_parser("metrics", dataclass_types=[MetricsArguments])
    return ArgumentParser(dataclass_types=[MetricsArguments], prog="avlabel metrics")


def main(args: MetricsArguments) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    run = read_run(args.predictions, args.references, args.split)
    result = evaluate_run(run).to_dict()
    result |= {"missing_clips": run.missing, "extra_clips": run.extra, "problems": [str(p) for p in run.problems]}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    table = Table(title=f"{run.name}: {result['n']} clips, JSON valid {result['json_valid_rate']:.1%}")
    for column in ("field", "kind", "metric", "value", "missing"):
        table.add_column(column)
    for name, res in result["fields"].items():
        value = "n/a" if res["value"] is None else f"{res['value']:.3f}"
        table.add_row(name, res["kind"], res["metric"], value, f"{res['missing_rate']:.1%}")
    Console().print(table)
    print(f"wrote {out / 'metrics.json'}")
    return result


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("metrics")
