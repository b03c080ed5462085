"""Compare runs (baseline, fine-tuned checkpoints) on the same clips, and write the report.

For every field and run: the headline score (the judge's mean 1-5 when a judge is configured,
else the deterministic headline metric) with a 95% bootstrap interval; for every run against
the first (the baseline): the paired difference with its bootstrap interval, a paired
permutation p-value and per-clip wins/ties/losses. Outputs in `output_dir`:

    results.json        everything below as data (the Hub model card reads it)
    report.md           the tables in Markdown
    report.html         one self-contained page: charts (embedded), tables, judge trust and a
                        per-clip browser of the clips where runs and references disagree most
    judge_scores.png    grouped bars per field, runs side by side, 95% intervals (with a judge)
    deterministic.png   the same for the deterministic headline metrics
    reliability.png     reliability diagrams of the closed-set fields' confidence (runs whose records carry one),
                        beside the ECE table: before and after calibration when the records are calibrated
    per_clip.jsonl      one record per clip, field and run: answers, scores, the judge's reason

A chart an earlier comparison left in `output_dir` that this one does not draw is removed; other files stay.

Command: `avlabel compare --runs baseline=out/base sft=out/sft --references DATASET --output_dir DIR [--judge]`.
Python (the demo): `compare_runs({"baseline": path, "sft": path}, references, out_dir, judge=JudgeConfig(...))`.
"""

from __future__ import annotations

import base64
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from avlabel.core import schema
from avlabel.core.charts import png_bytes
from avlabel.core.errors import UsageError
from avlabel.core.markdown import markdown_table

from .data import (
    REFERENCES_HELP,
    SPLIT_HELP,
    Run,
    check_overlap,
    check_references,
    load_references,
    load_run,
    print_problems,
    render_value,
)
from .calibration import calibration_report, reliability_chart
from .judge import SCORE_RANGE, Judge, JudgeConfig, run_items, score_arrays
from .metrics import RunMetrics, evaluate_run
from .stats import bootstrap, paired
from .trust import TrustConfig, judge_trust, trust_items

CONFIDENCE = 0.95
TEMPLATE = Path(__file__).parent / "report.html.jinja"
JUDGE_SCALE = "{}-{}".format(*SCORE_RANGE)  # as the charts and tables name it
CHARTS = ("judge_scores.png", "deterministic.png", "reliability.png")  # every chart compare_runs can draw


@dataclass
class _Scores:
    """Per-clip scores of one field and run, and how to aggregate them."""

    metric: str
    scores: np.ndarray
    groups: np.ndarray | None = None


def _estimate(field_scores: _Scores, samples: int, seed: int) -> dict[str, Any]:
    estimate = bootstrap(field_scores.scores, field_scores.groups, samples, seed, CONFIDENCE)
    return {"metric": field_scores.metric, **estimate.to_dict()}


def _comparisons(source: str, table: Mapping[str, Mapping[str, _Scores]], names: list[str], samples: int, seed: int) -> list[dict]:
    """Every run against the baseline (the first run), field by field."""
    baseline, comparisons = names[0], []
    for name in names[1:]:
        for field_name in schema.FIELD_NAMES:
            run_scores, baseline_scores = table[field_name][name], table[field_name][baseline]
            comparisons.append({
                "source": source, "field": field_name, "metric": run_scores.metric, "run": name, "baseline": baseline,
                **paired(run_scores.scores, baseline_scores.scores, run_scores.groups, samples, seed, CONFIDENCE),
            })
    return comparisons


