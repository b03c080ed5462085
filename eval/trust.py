"""How far the judge's scores can be trusted, field by field.

Run beside every judged evaluation on a sample of clips (all checks reuse the judge's cache):

* identity: a human answer judged against itself must score 5;
* shuffled control: a human answer judged against another clip's different human answer must
  score low (a judge that gives 4 here rewards plausible-sounding text, not agreement);
* order swap: the model's answer given as the reference and the human's as the prediction; a
  judge that only measures agreement gives the same score both ways;
* repeat variance: the same comparison judged `repeats` times (different calls); the mean
  standard deviation says how much of a score is noise;
* agreement: Spearman correlation between judge scores and the deterministic per-clip score
  (accuracy, set F1, balanced-accuracy correctness) on the closed-set fields, where the
  deterministic score is the truth. Text fields show it against sentence chrF for information.

Each field gets "trustworthy" when every check with data passes its threshold, otherwise
"doubtful" with the failed checks named ("untested" when no check had data).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from avlabel.core import schema

from .data import Run, render_value
from .judge import Judge, JudgeItem, Judgment
from .metrics import RunMetrics, mean_or_none


@dataclass
class TrustConfig:
    clips: int = 30  # clips sampled for identity, shuffled, swap and repeat checks
    repeats: int = 3  # judgments per item for repeat variance (the first is the main judgment)
    seed: int = 0
    min_identity: float = 4.5  # mean score of an answer against itself
    max_shuffled: float = 2.5  # mean score against another clip's different answer
    max_swap_diff: float = 0.75  # mean |score(h, m) - score(m, h)|
    max_repeat_std: float = 0.5  # mean standard deviation over repeats
    min_spearman: float = 0.5  # correlation with the deterministic score (closed fields)

    @property
    def thresholds(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k.startswith(("min_", "max_"))}


def _spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, None  # undefined for constant or tiny samples
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def trust_items(runs: Sequence[Run], config: TrustConfig) -> tuple[list[JudgeItem], dict[str, tuple[str, str, str]]]:
    """What the checks ask the judge for the given runs (same references), and where each item comes from:
    (check, run, clip) by item id."""
    references, clip_ids = runs[0].references, runs[0].clip_ids
    rng = np.random.default_rng(config.seed)
    sample = [str(c) for c in rng.permutation(clip_ids)[: config.clips]]

    items: list[JudgeItem] = []
    origin: dict[str, tuple[str, str, str]] = {}  # item id -> (check, run, clip)

    def add(check: str, run: str, clip: str, reference, prediction, **kwargs) -> None:
        item_id = f"{check}#{len(origin)}"
        origin[item_id] = (check, run, clip)
        items.append(JudgeItem(item_id, reference, prediction, **kwargs))

    for clip in sample:
        add("identity", "", clip, references[clip], references[clip])
    # shuffled control: each sampled clip against the next one's reference, on the fields where they differ
    for clip, other in zip(sample, sample[1:] + sample[:1]):
        differing = tuple(n for n in schema.FIELD_NAMES
                          if render_value(references[clip][n]) != render_value(references[other][n]))
        if clip != other and differing:
            add("shuffled", "", clip, references[clip], references[other], fields=differing)
    for run in runs:
        for clip in sample:
            answered = tuple(n for n in schema.FIELD_NAMES if run.predictions[clip].has(n))
            if not answered:
                continue
            prediction = run.predictions[clip].label
            add("swap", run.name, clip, prediction, references[clip], fields=answered)
            for r in range(1, config.repeats):
                add("repeat", run.name, clip, references[clip], prediction, repeat=r, fields=answered)
    return items, origin


def judge_trust(judge: Judge, runs: Sequence[Run], judgments: Mapping[str, Sequence[Judgment]],
                metrics: Mapping[str, RunMetrics], config: TrustConfig | None = None) -> dict[str, Any]:
    """Run the checks for the given runs (same references) and summarise them per field."""
    config = config or TrustConfig()
    items, origin = trust_items(runs, config)
    results = judge.judge(items, desc="judge trust checks")

    by_check: dict[tuple[str, str], list[tuple[str, str, Judgment]]] = {}
    for j in results:
        check, run, clip = origin[j.clip_id]
        by_check.setdefault((check, j.field), []).append((run, clip, j))
    main = {(run, j.clip_id, j.field): j.score for run, js in judgments.items() for j in js
            if j.repeat == 0 and j.status == "scored"}

    def scores(check: str, name: str) -> list[int]:
        return [j.score for _, _, j in by_check.get((check, name), []) if j.score is not None]

    report: dict[str, Any] = {}
    for spec in schema.FIELDS:
        name = spec.name
        swaps = []
        for run, clip, j in by_check.get(("swap", name), []):
            if j.score is not None and main.get((run, clip, name)) is not None:
                swaps.append(abs(j.score - main[(run, clip, name)]))
        repeats: dict[tuple[str, str], list[int]] = {}
        for run, clip, j in by_check.get(("repeat", name), []):
            if j.score is not None:
                repeats.setdefault((run, clip), []).append(j.score)
        stds = [float(np.std([main[(run, clip, name)], *extra])) for (run, clip), extra in repeats.items()
                if main.get((run, clip, name)) is not None]
        judge_x, det_y = [], []
        for run in runs:
            det = metrics[run.name].fields[name].scores
            for i, clip in enumerate(run.clip_ids):
                if main.get((run.name, clip, name)) is not None:  # "missing" answers are scored by rule: left out
                    judge_x.append(main[(run.name, clip, name)])
                    det_y.append(float(det[i]))
        rho, p_value = _spearman(judge_x, det_y)

        entry = {
            "kind": spec.kind,
            "identity": {"mean": mean_or_none(scores("identity", name)), "n": len(scores("identity", name))},
            "shuffled": {"mean": mean_or_none(scores("shuffled", name)), "n": len(scores("shuffled", name))},
            "swap": {"mean_abs_diff": mean_or_none(swaps), "n": len(swaps)},
            "repeat": {"mean_std": mean_or_none(stds), "n": len(stds)},
            "agreement": {"spearman": rho, "p_value": p_value, "n": len(judge_x),
                          "against": metrics[runs[0].name].fields[name].metric},
        }
        checks = [
            ("identity", entry["identity"]["mean"], lambda v: v >= config.min_identity, f"identity mean < {config.min_identity}"),
            ("shuffled", entry["shuffled"]["mean"], lambda v: v <= config.max_shuffled, f"shuffled mean > {config.max_shuffled}"),
            ("swap", entry["swap"]["mean_abs_diff"], lambda v: v <= config.max_swap_diff, f"order swap changes scores by > {config.max_swap_diff}"),
            ("repeat", entry["repeat"]["mean_std"], lambda v: v <= config.max_repeat_std, f"repeat std > {config.max_repeat_std}"),
        ]
        if spec.closed:
            checks.append(("agreement", rho, lambda v: v >= config.min_spearman,
                           f"Spearman with {entry['agreement']['against']} < {config.min_spearman}"))
        tested = [(value, passes, reason) for _, value, passes, reason in checks if value is not None]
        entry["reasons"] = [reason for value, passes, reason in tested if not passes(value)]
        entry["verdict"] = "untested" if not tested else "doubtful" if entry["reasons"] else "trustworthy"
        report[name] = entry
    return {"clips": min(config.clips, len(runs[0].clip_ids)), "repeats": config.repeats, "seed": config.seed, "thresholds": config.thresholds,
            "calls": asdict(judge.last), "fields": report}
