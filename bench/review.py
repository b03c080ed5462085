"""Benchmark of `avlabel review`'s orders: how many of a run's wrong fields a person finds by reviewing part of it.

    python bench/review.py [--max_steps 12000] [--num_clips 4700] [--test_clips 1000]

The run: `avlabel demo` on `--num_clips` clips trained for `--max_steps` steps, a run whose tiny model still
gets fields wrong, but not everywhere. The demo itself (240 clips, 1,200 steps, left as it is) learns the
weather and the lighting but not the small objects that set the manoeuvres and the difficulty: it gets those
wrong on any clip, so its errors are spread and no order finds many more than a random one. Trained on more
clips for longer, the tiny model sees the objects on many clips, and more of its errors fall on the clips it is
unsure of; BENCHMARKS.md gives the runs between the two. The demo fits the fine-tuned model's confidence
calibration on clips of another seed and captions the test split with it; the queue reviews that run
(greedy decoding). A wrong field: a closed-set field whose answer differs from the human (here: synthetic)
label, or is missing. Free text is left out: it is almost never word for word the human's, so "wrong" would
mean nothing there.

Orders, each of every test clip, from `avlabel review`'s own ordering (avlabel/eval/review.py: `choose`):
  confidence                     the clips with the most expected wrong fields first (sum of 1 - calibrated p)
  confidence (uncalibrated)      the same on the model's own p (`confidence_raw`), to show what calibration adds
  disagreement (base)            differing closed fields against the untrained model's run
  disagreement (sample)          differing closed fields against a second caption of the same model,
                                 sampled at temperature 1
  random                         what a random order finds on average: k of n clips hold k/n of the wrong fields
  oracle                         the clips with the most wrong fields first: the most any order can find

Error capture at a share s of clips reviewed: wrong fields in the first ceil(s * clips) clips of the order
over all wrong fields. Each order's ratio to random at 20% comes with a 95% bootstrap interval over the test
clips (scipy.stats.bootstrap, percentile method): 300 test clips leave it about +-0.3 wide, 1,000 about +-0.15.
Writes bench/results/review.json and bench/results/review_capture.png (the curves). A CPU benchmark of what an
order finds, not of speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avlabel.core import schema  # noqa: E402
from avlabel.eval.data import load_references, load_run  # noqa: E402
from avlabel.eval.review import ReviewArguments, choose, same_answer  # noqa: E402

SHARES = (0.1, 0.2, 0.5)


def wrong_fields(run_dir: Path, dataset: Path) -> dict[str, int]:
    """clip id -> closed-set fields the run answers differently from the reference (or not at all)."""
    references, _ = load_references(dataset, "test")
    run = load_run("reviewed", run_dir, references)
    return {clip: sum(not run.predictions[clip].has(name)
                      or not same_answer(schema.FIELDS_BY_NAME[name], run.predictions[clip].label[name], references[clip][name])
                      for name in schema.CLOSED_FIELD_NAMES)
            for clip in run.clip_ids}


def review_order(captions: Path, other: Path | None = None) -> list[str]:
    """Every clip of the run, in `avlabel review`'s order (by disagreement with `other` when given)."""
    queue = choose(ReviewArguments(captions=str(captions), other=str(other) if other else None, budget="100%"))
    return [candidate.clip_id for candidate in queue.chosen]


def capture_curve(found: np.ndarray) -> np.ndarray:
    """Share of all wrong fields found after reviewing the first k clips, k = 0..clips, from each clip's count
    of wrong fields in review order (a resample without any wrong field finds none)."""
    cumulative = np.concatenate([[0], np.cumsum(found)])
    return cumulative / max(cumulative[-1], 1)


def random_curve(clips: int) -> np.ndarray:
    """What a random order finds on average: k of n clips hold k/n of the wrong fields."""
    return np.arange(clips + 1) / clips


def at_share(curve: np.ndarray, share: float) -> float:
    return float(curve[math.ceil((len(curve) - 1) * share)])  # `avlabel review --budget N%` takes ceil(N% of clips)


def ratio_to_random(found: np.ndarray, share: float = 0.2) -> float:
    return at_share(capture_curve(found), share) / at_share(random_curve(len(found)), share)


def ratio_interval(found: np.ndarray, share: float = 0.2) -> list[float]:
    """95% bootstrap interval of `ratio_to_random`, resampling the test clips (`found`: in review order)."""
    from scipy.stats import bootstrap

    def ratio(positions, counts):  # a resample keeps the order's ranking of the clips it drew
        return ratio_to_random(counts[np.argsort(positions, kind="stable")], share)

    result = bootstrap((np.arange(len(found)), found), ratio, paired=True, vectorized=False, n_resamples=2000,
                       method="percentile", random_state=0)
    return [round(float(result.confidence_interval.low), 2), round(float(result.confidence_interval.high), 2)]