def compare_runs(runs: Mapping[str, str | Path], references: str | Path, out_dir: str | Path,
                 judge: JudgeConfig | Judge | None = None, *, split: str = "test", seed: int = 0,
                 bootstrap_samples: int = 1000, trust: TrustConfig | None = TrustConfig(),
                 disagreements: int = 20) -> dict[str, Any]:
    """Evaluate every run against the references, write the report to `out_dir`, return results.json's dict.

    `runs` maps a name to captions (folder/jsonl) or a label folder; the first is the baseline.
    `judge` adds LLM-judge scores (and, unless `trust` is None, the trust checks).
    """
    if not runs:
        raise ValueError("compare needs at least one run")
    refs, problems = load_references(references, split)
    if not refs:
        raise ValueError(f"{references}: no usable reference labels" + (f" ({problems[0]})" if problems else ""))
    loaded: dict[str, Run] = {}
    for name, path in runs.items():
        loaded[name] = load_run(name, path, refs)
        check_overlap(loaded[name], path, references, split)
        print_problems(loaded[name])
    for problem in problems:
        print(f"set aside: {problem}", file=sys.stderr)
    names = list(loaded)
    clip_ids = loaded[names[0]].clip_ids

    judge_section = trust_section = None
    judgments: dict[str, list] = {}
    judge_table = None
    trusted = trust is not None and trust.clips > 0
    own_judge = judge is not None and not isinstance(judge, Judge)
    judge_obj = Judge(judge) if own_judge else judge
    try:
        if judge_obj is not None:
            items = {name: run_items(run) for name, run in loaded.items()}
            all_items = [item for run_list in items.values() for item in run_list]
            # judging would stop without a key: say so now, before the metrics, any judging or progress bar
            judge_obj.check_ready(all_items + (trust_items(list(loaded.values()), trust)[0] if trusted else []))
        metrics: dict[str, RunMetrics] = {name: evaluate_run(run) for name, run in loaded.items()}
        metric_table = {
            field_name: {name: _Scores(metrics[name].fields[field_name].metric, metrics[name].fields[field_name].scores,
                                       metrics[name].fields[field_name].groups)
                         for name in names}
            for field_name in schema.FIELD_NAMES
        }
        if judge_obj is not None:
            judgments = {name: judge_obj.judge(items[name], desc=f"judging {name}") for name in names}
            if trusted:
                trust_section = judge_trust(judge_obj, list(loaded.values()), judgments, metrics, trust)
            usage = judge_obj.usage_of(all_items)
    finally:
        if own_judge:
            judge_obj.close()
    if judge_obj is not None:
        arrays = {name: score_arrays(run_judgments, clip_ids) for name, run_judgments in judgments.items()}
        judge_table = {field_name: {name: _Scores("judge_score", arrays[name][field_name]) for name in names}
                       for field_name in schema.FIELD_NAMES}
        statuses = {name: Counter((judgment.field, judgment.status) for judgment in judgments[name]) for name in names}
        judge_section = {
            **judge_obj.describe(),
            "fields": {field_name: {name: {status: statuses[name][(field_name, status)]
                                           for status in ("scored", "unscored", "missing", "failed")}
                                    for name in names}
                       for field_name in schema.FIELD_NAMES},
            "this_run": asdict(judge_obj.total),
            "all_calls": usage,
        }

    headline = judge_table or metric_table
    metric_fields = {name: metrics[name].to_dict()["fields"] for name in names}
    results: dict[str, Any] = {
        "runs": names,
        "baseline": names[0],
        "clips": len(clip_ids),
        # a Hub id as given; a local folder by its name only, so results.json can be published as is
        "references": Path(references).name if Path(references).exists() else str(references),
        "split": split,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "headline": "judge" if judge_table else "deterministic",
        "confidence": CONFIDENCE,
        "bootstrap_samples": bootstrap_samples,
        "seed": seed,
        "fields": {field_name: {name: _estimate(headline[field_name][name], bootstrap_samples, seed) for name in names}
                   for field_name in schema.FIELD_NAMES},
        "comparisons": _comparisons("judge", judge_table, names, bootstrap_samples, seed) if judge_table else [],
        "deterministic": {
            field_name: {name: {**_estimate(metric_table[field_name][name], bootstrap_samples, seed),
                                "metrics": metric_fields[name][field_name]}
                         for name in names}
            for field_name in schema.FIELD_NAMES
        },
        "judge": judge_section,
        "trust": trust_section,
        "calibration": calibration_report(loaded),
        "runs_summary": {
            name: {"json_valid_rate": metrics[name].json_valid_rate, "missing_clips": loaded[name].missing,
                   "extra_clips": loaded[name].extra, "problems": [str(problem) for problem in loaded[name].problems],
                   "missing_rate": {field_name: metrics[name].fields[field_name].metrics["missing_rate"]
                                    for field_name in schema.FIELD_NAMES}}
            for name in names
        },
        "problems": [str(problem) for problem in problems],
    }
    results["comparisons"] += _comparisons("deterministic", metric_table, names, bootstrap_samples, seed)

    charts = {}
    if judge_table:
        charts["judge_scores.png"] = _chart(results["fields"], names, f"judge score ({JUDGE_SCALE})", SCORE_RANGE,
                                            "LLM-judge score per field")
    charts["deterministic.png"] = _chart(results["deterministic"], names, "score (0-1)", (0, 1), "Deterministic headline metric per field")
    if results["calibration"]["runs"]:
        charts["reliability.png"] = reliability_chart(results["calibration"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file_name, png in charts.items():
        (out / file_name).write_bytes(png)
    # a chart an earlier comparison drew here and this one does not (run without --judge, or without confidence)
    # would be read, and published, as this run's; only compare's own names, never a user's other files
    for file_name in set(CHARTS) - set(charts):
        (out / file_name).unlink(missing_ok=True)
    records = _per_clip(loaded, metrics, judgments, clip_ids)
    with (out / "per_clip.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    results["artifacts"] = {"report_html": "report.html", "report_md": "report.md", "charts": list(charts),
                            "per_clip": "per_clip.jsonl"}
    tables = _tables(results)
    (out / "report.md").write_text(_markdown(results, tables), encoding="utf-8")
    (out / "report.html").write_text(_html(results, tables, charts, _disagreements(records, names, disagreements)),
                                     encoding="utf-8")
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return results


# --------------------------------------------------------------------------- artefacts


def _chart(section: Mapping[str, Mapping[str, Mapping]], names: list[str], ylabel: str, ylim: tuple[float, float], title: str) -> bytes:
    """Grouped bar chart as PNG bytes: fields on x, one bar per run, 95% interval whiskers."""
    from matplotlib.figure import Figure

    fields = list(section)
    bar_width = 0.8 / len(names)
    positions = np.arange(len(fields))
    figure = Figure(figsize=(max(8, 0.9 * len(fields) + 2), 5.5))
    axes = figure.subplots()
    for run_index, name in enumerate(names):
        entries = [section[field_name][name] for field_name in fields]
        values = np.array([np.nan if entry["value"] is None else entry["value"] for entry in entries])
        below = np.array([0 if entry["ci_low"] is None else entry["value"] - entry["ci_low"] for entry in entries])
        above = np.array([0 if entry["ci_high"] is None else entry["ci_high"] - entry["value"] for entry in entries])
        offset = (run_index - (len(names) - 1) / 2) * bar_width
        axes.bar(positions + offset, values, bar_width, yerr=np.vstack([below, above]), capsize=2, label=name)
    metric_names = [section[field_name][names[0]]["metric"] for field_name in fields]
    labels = fields if len(set(metric_names)) == 1 else [
        f"{field_name} ({metric})" for field_name, metric in zip(fields, metric_names)]
    axes.set_xticks(positions, labels, rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
    axes.set_ylim(ylim[0], ylim[1] + 0.04 * (ylim[1] - ylim[0]))  # room for whiskers that reach the top
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return png_bytes(figure, dpi=110)


def _per_clip(loaded: Mapping[str, Run], metrics: Mapping[str, RunMetrics], judgments: Mapping[str, list],
              clip_ids: list[str]) -> list[dict[str, Any]]:
    first_judgments = {(name, judgment.clip_id, judgment.field): judgment
                       for name, run_judgments in judgments.items() for judgment in run_judgments if judgment.repeat == 0}
    references = next(iter(loaded.values())).references  # every run holds the same references
    records = []
    for clip_index, clip in enumerate(clip_ids):
        for field_name in schema.FIELD_NAMES:
            reference = references[clip][field_name]
            for name, run in loaded.items():
                prediction = run.predictions[clip]
                judgment = first_judgments.get((name, clip, field_name))
                field_metrics = metrics[name].fields[field_name]
                records.append({
                    "clip_id": clip, "field": field_name, "run": name,
                    "reference": reference,
                    "prediction": prediction.label.get(field_name) if prediction.has(field_name) else None,
                    "answered": prediction.has(field_name),
                    "score": float(field_metrics.scores[clip_index]), "metric": field_metrics.metric,
                    "judge_score": judgment.score if judgment else None,
                    "judge_status": judgment.status if judgment else None,
                    "judge_reason": judgment.reason if judgment else None,
                })
    return records


def _disagreements(records: list[dict], names: list[str], limit: int) -> dict[str, list[dict]]:
    """Per field, the clips where runs differ most from each other, then score lowest (judge first)."""
    by_clip: dict[tuple[str, str], dict[str, dict]] = {}
    for record in records:
        by_clip.setdefault((record["field"], record["clip_id"]), {})[record["run"]] = record
    browser: dict[str, list[dict]] = {field_name: [] for field_name in schema.FIELD_NAMES}
    for (field_name, clip), per_run in by_clip.items():
        # judge scores mapped to 0-1 where present, else the deterministic score
        values = [(per_run[name]["judge_score"] - 1) / 4 if per_run[name]["judge_score"] is not None else per_run[name]["score"]
                  for name in names]
        runs = [{"run": name,
                 "answer": render_value(per_run[name]["prediction"]) if per_run[name]["answered"] else "(no answer)",
                 **{key: per_run[name][key] for key in ("score", "metric", "judge_score", "judge_reason")}}
                for name in names]
        browser[field_name].append({"clip_id": clip, "reference": render_value(per_run[names[0]]["reference"]),
                                    "spread": max(values) - min(values), "mean": float(np.mean(values)), "runs": runs})
    for field_name, rows in browser.items():
        rows.sort(key=lambda row: (-row["spread"], row["mean"], row["clip_id"]))
        browser[field_name] = [row for row in rows if row["spread"] > 0 or row["mean"] < 1][:limit]
    return browser


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(entry: Mapping) -> str:
    if entry["value"] is None:
        return "n/a"
    return f"{_fmt(entry['value'])} [{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"


def _most_missing(rates: Mapping[str, float], top: int = 3) -> str:
    worst = sorted(((rate, field_name) for field_name, rate in rates.items() if rate > 0), reverse=True)[:top]
    return ", ".join(f"{field_name} ({rate:.1%})" for rate, field_name in worst) or "none"


def _tables(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each table once as (title, header, rows); Markdown and HTML render the same data."""
    names = results["runs"]
    tables = {}

    def score_table(title: str, section: Mapping, source: str) -> dict:
        against_baseline = {(comparison["field"], comparison["run"]): comparison
                            for comparison in results["comparisons"] if comparison["source"] == source}
        header = ["field", "metric", *names]
        for name in names[1:]:
            header += [f"{name} - {names[0]}", "p", "W/T/L"]
        rows = []
        for field_name, per_run in section.items():
            row = [field_name, per_run[names[0]]["metric"], *(_interval(per_run[name]) for name in names)]
            for name in names[1:]:
                comparison = against_baseline[(field_name, name)]
                diff = ("n/a" if comparison["diff"] is None else
                        f"{comparison['diff']:+.3f} [{_fmt(comparison['ci_low'])}, {_fmt(comparison['ci_high'])}]")
                row += [diff, _fmt(comparison["p_value"]),
                        f"{comparison['wins']}/{comparison['ties']}/{comparison['losses']}"]
            rows.append(row)
        return {"title": title, "header": header, "rows": rows}

    if results["headline"] == "judge":
        tables["judge"] = score_table(f"LLM-judge score ({JUDGE_SCALE}, mean with {results['confidence']:.0%} interval)",
                                      results["fields"], "judge")
    tables["deterministic"] = score_table("Deterministic headline metric (0-1; missing answers count as wrong)",
                                          results["deterministic"], "deterministic")
    summary = results["runs_summary"]
    tables["validity"] = {
        "title": "Output validity",
        "header": ["run", "JSON valid", "clips without prediction", "fields most often missing"],
        "rows": [[name, f"{run['json_valid_rate']:.1%}", str(len(run["missing_clips"])), _most_missing(run["missing_rate"])]
                 for name, run in summary.items()],
    }
    baselines = []
    for field_name, per_run in results["deterministic"].items():
        metrics = per_run[names[0]]["metrics"]
        if "majority_baseline" in metrics:
            shown = {metric: value for metric, value in metrics["majority_baseline"].items() if isinstance(value, (int, float))}
            baselines.append([
                field_name, str(metrics["majority_class"]),
                ", ".join(f"{metric} {_fmt(value)}" for metric, value in shown.items()),
                *(", ".join(f"{metric} {_fmt(per_run[name]['metrics'].get(metric))}" for metric in shown) for name in names),
            ])
    tables["majority"] = {"title": "Against always answering the majority class", "header": ["field", "majority", "majority scores", *names],
                          "rows": baselines}
    tables |= _calibration_table(results["calibration"])
    if results["trust"]:
        tables["trust"] = trust_table(results["trust"])
    return tables


def trust_table(trust: Mapping[str, Any]) -> dict[str, Any]:
    """The judge-trust checks (eval/trust.py) as a table: the report's, and the model card's from results.json."""
    rows = []
    for field_name, checks in trust["fields"].items():
        rows.append([field_name, checks["verdict"], _fmt(checks["identity"]["mean"], 2), _fmt(checks["shuffled"]["mean"], 2),
                     _fmt(checks["swap"]["mean_abs_diff"], 2), _fmt(checks["repeat"]["mean_std"], 2),
                     _fmt(checks["agreement"]["spearman"], 2), "; ".join(checks["reasons"])])
    return {"title": f"Judge trust ({trust['clips']} clips, {trust['repeats']} repeats)",
            "header": ["field", "verdict", f"identity ({SCORE_RANGE[1]})", "shuffled (low)", "swap |diff|",
                       "repeat std", "Spearman vs metric", "why doubtful"],
            "rows": rows}


def _calibration_table(section: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """ECE per closed-set field and run with confidence: the model's own (raw) and, for calibrated records, after."""
    runs = section["runs"]
    if not runs:
        return {}
    header, columns = ["field"], []
    for name, run in runs.items():
        kinds = ("raw", "calibrated") if run["calibrated"] else ("raw",)
        header += [f"{name} accuracy"] + [f"{name} {kind} mean p / ECE" if run["calibrated"] else f"{name} mean p / ECE"
                                          for kind in kinds]
        columns.append((name, kinds))
    fields = [name for name in schema.FIELD_NAMES if any(name in run["fields"] for run in runs.values())]
    rows = []
    for field_name in fields:
        row = [field_name]
        for name, kinds in columns:
            entry = runs[name]["fields"].get(field_name)
            row += [f"{entry['accuracy']:.3f} (n={entry['n']})" if entry else "n/a"]
            row += [f"{entry[kind]['mean_confidence']:.3f} / {entry[kind]['ece']:.3f}" if entry else "n/a" for kind in kinds]
        rows.append(row)
    mean_row = ["mean ECE"]
    for name, kinds in columns:
        mean_row += [""] + [f"{runs[name]['mean_ece'][kind]:.3f}" for kind in kinds]
    rows.append(mean_row)
    title = (f"Calibration of closed-set confidence (ECE over {section['bins']} equal-width bins; raw: the model's own "
             "probability, calibrated: after the model's calibration.json)")
    return {"calibration": {"title": title, "header": header, "rows": rows}}


def _markdown(results: Mapping[str, Any], tables: Mapping[str, Mapping]) -> str:
    lines = [f"# Evaluation: {', '.join(results['runs'])}", "",
             f"{results['clips']} clips from `{results['references']}` ({results['split']}); baseline `{results['baseline']}`. "
             f"Intervals: {results['confidence']:.0%} bootstrap ({results['bootstrap_samples']} resamples, seed {results['seed']}); "
             "p: paired permutation test; W/T/L: clips where the run scores higher / equal / lower than the baseline.", ""]
    if results["judge"]:
        judge, calls = results["judge"], results["judge"]["all_calls"]
        cost = "unknown" if calls["cost_usd"] is None else f"${calls['cost_usd']:.2f}"
        lines += [f"Judge: `{judge['model']}` (prompt {judge['prompt_sha']}), {calls['prompt_tokens']} prompt + "
                  f"{calls['completion_tokens']} completion tokens, cost {cost}.", ""]
    for table in tables.values():
        lines += [f"## {table['title']}", "", markdown_table(table["header"], table["rows"]), ""]
    return "\n".join(lines)


def _html(results: Mapping[str, Any], tables: Mapping[str, Mapping], charts: Mapping[str, bytes],
          browser: Mapping[str, list]) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(TEMPLATE.read_text(encoding="utf-8"))
    images = {name: base64.b64encode(png).decode() for name, png in charts.items()}
    return template.render(results=results, tables=tables, images=images, browser=browser)


# --------------------------------------------------------------------------- command line


@dataclass
class CompareArguments:
    runs: list[str] = field(metadata={"help": "runs as NAME=PATH (captions folder/jsonl or label folder); the first is the baseline"})
    references: str = field(metadata={"help": REFERENCES_HELP})
    output_dir: str = field(metadata={"help": "where results.json, report.md, report.html and the charts are written"})
    split: str = field(default="test", metadata={"help": SPLIT_HELP})
    judge: bool = field(default=False, metadata={"help": "score the answers with the LLM judge too (see the judge_* options)"})
    trust_clips: int = field(default=30, metadata={"help": "clips sampled for the judge-trust checks (0: skip them)"})
    trust_repeats: int = field(default=3, metadata={"help": "judgments per item for the repeat-variance check"})
    bootstrap_samples: int = field(default=1000, metadata={"help": "bootstrap resamples and permutations per statistic"})
    seed: int = field(default=0, metadata={"help": "seed of resampling and of the trust sample"})
    disagreements: int = field(default=20, metadata={"help": "clips per field in the report's disagreement browser"})

    def __post_init__(self):
        check_references(self)


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    types = [CompareArguments, JudgeConfig]
    if subparsers is not None:
        return subparsers.add_parser("compare", dataclass_types=types)
    return ArgumentParser(dataclass_types=types, prog="avlabel compare")


def parse_runs(entries: list[str]) -> dict[str, str]:
    from avlabel.core.parser import check_path  # the parser imports TRL: not for a library import of compare

    runs = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--runs expects NAME=PATH, got {entry!r}")
        if name in runs:
            raise UsageError(f"--runs names {name!r} twice")
        check_path(path, f"--runs {entry}")
        runs[name] = path
    return runs


def main(args: CompareArguments, config: JudgeConfig) -> dict[str, Any]:
    try:
        results = compare_runs(
            parse_runs(args.runs), args.references, args.output_dir, judge=config if args.judge else None,
            split=args.split, seed=args.seed, bootstrap_samples=args.bootstrap_samples,
            trust=TrustConfig(clips=args.trust_clips, repeats=args.trust_repeats, seed=args.seed),
            disagreements=args.disagreements,
        )
    except KeyboardInterrupt:
        print("\ninterrupted: judgments received so far are cached; run the same command again to continue", file=sys.stderr)
        raise SystemExit(130)
    print(_markdown(results, _tables(results)))
    print(f"wrote {Path(args.output_dir) / 'report.html'} and results.json")
    return results


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("compare")
