"""`evaluate` metric for dashcam clip labels: deterministic per-field metrics, optional LLM judge.

Load it from this folder or its Hub repository: `evaluate.load("path/to/av_label_metric")`. It needs
only `evaluate` and the packages imported below. The metrics are the project's own code:
`field_metrics.py` and `label_schema.py` beside this file are generated from the `avlabel`
package (`python -m avlabel.eval.metric_bundle`), so they compute what `avlabel metrics` does.
The optional LLM judge is the project's judge and needs avlabel installed with its `judge` extra
(in a clone of avlabel, `pip install '.[judge]'`).
See README.md beside this file for the keys `compute` returns.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

# field_metrics imports these where it computes. Imported here too, `evaluate` sees them (it reads
# this file's top-level import lines) and names what to install before anything runs; a "From:"
# comment gives the pip name where it differs from the module's. Other comments on these lines
# would be taken for pip names.
import rouge_score
import sacrebleu
import sklearn  # From: scikit-learn

from .field_metrics import evaluate_predictions, prediction_from_json
from .label_schema import read_label

_DESCRIPTION = """
Compares a model's labels of driving clips with human labels, field by field, using the schema of
the Cosmos Reason AV captioning recipe (15 fields). Each field's metrics follow its kind: exact
match for closed categories, set F1 for the manoeuvre list, accuracy/MAE/quadratic kappa for
the 1-4 difficulty, balanced accuracy/F1/MCC for the True/False fields (with the majority-class
baseline), chrF/BLEU/ROUGE-L for free text. With `judge=...` an OpenAI-compatible LLM also scores
every field from 1 to 5 against the human answer, as in the recipe.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the model's labels, each a JSON object as text. Text that is not
        JSON, or fields that do not validate, count as missing answers (scored as wrong).
    references (list of str): the human labels, JSON objects as text (label files' contents); each must
        be a valid label. Keys beyond the schema are set aside, as `avlabel metrics` does.
    judge (dict or avlabel JudgeConfig, optional): judge settings (the `judge_*` options of
        `avlabel judge`, e.g. {"judge_model": "gpt-5", "judge_base_url": ..., "judge_cache": ...}).
        Needs avlabel with its `judge` extra. Without it no network is used.
Returns:
    dict with "n", "json_valid_rate" and, for every field F, "F/<metric>" keys (see README.md),
    plus "F/judge_score" and "judge/*" when a judge is given.
Examples:
    >>> metric = evaluate.load("eval/av_label_metric")
    >>> label = '{"weather": "Overcast", ...}'
    >>> metric.compute(predictions=[label], references=[label])["weather/accuracy"]
    1.0
"""

_CITATION = """
@misc{cosmos_cookbook_av_caption,
  title = {SFT for AV video captioning and VQA},
  author = {Hutchins, DeLesley and Jin, Jingyi and Fasale, Amol and Wang, Joseph},
  howpublished = {NVIDIA Cosmos Cookbook},
}
"""


def _flatten(prefix: str, metrics: dict[str, Any], out: dict[str, Any]) -> None:
    for key, value in metrics.items():
        if isinstance(value, dict) and key != "confusion_matrix":
            _flatten(f"{prefix}/{key}", value, out)
        else:
            out[f"{prefix}/{key}"] = value


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AvLabelMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # labels travel as JSON text: evaluate's features must be plain types
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str], judge: dict | Any = None) -> dict[str, Any]:
        refs = []
        for index, text in enumerate(references):
            # read as `avlabel metrics` reads a label file: a byte-order mark stripped, keys beyond the schema
            # (a review note, an exporter's id) set aside
            label, _, reason = read_label(text)
            if reason is not None:
                raise ValueError(f"references[{index}] {reason}")
            refs.append(label)
        preds = [prediction_from_json(str(i), text, f"predictions[{i}]") for i, text in enumerate(predictions)]
        run = evaluate_predictions("predictions", refs, preds)
        out: dict[str, Any] = {"n": run.n, "json_valid_rate": run.json_valid_rate}
        for name, fields in run.to_dict()["fields"].items():
            _flatten(name, {k: v for k, v in fields.items() if k not in ("kind", "metric", "value")}, out)
        if judge is not None:
            out |= _judge_scores(refs, preds, judge)
        return out


def _judge_scores(refs: list[dict], preds: list, judge) -> dict[str, Any]:
    """Scores of the project's LLM judge; imported here only, so the metric loads without it."""
    try:
        from avlabel.eval.judge import Judge, JudgeConfig, JudgeItem, score_arrays
    except ImportError:
        raise ImportError("judge=... uses the avlabel LLM judge: install avlabel with its judge extra "
                          "(in a clone of avlabel: pip install '.[judge]')") from None

    config = judge if isinstance(judge, JudgeConfig) else JudgeConfig(**judge)
    judge_obj = Judge(config)
    try:
        judgments = judge_obj.judge([JudgeItem(p.clip_id, r, p.label) for r, p in zip(refs, preds)])
    finally:
        judge_obj.close()
    out: dict[str, Any] = {}
    for name, values in score_arrays(judgments, [p.clip_id for p in preds]).items():
        scored = values[~np.isnan(values)]  # unscored judgments are left out, never counted
        out[f"{name}/judge_score"] = float(scored.mean()) if len(scored) else None
        out[f"{name}/judge_unscored"] = int(len(values) - len(scored))
    stats = judge_obj.last
    return out | {"judge/model": config.judge_model, "judge/prompt_sha": judge_obj.prompt_sha,
                  "judge/calls": stats.calls, "judge/cached": stats.cached,
                  "judge/prompt_tokens": stats.prompt_tokens, "judge/completion_tokens": stats.completion_tokens,
                  "judge/cost_usd": stats.cost_usd}
