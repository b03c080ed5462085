"""Bootstrap statistics, the comparison report, and the `evaluate` metric module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from avlabel.core import schema
from avlabel.eval import compare
from avlabel.eval.judge import JudgeConfig
from avlabel.eval.stats import bootstrap, paired, statistic

sys.path.insert(0, str(Path(__file__).parent))
from eval_labels import perturbed, random_label, write_labels  # noqa: E402
from openai_server import OpenAIServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_group_statistic_is_balanced_accuracy():
    correct = np.array([1, 1, 0, 1, 0, np.nan])
    groups = np.array([0, 0, 1, 1, 1, 1])  # class 0: 2/2 right; class 1: 1/3 right, one unscored
    assert statistic(correct) == pytest.approx(3 / 5)
    assert statistic(correct, groups) == pytest.approx((1 + 1 / 3) / 2)


def test_bootstrap_is_reproducible_with_a_seed():
    scores = np.random.default_rng(0).integers(1, 6, size=200).astype(float)
    first, again, other = bootstrap(scores, seed=7), bootstrap(scores, seed=7), bootstrap(scores, seed=8)
    assert first == again
    assert (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)
    assert first.value == pytest.approx(scores.mean()) and first.ci_low < first.value < first.ci_high
    # roughly mean +- 1.96 standard errors
    se = scores.std() / np.sqrt(len(scores))
    assert first.ci_high - first.ci_low == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert bootstrap(np.array([np.nan, np.nan])).value is None


def test_paired_test_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    base = rng.integers(1, 6, size=150).astype(float)
    better = np.minimum(base + (rng.random(150) < 0.4), 5)
    result = paired(better, base, seed=0)
    assert result["diff"] > 0 and result["ci_low"] > 0 and result["p_value"] < 0.01
    assert result["losses"] == 0 and result["wins"] + result["ties"] == 150
    noise = paired(rng.permutation(base), base, seed=0)
    assert noise["ci_low"] < 0 < noise["ci_high"] and noise["p_value"] > 0.05
    assert paired(better, base, seed=0) == result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """40 reference clips, a weak baseline that always says "False", and a better model missing two clips."""
    root = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(0)
    references = {f"clip{i:03d}": random_label(rng) for i in range(40)}
    for i, label in enumerate(references.values()):
        label["rule_violation"] = "True" if i % 4 == 0 else "False"
    baseline = {k: {**perturbed(v, rng, 0.6), "rule_violation": "False"} for k, v in references.items()}
    tuned = {k: perturbed(v, rng, 0.15) for k, v in list(references.items())[:38]}
    write_labels(root / "refs" / "metas", references)
    write_labels(root / "baseline", baseline)
    write_labels(root / "tuned", tuned)
    return root


def _check_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 400
    return image


def test_deterministic_report(runs, tmp_path):
    out = tmp_path / "report"
    results = compare.compare_runs({"baseline": runs / "baseline", "tuned": runs / "tuned"}, runs / "refs", out,
                                   bootstrap_samples=300)
    assert results["runs"] == ["baseline", "tuned"] and results["clips"] == 40 and results["judge"] is None
    assert results["headline"] == "deterministic" and results["trust"] is None
    assert set(results["fields"]) == set(schema.FIELD_NAMES)
    # the recipe's trap: always "False" looks accurate, balanced accuracy shows chance
    rv = results["deterministic"]["rule_violation"]["baseline"]
    assert rv["metric"] == "balanced_accuracy" and rv["value"] == pytest.approx(0.5)
    assert rv["metrics"]["accuracy"] == pytest.approx(0.75) and rv["metrics"]["mcc"] == 0
    entry = results["fields"]["weather"]["tuned"]
    assert set(entry) == {"metric", "value", "ci_low", "ci_high", "n"} and entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    assert results["runs_summary"]["tuned"]["missing_clips"] == ["clip038", "clip039"]
    weather = next(c for c in results["comparisons"] if c["field"] == "weather" and c["source"] == "deterministic")
    assert weather["run"] == "tuned" and weather["baseline"] == "baseline" and weather["diff"] > 0
    assert weather["wins"] + weather["ties"] + weather["losses"] == 40

    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert not (out / "judge_scores.png").exists()
    _check_png(out / "deterministic.png")
    markdown = (out / "report.md").read_text()
    assert "| rule_violation | balanced_accuracy | 0.500 [" in markdown
    html = (out / "report.html").read_text()
    assert html.count("<table>") >= 4 and "Output validity" in html and "Judge trust" not in html
    assert "clip038" in html  # the missing clip shows up in the disagreement browser
    records = [json.loads(line) for line in (out / "per_clip.jsonl").read_text().splitlines()]
    assert len(records) == results["clips"] * len(schema.FIELD_NAMES) * len(results["runs"])


def test_judged_report_with_trust_and_command_line(runs, tmp_path, capsys):
    with OpenAIServer() as srv:
        args = compare.CompareArguments(runs=[f"baseline={runs / 'baseline'}", f"tuned={runs / 'tuned'}"],
                                        references=str(runs / "refs"), output_dir=str(tmp_path / "out"), judge=True,
                                        trust_clips=8, trust_repeats=2, bootstrap_samples=200)
        config = JudgeConfig(judge_base_url=srv.base_url, judge_api_key="test", judge_per_clip=True,
                             judge_cache=str(tmp_path / "cache.sqlite"), judge_progress=False)
        results = compare.main(args, config)
        calls = len(srv.requests)
        assert results["judge"]["this_run"]["calls"] == calls
        again = compare.main(args, config)  # everything from the cache
        assert len(srv.requests) == calls and again["judge"]["this_run"]["calls"] == 0
    out = tmp_path / "out"
    assert results["headline"] == "judge"
    assert results["judge"]["model"] == "gpt-5" and len(results["judge"]["prompt_sha"]) == 12
    assert results["judge"]["all_calls"]["cost_usd"] > 0  # gpt-5 is in the default price table
    tuned, base = results["fields"]["safety_analysis"]["tuned"], results["fields"]["safety_analysis"]["baseline"]
    assert tuned["metric"] == "judge_score" and 1 <= base["value"] < tuned["value"] <= 5
    assert results["judge"]["fields"]["weather"]["tuned"]["missing"] == 2  # the two clips without a prediction
    assert set(results["trust"]["fields"]["weather"]) >= {"identity", "shuffled", "swap", "repeat", "agreement", "verdict"}
    assert results["trust"]["fields"]["weather"]["verdict"] == "trustworthy"
    _check_png(out / "judge_scores.png")
    html = (out / "report.html").read_text()
    assert "Judge trust" in html and 'class="trustworthy"' in html and "judge's reason" in html
    assert "data:image/png;base64," in html and html.count("<img") == 2
    assert "LLM-judge score" in capsys.readouterr().out


def test_judging_without_a_key_stops_before_any_work_unless_the_cache_answers(runs, tmp_path):
    """`avlabel compare --judge true` with no API key: when some judgment needs a call, one line and nothing
    else (no progress bar, no request, no output folder); when the cache holds them all, no key is needed."""
    environment = {name: value for name, value in os.environ.items() if name not in ("OPENAI_API_KEY", "AVLABEL_DEBUG")}
    environment["PYTHONPATH"] = str(REPO)

    def compare_command(server, out: str, trust_clips: int, key: bool):
        command = [sys.executable, "-m", "avlabel", "compare", "--runs", f"baseline={runs / 'baseline'}",
                   f"tuned={runs / 'tuned'}", "--references", str(runs / "refs"), "--output_dir", str(tmp_path / out),
                   "--judge", "true", "--judge_per_clip", "true", "--judge_base_url", server.base_url,
                   "--judge_cache", str(tmp_path / "cache.sqlite"), "--trust_clips", str(trust_clips),
                   "--trust_repeats", "2", "--bootstrap_samples", "50", *(["--judge_api_key", "test"] if key else [])]
        return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)

    def refused(done, out: str):
        """Reading the runs (its one warning) and then the error line: no progress bar, no output folder."""
        assert done.returncode == 1 and done.stderr.splitlines() == [
            "tuned: 2 clip(s) have no prediction (scored as missing): clip038, clip039",
            "avlabel compare: error: no API key for the judge: set OPENAI_API_KEY or --judge_api_key "
            "(any string for a local server that ignores it)"], done.stderr[-2000:]
        assert not (tmp_path / out).exists()

    with OpenAIServer() as srv:
        refused(compare_command(srv, "first", 4, key=False), "first")  # nothing cached: no judging starts
        assert srv.requests == []
        judged = compare_command(srv, "judged", 0, key=True)  # the runs' judgments, no trust checks
        assert judged.returncode == 0 and "judging baseline" in judged.stderr, judged.stderr[-2000:]  # bars show
        calls = len(srv.requests)
        # the runs' judgments are cached, the trust checks' are not: refused before they start
        refused(compare_command(srv, "trust", 4, key=False), "trust")
        assert len(srv.requests) == calls
        assert compare_command(srv, "trusted", 4, key=True).returncode == 0
        calls = len(srv.requests)
        again = compare_command(srv, "again", 4, key=False)  # every judgment from the cache: no key needed
        assert again.returncode == 0, again.stderr[-2000:]
        assert len(srv.requests) == calls and (tmp_path / "again" / "results.json").exists()
    assert json.loads((tmp_path / "again" / "results.json").read_text())["judge"]["this_run"]["calls"] == 0


@pytest.mark.slow
def test_evaluate_load_of_the_metric_folder(tmp_path):
    """`evaluate.load(folder)` offline, in a fresh process with its own HF_HOME, with and without a judge."""
    reference = (REPO / "tests" / "fixtures" / "reference.label.json").read_text()
    script = """