def raw_confidence_run(captions: Path, target: Path) -> Path:
    """A copy of a calibrated run whose `confidence` is the model's own (`confidence_raw`)."""
    target.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in (captions / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        record["confidence"] = record.get("confidence_raw") or record.get("confidence")
        lines.append(json.dumps(record) + "\n")
    (target / "captions.jsonl").write_text("".join(lines), encoding="utf-8")
    return target


def sampled_run(demo: Path, seed: int) -> Path:
    """The test split captioned again by the fine-tuned model, sampled at temperature 1."""
    import yaml

    from avlabel.demo.run import DemoArguments
    from avlabel.infer.caption import CaptionArguments
    from avlabel.infer.caption import main as caption
    from avlabel.infer.settings import GenerationSettings

    recipe = yaml.safe_load(Path(DemoArguments.recipe).read_text())
    folder = demo / "captions" / f"fine-tuned-sample-{seed}"
    caption(CaptionArguments(input=str(demo / "dataset"), split="test", output_dir=str(folder), model=str(demo / "sft" / "merged"),
                             short_prompt=recipe.get("short_prompt", False), batch_size=16, num_workers=0),
            GenerationSettings(temperature=1.0, top_p=1.0, max_new_tokens=400, seed=seed))
    return folder


def plot(curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    from avlabel.core.charts import png_bytes

    figure = Figure(figsize=(6.5, 5))
    axes = figure.subplots()
    for name, curve in curves.items():
        reviewed = np.arange(len(curve)) / (len(curve) - 1)
        axes.plot(reviewed, curve, "--" if name.startswith(("random", "oracle")) else "-", label=name)
    for share in SHARES:
        axes.axvline(share, color="grey", linewidth=0.6, alpha=0.5)
    axes.set_xlabel("share of clips reviewed")
    axes.set_ylabel("share of wrong closed-set fields found")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.write_bytes(png_bytes(figure, dpi=110))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=12000,
                        help="training steps of the demo run (0: the demo's own, 24 epochs = 1,200 steps on 200 clips)")
    parser.add_argument("--num_clips", type=int, default=4700, help="synthetic clips of the demo run")
    parser.add_argument("--test_clips", type=int, default=1000, help="of them, held out and reviewed")
    parser.add_argument("--calibration_clips", type=int, default=40, help="clips of another seed the calibration is fitted on")
    parser.add_argument("--sample_seed", type=int, default=1, help="seed of the sampled second caption")
    parser.add_argument("--demo_dir", default=None, help="demo output folder (default: a temporary one); reused if finished")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "review.json"))
    args = parser.parse_args()

    from avlabel.demo.run import DemoArguments
    from avlabel.demo.run import main as demo

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.demo_dir or Path(tmp) / "demo_output")
        if not (out / "eval" / "results.json").is_file():
            demo(DemoArguments(output_dir=str(out), num_clips=args.num_clips, test_clips=args.test_clips,
                               calibration_clips=args.calibration_clips, max_steps=args.max_steps or None))
        reviewed = out / "captions" / "fine-tuned"
        wrong = wrong_fields(reviewed, out / "dataset")
        orders = {
            "confidence": review_order(reviewed),
            "confidence (uncalibrated)": review_order(raw_confidence_run(reviewed, Path(tmp) / "raw")),
            "disagreement (base)": review_order(reviewed, out / "captions" / "baseline"),
            "disagreement (sample)": review_order(reviewed, sampled_run(out, args.sample_seed)),
            "oracle": sorted(wrong, key=lambda clip: -wrong[clip]),
        }
        compare = json.loads((out / "eval" / "results.json").read_text())
    found = {name: np.array([wrong[clip] for clip in order]) for name, order in orders.items()}
    clips = list(wrong)
    curves = {name: capture_curve(counts) for name, counts in found.items()} | {"random": random_curve(len(clips))}

    capture = {name: {f"{share:.0%}": round(at_share(curve, share), 4) for share in SHARES} for name, curve in curves.items()}
    compared = [name for name in orders if name != "oracle"]
    ratio = {name: round(ratio_to_random(found[name]), 2) for name in compared}
    interval = {name: ratio_interval(found[name]) for name in compared}
    fine_tuned = compare["calibration"]["runs"]["fine-tuned"]
    results = {
        "device": f"CPU: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "date": date.today().isoformat(),
        "what": "share of all wrong closed-set fields of the reviewed run found after reviewing the first 10%, 20%, "
                "50% of its clips in each order (bench/review.py docstring)",
        "errors_from": (f"`avlabel demo --num_clips {args.num_clips} --test_clips {args.test_clips} --max_steps "
                        f"{args.max_steps}`: the tiny model's remaining errors" if args.max_steps else
                        "`avlabel demo` with its own training (24 epochs): its remaining errors"),
        "settings": {"max_steps": args.max_steps, "num_clips": args.num_clips, "test_clips": args.test_clips,
                     "calibration_clips": args.calibration_clips,
                     "sample": {"temperature": 1.0, "top_p": 1.0, "seed": args.sample_seed},
                     "family": DemoArguments.family, "decoding of the reviewed run": "greedy, calibrated confidence"},
        "clips": len(clips),
        "closed_fields": list(schema.CLOSED_FIELD_NAMES),
        "wrong_fields": sum(wrong.values()),
        "clips_with_a_wrong_field": sum(1 for n in wrong.values() if n),
        "capture": capture,
        "ratio_to_random_at_20%": ratio,
        "ratio_to_random_at_20%_95%_interval": interval,
        # the same demo run's test split, ECE over 10 equal-width bins: the model's own p and after the calibration
        # the demo fitted on `calibration_clips` clips of another seed
        "calibration_mean_ece": fine_tuned["mean_ece"],
        "calibration_ece": {name: {kind: round(entry[kind]["ece"], 4) for kind in ("raw", "calibrated") if kind in entry}
                            for name, entry in fine_tuned["fields"].items()},
        "curve": {name: [round(float(v), 4) for v in curve] for name, curve in curves.items()},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(curves, output.with_name(f"{output.stem}_capture.png"),
         f"Error capture on {len(clips)} test clips, tiny model after {args.max_steps or 'the demo default'} steps "
         f"({results['wrong_fields']} wrong closed-set fields)")
    print(json.dumps({key: value for key, value in results.items() if key != "curve"}, indent=2))


if __name__ == "__main__":
    main()
