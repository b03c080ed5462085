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
    per_clip.jsonl      one record per clip, field and run: answers, scores, the judge's reason

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

from .data import (
    REFERENCES_HELP,
    SPLIT_HELP,
    Run,
    load_references,
    load_run,
    print_problems,
    render_value,
)
from .judge import Judge, JudgeConfig, JudgeError, run_items, score_arrays
from .metrics import RunMetrics, evaluate_run
from .stats import bootstrap, paired
from .trust import TrustConfig, judge_trust

CONFIDENCE = 0.95
TEMPLATE = Path(__file__).parent / "report.html.jinja"


@dataclass
class _Scores:
    """Per-clip scores of one field and run, and how to aggregate them."""

    metric: str
    scores: np.ndarray
    groups: np.ndarray | None = None


def _estimate(s: _Scores, samples: int, seed: int) -> dict[str, Any]:
    return {"metric": s.metric, **bootstrap(s.scores, s.groups, samples, seed, CONFIDENCE).to_dict()}


def _comparisons(source: str, table: Mapping[str, Mapping[str, _Scores]], names: list[str], samples: int, seed: int) -> list[dict]:
    baseline, out = names[0], []
    for name in names[1:]:
        for field_name in schema.FIELD_NAMES:
            a, b = table[field_name][name], table[field_name][baseline]
            out.append({"source": source, "field": field_name, "metric": a.metric, "run": name, "baseline": baseline,
                        **paired(a.scores, b.scores, a.groups, samples, seed, CONFIDENCE)})
    return out


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    refs, problems = load_references(references, split)
    if not refs:
        raise ValueError(f"{references}: no usable reference labels" + (f" ({problems[0]})" if problems else ""))
    loaded: dict[str, Run] = {}
    for name, path in runs.items():
        loaded[name] = load_run(name, path, refs)
        print_problems(loaded[name])
    for problem in problems:
        print(f"set aside: {problem}", file=sys.stderr)
    names = list(loaded)
    clip_ids = loaded[names[0]].clip_ids
    det: dict[str, RunMetrics] = {name: evaluate_run(run) for name, run in loaded.items()}
    det_table = {f: {n: _Scores(det[n].fields[f].metric, det[n].fields[f].scores, det[n].fields[f].groups) for n in names}
                 for f in schema.FIELD_NAMES}

    judge_section = trust_section = None
    judgments: dict[str, list] = {}
    judge_table = None
    if judge is not None:
        own_judge = not isinstance(judge, Judge)
        judge_obj = Judge(judge) if own_judge else judge
        try:
            items = {name: run_items(run) for name, run in loaded.items()}
            judgments = {name: judge_obj.judge(items[name], desc=f"judging {name}") for name in names}
            if trust is not None and trust.clips > 0:
                trust_section = judge_trust(judge_obj, list(loaded.values()), judgments, det, trust)
            usage = judge_obj.usage_of([item for run_list in items.values() for item in run_list])
        finally:
            if own_judge:
                judge_obj.close()
        arrays = {name: score_arrays(js, clip_ids) for name, js in judgments.items()}
        judge_table = {f: {n: _Scores("judge_score", arrays[n][f]) for n in names} for f in schema.FIELD_NAMES}
        statuses = {n: Counter((j.field, j.status) for j in judgments[n]) for n in names}
        judge_section = {
            **judge_obj.describe(),
            "fields": {f: {n: {status: statuses[n][(f, status)] for status in ("scored", "unscored", "missing", "failed")}
                           for n in names}
                       for f in schema.FIELD_NAMES},
            "this_run": asdict(judge_obj.total),
            "all_calls": usage,
        }

    headline = judge_table or det_table
    det_fields = {n: det[n].to_dict()["fields"] for n in names}
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
        "fields": {f: {n: _estimate(headline[f][n], bootstrap_samples, seed) for n in names} for f in schema.FIELD_NAMES},
        "comparisons": _comparisons("judge", judge_table, names, bootstrap_samples, seed) if judge_table else [],
        "deterministic": {
            f: {n: {**_estimate(det_table[f][n], bootstrap_samples, seed), "metrics": det_fields[n][f]}
                for n in names} for f in schema.FIELD_NAMES
        },
        "judge": judge_section,
        "trust": trust_section,
        "runs_summary": {
            n: {"json_valid_rate": det[n].json_valid_rate, "missing_clips": loaded[n].missing,
                "extra_clips": loaded[n].extra, "problems": [str(p) for p in loaded[n].problems],
                "missing_rate": {f: det[n].fields[f].metrics["missing_rate"] for f in schema.FIELD_NAMES}}
            for n in names
        },
        "problems": [str(p) for p in problems],
    }
    results["comparisons"] += _comparisons("deterministic", det_table, names, bootstrap_samples, seed)

    charts = {}
    if judge_table:
        charts["judge_scores.png"] = _chart(results["fields"], names, "judge score (1-5)", (1, 5), "LLM-judge score per field")
    charts["deterministic.png"] = _chart(results["deterministic"], names, "score (0-1)", (0, 1), "Deterministic headline metric per field")
    for file_name, png in charts.items():
        (out / file_name).write_bytes(png)
    records = _per_clip(loaded, det, judgments, clip_ids)
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
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = list(section)
    width = 0.8 / len(names)
    x = np.arange(len(fields))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(fields) + 2), 5.5))
    for i, name in enumerate(names):
        entries = [section[f][name] for f in fields]
        values = np.array([np.nan if e["value"] is None else e["value"] for e in entries])
        low = np.array([0 if e["ci_low"] is None else e["value"] - e["ci_low"] for e in entries])
        high = np.array([0 if e["ci_high"] is None else e["ci_high"] - e["value"] for e in entries])
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, yerr=np.vstack([low, high]), capsize=2, label=name)
    metrics = [section[f][names[0]]["metric"] for f in fields]
    labels = fields if len(set(metrics)) == 1 else [f"{f} ({m})" for f, m in zip(fields, metrics)]
    ax.set_xticks(x, labels, rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_ylim(ylim[0], ylim[1] + 0.04 * (ylim[1] - ylim[0]))  # room for whiskers that reach the top
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _per_clip(loaded: Mapping[str, Run], det: Mapping[str, RunMetrics], judgments: Mapping[str, list],
              clip_ids: list[str]) -> list[dict[str, Any]]:
    main = {(n, j.clip_id, j.field): j for n, js in judgments.items() for j in js if j.repeat == 0}
    references = next(iter(loaded.values())).references  # every run holds the same references
    records = []
    for i, clip in enumerate(clip_ids):
        for f in schema.FIELD_NAMES:
            reference = references[clip][f]
            for n, run in loaded.items():
                prediction = run.predictions[clip]
                j = main.get((n, clip, f))
                records.append({
                    "clip_id": clip, "field": f, "run": n,
                    "reference": reference,
                    "prediction": prediction.label.get(f) if prediction.has(f) else None,
                    "answered": prediction.has(f),
                    "score": float(det[n].fields[f].scores[i]), "metric": det[n].fields[f].metric,
                    "judge_score": j.score if j else None, "judge_status": j.status if j else None,
                    "judge_reason": j.reason if j else None,
                })
    return records


def _disagreements(records: list[dict], names: list[str], limit: int) -> dict[str, list[dict]]:
    """Per field, the clips where runs differ most from each other, then score lowest (judge first)."""
    by_clip: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        by_clip.setdefault((r["field"], r["clip_id"]), {})[r["run"]] = r
    browser: dict[str, list[dict]] = {f: [] for f in schema.FIELD_NAMES}
    for (f, clip), per_run in by_clip.items():
        # judge scores mapped to 0-1 where present, else the deterministic score
        values = [(per_run[n]["judge_score"] - 1) / 4 if per_run[n]["judge_score"] is not None else per_run[n]["score"]
                  for n in names]
        browser[f].append({"clip_id": clip, "reference": render_value(per_run[names[0]]["reference"]),
                           "spread": max(values) - min(values), "mean": float(np.mean(values)),
                           "runs": [{"run": n, "answer": render_value(per_run[n]["prediction"]) if per_run[n]["answered"] else "(no answer)",
                                     **{k: per_run[n][k] for k in ("score", "metric", "judge_score", "judge_reason")}}
                                    for n in names]})
    for f, rows in browser.items():
        rows.sort(key=lambda r: (-r["spread"], r["mean"], r["clip_id"]))
        browser[f] = [r for r in rows if r["spread"] > 0 or r["mean"] < 1][:limit]
    return browser


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(entry: Mapping) -> str:
    if entry["value"] is None:
        return "n/a"
    return f"{_fmt(entry['value'])} [{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"


def _most_missing(rates: Mapping[str, float], top: int = 3) -> str:
    worst = sorted(((rate, f) for f, rate in rates.items() if rate > 0), reverse=True)[:top]
    return ", ".join(f"{f} ({rate:.1%})" for rate, f in worst) or "none"


def _tables(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each table once as (title, header, rows); Markdown and HTML render the same data."""
    names = results["runs"]
    tables = {}

    def score_table(title: str, section: Mapping, source: str) -> dict:
        diffs = {(c["field"], c["run"]): c for c in results["comparisons"] if c["source"] == source}
        header = ["field", "metric", *names]
        for n in names[1:]:
            header += [f"{n} - {names[0]}", "p", "W/T/L"]
        rows = []
        for f, per_run in section.items():
            row = [f, per_run[names[0]]["metric"], *(_interval(per_run[n]) for n in names)]
            for n in names[1:]:
                c = diffs[(f, n)]
                diff = "n/a" if c["diff"] is None else f"{c['diff']:+.3f} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]"
                row += [diff, _fmt(c["p_value"]), f"{c['wins']}/{c['ties']}/{c['losses']}"]
            rows.append(row)
        return {"title": title, "header": header, "rows": rows}

    if results["headline"] == "judge":
        tables["judge"] = score_table(f"LLM-judge score (1-5, mean with {results['confidence']:.0%} interval)",
                                      results["fields"], "judge")
    tables["deterministic"] = score_table("Deterministic headline metric (0-1; missing answers count as wrong)",
                                          results["deterministic"], "deterministic")
    summary = results["runs_summary"]
    tables["validity"] = {
        "title": "Output validity",
        "header": ["run", "JSON valid", "clips without prediction", "fields most often missing"],
        "rows": [[n, f"{s['json_valid_rate']:.1%}", str(len(s["missing_clips"])), _most_missing(s["missing_rate"])]
                 for n, s in summary.items()],
    }
    baselines = []
    for f, per_run in results["deterministic"].items():
        metrics = per_run[names[0]]["metrics"]
        if "majority_baseline" in metrics:
            base = metrics["majority_baseline"]
            shown = {k: v for k, v in base.items() if isinstance(v, (int, float))}
            baselines.append([f, str(metrics["majority_class"]), ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items()),
                              *(", ".join(f"{k} {_fmt(per_run[n]['metrics'].get(k))}" for k in shown) for n in names)])
    tables["majority"] = {"title": "Against always answering the majority class", "header": ["field", "majority", "majority scores", *names],
                          "rows": baselines}
    if results["trust"]:
        rows = []
        for f, t in results["trust"]["fields"].items():
            rows.append([f, t["verdict"], _fmt(t["identity"]["mean"], 2), _fmt(t["shuffled"]["mean"], 2),
                         _fmt(t["swap"]["mean_abs_diff"], 2), _fmt(t["repeat"]["mean_std"], 2),
                         _fmt(t["agreement"]["spearman"], 2), "; ".join(t["reasons"])])
        tables["trust"] = {"title": f"Judge trust ({results['trust']['clips']} clips, {results['trust']['repeats']} repeats)",
                           "header": ["field", "verdict", "identity (5)", "shuffled (low)", "swap |diff|",
                                      "repeat std", "Spearman vs metric", "why doubtful"],
                           "rows": rows}
    return tables


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _markdown(results: Mapping[str, Any], tables: Mapping[str, Mapping]) -> str:
    lines = [f"# Evaluation: {', '.join(results['runs'])}", "",
             f"{results['clips']} clips from `{results['references']}` ({results['split']}); baseline `{results['baseline']}`. "
             f"Intervals: {results['confidence']:.0%} bootstrap ({results['bootstrap_samples']} resamples, seed {results['seed']}); "
             "p: paired permutation test; W/T/L: clips where the run scores higher / equal / lower than the baseline.", ""]
    if results["judge"]:
        j = results["judge"]
        cost = "unknown" if j["all_calls"]["cost_usd"] is None else f"${j['all_calls']['cost_usd']:.2f}"
        lines += [f"Judge: `{j['model']}` (prompt {j['prompt_sha']}), {j['all_calls']['prompt_tokens']} prompt + "
                  f"{j['all_calls']['completion_tokens']} completion tokens, cost {cost}.", ""]
    for table in tables.values():
        lines += [f"## {table['title']}", "", _markdown_row(table["header"]), "|" + "---|" * len(table["header"])]
        lines += [_markdown_row(row) for row in table["rows"]]
        lines.append("")
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


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    types = [CompareArguments, JudgeConfig]
    if subparsers is not None:
        return subparsers.add_parser("compare", dataclass_types=types)
    return ArgumentParser(dataclass_types=types)


def parse_runs(entries: list[str]) -> dict[str, str]:
    runs = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--runs expects NAME=PATH, got {entry!r}")
        if name in runs:
            raise SystemExit(f"--runs names {name!r} twice")
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
    except JudgeError as err:
        raise SystemExit(f"judge stopped: {err}")
    print(_markdown(results, _tables(results)))
    print(f"wrote {Path(args.output_dir) / 'report.html'} and results.json")
    return results


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("compare")