import json, sys, evaluate
metric = evaluate.load(sys.argv[1])
reference, base_url, cache = sys.argv[2:]
prediction = json.dumps({**json.loads(reference), "weather": "Overcast", "rule_violation": "True"})
plain = metric.compute(predictions=[reference, prediction, "not json"], references=[reference] * 3)
# a label file as tools write it: a byte-order mark, and a key beyond the schema (a Label Studio review note)
exported = "\ufeff" + json.dumps({**json.loads(reference), "review": {"source": "label-studio"}})
as_exported = metric.compute(predictions=[reference, prediction, "not json"], references=[exported] * 3)
judged = metric.compute(predictions=[reference, prediction], references=[reference] * 2,
                        judge={"judge_base_url": base_url, "judge_api_key": "t", "judge_cache": cache, "judge_progress": False})
print(json.dumps({"plain": plain, "as_exported": as_exported, "judged": judged}))
"""
    with OpenAIServer() as srv:
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", script, str(REPO / "eval" / "av_label_metric"), reference,
                               srv.base_url, str(tmp_path / "cache.sqlite")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    plain, judged = out["plain"], out["judged"]
    assert (tmp_path / "hf" / "modules").is_dir()
    assert plain["n"] == 3 and plain["json_valid_rate"] == pytest.approx(2 / 3)
    assert out["as_exported"] == plain  # read as `avlabel metrics` reads label files
    documented = {  # README.md's table, per kind
        "category": ["accuracy", "majority_class", "majority_baseline/accuracy", "confusion_matrix"],
        "multi_category": ["f1", "exact_match", "micro_precision", "micro_recall", "micro_f1", "empty_set_baseline/f1"],
        "difficulty": ["accuracy", "mae", "qwk", "majority_class", "majority_baseline/accuracy", "majority_baseline/mae", "confusion_matrix"],
        "boolean": ["accuracy", "balanced_accuracy", "f1_true", "mcc", "positive_rate_reference", "majority_class",
                    "majority_baseline/accuracy", "majority_baseline/balanced_accuracy", "majority_baseline/f1_true", "majority_baseline/mcc"],
        "text": ["sentence_chrf", "text_pairs", "bleu", "chrf", "rougeL"],
    }
    readme = (REPO / "eval" / "av_label_metric" / "README.md").read_text()
    for spec in schema.FIELDS:
        keys = ["n", "answered", "missing_rate", *documented[spec.kind]]
        if spec.kind == "text" and spec.nullable:
            keys += ["null_agreement", "null_rate_reference"]
        assert {f"{spec.name}/{k}" for k in keys} <= set(plain), spec.name
        assert all(f"F/{k.split('/')[0]}" in readme for k in keys)
    assert plain["weather/accuracy"] == pytest.approx(1 / 3)  # right, wrong, missing
    assert plain["rule_violation/accuracy"] == pytest.approx(1 / 3)
    assert judged["weather/judge_score"] < 5 and judged["lighting/judge_score"] == 5
    assert judged["judge/model"] == "gpt-5" and judged["judge/calls"] > 0 and judged["judge/cost_usd"] > 0


def test_a_second_comparison_into_the_folder_leaves_no_chart_of_the_first(runs, tmp_path):
    """A judged comparison, then one without --judge into the same folder: the judge's chart goes (publish would
    carry it as this run's), a user's own file stays."""
    from avlabel.hub.publish import publish_eval

    out = tmp_path / "out"
    run_paths = {"baseline": runs / "baseline", "tuned": runs / "tuned"}
    with OpenAIServer() as srv:
        judged = compare.compare_runs(run_paths, runs / "refs", out, bootstrap_samples=50, trust=None,
                             judge=JudgeConfig(judge_base_url=srv.base_url, judge_api_key="test", judge_progress=False,
                                               judge_cache=str(tmp_path / "cache.sqlite")))
    assert (out / "judge_scores.png").is_file() and set(judged["artifacts"]["charts"]) <= set(compare.CHARTS)
    (out / "notes.md").write_text("what I make of it\n")
    results = compare.compare_runs(run_paths, runs / "refs", out, bootstrap_samples=50)
    assert results["artifacts"]["charts"] == ["deterministic.png"]
    assert sorted(path.name for path in out.iterdir()) == [
        "deterministic.png", "notes.md", "per_clip.jsonl", "report.html", "report.md", "results.json"]
    published = publish_eval(out, "tester/eval-run", dry_run_dir=tmp_path / "dry_run")
    assert "judge_scores.png" not in published.files and "notes.md" in published.files
    assert not any(published.folder.rglob("judge_scores.png"))
