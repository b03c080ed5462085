"""`avlabel demo`: the whole loop on this machine, with nothing downloaded.

    synthetic clips -> dataset -> tiny model -> baseline captions -> SFT -> confidence calibration
    on held-out clips -> captions again -> metrics (+ LLM judge when an endpoint is configured)
    -> report -> publish --dry_run -> catalog query

Everything runs on a CPU, in 5-10 minutes on 2 cores. The model is a *randomly initialised* tiny
Qwen2.5-VL (the architecture of Cosmos Reason 1; `--family qwen3_vl`: Qwen3-VL, Cosmos
Reason 2's) built locally, so the numbers show that the machinery learns what the pixels
show, not how good Cosmos Reason is.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from avlabel import recipes
from avlabel.core.calibration import CALIBRATION_FILE
from avlabel.core.errors import UsageError
from avlabel.core.records import CAPTIONS
from avlabel.families import FAMILIES

RECIPES = Path(recipes.__file__).parent  # recipes/ in a checkout, avlabel/recipes/ when installed
# The closed questions whose answers the synthetic pixels determine: the demo's yardstick.
VISUAL_FIELDS = ("weather", "lighting", "traffic_light")


@dataclass
class DemoArguments:
    output_dir: str = field(default="demo_output", metadata={"help": "Folder for every artifact of the demo."})
    num_clips: int = field(default=240, metadata={"help": "Synthetic clips to draw."})
    test_clips: int = field(default=40, metadata={"help": "Clips held out for captioning and scoring."})
    calibration_clips: int = field(
        default=40,
        metadata={"help": "Clips of another seed, outside the dataset, that the fine-tuned model's confidence calibration "
                  "is fitted on (0: no calibration)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the clips, the model and training."})
    family: str = field(
        default="qwen2_5_vl",
        metadata={"help": "Architecture of the tiny model: " + "; ".join(f"{name} for {f.title}" for name, f in FAMILIES.items()),
                  "choices": list(FAMILIES)},
    )
    recipe: str = field(default=str(RECIPES / "tiny" / "sft.yaml"), metadata={"help": "Training recipe for the tiny model."})
    max_steps: int | None = field(default=None, metadata={"help": "Cap the training steps (default: the recipe's epochs)."})
    judge_base_url: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible endpoint for the LLM judge (default OPENAI_BASE_URL; none: metrics only)."},
    )
    judge_model: str = field(default="gpt-5", metadata={"help": "Judge model name at that endpoint."})


def _step(title: str):
    print(f"\n\033[1m== {title}\033[0m", flush=True)
    return time.perf_counter()


def visual_accuracy(per_clip_path: Path, runs: list[str]) -> dict[str, dict[str, float]]:
    """Exact-match accuracy on the visual fields per run, and for always giving the most common answer."""
    rows = [json.loads(line) for line in per_clip_path.read_text().splitlines()]
    out: dict[str, dict[str, float]] = {}
    for name in VISUAL_FIELDS:
        mine = [r for r in rows if r["field"] == name]
        references = {r["clip_id"]: r["reference"] for r in mine}
        majority = Counter(references.values()).most_common(1)[0][0]
        out[name] = {"majority answer": sum(v == majority for v in references.values()) / len(references)}
        for run in runs:
            answers = [r for r in mine if r["run"] == run]
            out[name][run] = sum(r["answered"] and r["prediction"] == r["reference"] for r in answers) / len(answers)
    return out


def draw_clips(args: DemoArguments, out: Path, artifacts: dict[str, Path]) -> None:
    from avlabel.demo.synthetic import generate

    t = _step(f"1/8 Drawing {args.num_clips} synthetic dashcam clips")
    generate(out / "clips", num_clips=args.num_clips, seed=args.seed)
    artifacts["synthetic clips (recipe layout)"] = out / "clips"
    if args.calibration_clips:
        # another seed draws other clips: labeled, never trained on, and not the test split the report reads
        generate(out / "calibration_clips", num_clips=args.calibration_clips, seed=args.seed + 1)
    print(f"   {time.perf_counter() - t:.0f} s")


def build_dataset(args: DemoArguments, out: Path, artifacts: dict[str, Path]) -> Path:
    from avlabel.data_builder.build import BuildArguments, build, print_summary

    t = _step("2/8 Building the dataset")
    dataset = out / "dataset"
    result = build(BuildArguments(input=str(out / "clips"), output_dir=str(dataset), test_size=args.test_clips,
                                  pretty_name="Synthetic dashcam clips (avlabel demo)", license="apache-2.0"))
    print_summary(result)
    artifacts["dataset + card (load_dataset-ready)"] = dataset / "README.md"
    print(f"   {time.perf_counter() - t:.0f} s")
    return dataset


def build_base_model(args: DemoArguments, out: Path, artifacts: dict[str, Path]) -> Path:
    from avlabel.demo.tiny_model import build_tiny_model

    _step(f"3/8 Building a randomly initialised tiny {FAMILIES[args.family].title} (a test model, not Cosmos Reason)")
    base = build_tiny_model(out / "tiny-model", family=args.family, seed=args.seed)
    artifacts["tiny base model"] = base
    return base


def caption_recipe(args: DemoArguments) -> dict:
    """The tiny model's inference recipe (greedy decoding) with the prompt the training recipe trains on; the
    frames are the ones each model carries (its sampling_config.json)."""
    import yaml

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    infer_recipe = yaml.safe_load((RECIPES / "infer" / "tiny.yaml").read_text())
    return {**infer_recipe, "split": "test", "short_prompt": recipe.get("short_prompt", False), "seed": args.seed}


def caption_clips(recipe: dict, model: Path, clips: Path, folder: Path) -> Path:
    """Caption the test split of `clips` with `model` into `folder`, through caption's own parser."""
    from avlabel.infer.caption import main as caption
    from avlabel.infer.caption import make_parser as make_caption_parser

    caption(*make_caption_parser().parse_dict({
        **recipe, "input": str(clips), "output_dir": str(folder), "model": str(model),
    }))
    return folder


def caption_baseline(recipe: dict, base: Path, dataset: Path, out: Path) -> Path:
    t = _step("4/8 Captioning the held-out clips with the untrained model (baseline)")
    folder = caption_clips(recipe, base, dataset, out / "captions" / "baseline")
    print(f"   {time.perf_counter() - t:.0f} s")
    return folder


def fine_tune(args: DemoArguments, base: Path, dataset: Path, out: Path, artifacts: dict[str, Path]) -> Path:
    from avlabel.train.sft import train

    t = _step("5/8 Fine-tuning with TRL's SFTTrainer on the training split")
    overrides = {"model_name_or_path": str(base), "dataset_name": str(dataset), "output_dir": str(out / "sft"),
                 "seed": args.seed}
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    trained = train(args.recipe, overrides)
    artifacts["fine-tuned model (merged)"] = trained / "merged"
    artifacts["loss curve"] = trained / "loss_curve.png"
    print(f"   {time.perf_counter() - t:.0f} s")
    return trained


def calibrate_and_caption(args: DemoArguments, recipe: dict, trained: Path, dataset: Path, out: Path,
                          artifacts: dict[str, Path]) -> Path:
    from avlabel.eval.calibration import CalibrateArguments
    from avlabel.eval.calibration import main as calibrate

    t = _step("6/8 Calibrating the fine-tuned model's confidence on held-out clips, then captioning the test clips again")
    if args.calibration_clips:
        held_out = caption_clips(recipe, trained / "merged", out / "calibration_clips", out / "captions" / "calibration")
        try:
            calibrate(CalibrateArguments(captions=str(held_out), labels=str(out / "calibration_clips"), model=str(trained / "merged")))
            artifacts["confidence calibration"] = trained / "merged" / CALIBRATION_FILE
        except UsageError as err:  # a short run may answer too few fields to fit: the demo goes on uncalibrated
            print(f"   no calibration: {err}")
    folder = caption_clips(recipe, trained / "merged", dataset, out / "captions" / "fine-tuned")
    print(f"   {time.perf_counter() - t:.0f} s")
    return folder


def score_runs(args: DemoArguments, runs: dict[str, Path], dataset: Path, out: Path,
               artifacts: dict[str, Path]) -> tuple[dict, dict[str, dict[str, float]]]:
    """compare's results and the visual fields' accuracy of each run."""
    from avlabel.eval.compare import compare_runs
    from avlabel.eval.judge import JudgeConfig

    t = _step("7/8 Scoring both runs against the human (here: synthetic) labels")
    base_url = args.judge_base_url or os.environ.get("OPENAI_BASE_URL")
    judge = JudgeConfig(judge_base_url=base_url, judge_model=args.judge_model,
                        judge_cache=str(out / "judge_cache.sqlite")) if base_url else None
    if judge is None:
        print("   no judge endpoint configured: deterministic metrics only. To add the LLM judge, point "
              "--judge_base_url (or OPENAI_BASE_URL, with OPENAI_API_KEY) at any OpenAI-compatible server.")
    results = compare_runs({k: str(v) for k, v in runs.items()}, dataset, out / "eval", judge=judge)
    accuracy = visual_accuracy(out / "eval" / "per_clip.jsonl", list(runs))
    (out / "eval" / "visual_accuracy.json").write_text(json.dumps(accuracy, indent=2))
    calibration = results["calibration"]["runs"].get("fine-tuned")
    if calibration and calibration["calibrated"]:
        ece = calibration["mean_ece"]
        print(f"   fine-tuned confidence, mean ECE of the closed-set fields on the test clips: {ece['raw']:.3f} as the model "
              f"gives it, {ece['calibrated']:.3f} calibrated")
    print_accuracy(accuracy, list(runs))
    artifacts["report (HTML)"] = out / "eval" / "report.html"
    artifacts["results.json"] = out / "eval" / "results.json"
    print(f"   {time.perf_counter() - t:.0f} s")
    return results, accuracy


def print_accuracy(accuracy: dict[str, dict[str, float]], runs: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Exact-match accuracy on held-out clips")
    table.add_column("field")
    for column in ("majority answer", *runs):
        table.add_column(column, justify="right")
    for name, row in accuracy.items():
        table.add_row(name, *(f"{row[c]:.0%}" for c in ("majority answer", *runs)))
    Console().print(table)


def publish_and_search(trained: Path, dataset: Path, fine_tuned: Path, out: Path, artifacts: dict[str, Path]) -> None:
    t = _step("8/8 Preparing the Hub upload (dry run: nothing is pushed) and querying the clip catalog")
    publish_dry_run(trained, dataset, out, artifacts)
    search_catalog(dataset, fine_tuned, out, artifacts)
    print(f"   {time.perf_counter() - t:.0f} s")


def publish_dry_run(trained: Path, dataset: Path, out: Path, artifacts: dict[str, Path]) -> None:
    from avlabel.hub.publish import publish_dataset, publish_model

    model_repo = publish_model(trained, "your-name/tiny-av-labeler", eval_dir=out / "eval",
                               dataset_repo="your-name/synthetic-dashcam", dry_run_dir=out / "publish")
    dataset_repo = publish_dataset(dataset, "your-name/synthetic-dashcam", dry_run_dir=out / "publish")
    artifacts["model repo as it would be pushed"] = model_repo.folder
    artifacts["dataset repo as it would be pushed"] = dataset_repo.folder


def search_catalog(dataset: Path, fine_tuned: Path, out: Path, artifacts: dict[str, Path]) -> None:
    """Index the fine-tuned run's captions and the human labels, then look for night clips with pedestrians."""
    from avlabel.catalog.index import embed_pending, index_dataset, index_run
    from avlabel.catalog.query import search
    from avlabel.catalog.view import print_result, write_gallery
    from avlabel.extras import MissingExtra

    db = out / "catalog.sqlite"
    index_run(db, fine_tuned / CAPTIONS, run="fine-tuned")
    index_dataset(db, dataset, name="human")
    query = dict(where=["lighting=Night (well-lit by streetlights)"], semantic="a pedestrian crossing in front of the car")
    try:
        embed_pending(db)
    except MissingExtra as err:  # the embedding model is an extra: without it, search by the fields alone
        print(f"   {err}; searching by fields only")
        del query["semantic"]
    print(f"   query: {query}")
    found = search(db, **query, limit=8)
    print_result(found)
    artifacts["catalog gallery"] = write_gallery(found, out / "catalog_gallery.html", title="Night clips with pedestrians")


def main(args: DemoArguments) -> dict:
    out = Path(args.output_dir).resolve()
    # each step resumes what it finds (a caption run, a build), so an earlier demo's captions would pass for this one's
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--output_dir {args.output_dir}: the folder is not empty (an earlier demo?); the demo starts "
                         "from nothing: give a new folder, or remove this one")
    out.mkdir(parents=True, exist_ok=True)
    # the demo promises no network; TRL's trainer pings the Hub with usage telemetry unless told not to
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    started = time.perf_counter()
    artifacts: dict[str, Path] = {}

    draw_clips(args, out, artifacts)
    dataset = build_dataset(args, out, artifacts)
    base = build_base_model(args, out, artifacts)
    recipe = caption_recipe(args)
    runs = {"baseline": caption_baseline(recipe, base, dataset, out)}
    trained = fine_tune(args, base, dataset, out, artifacts)
    runs["fine-tuned"] = calibrate_and_caption(args, recipe, trained, dataset, out, artifacts)
    results, accuracy = score_runs(args, runs, dataset, out, artifacts)
    publish_and_search(trained, dataset, runs["fine-tuned"], out, artifacts)

    print_artifacts(artifacts, time.perf_counter() - started)
    return {"results": results, "visual_accuracy": accuracy, "artifacts": artifacts}


def print_artifacts(artifacts: dict[str, Path], seconds: float) -> None:
    """One line per artifact with its whole path: a table's cell cuts a long path at the terminal's width."""
    print(f"\nDemo finished in {seconds:.0f} s. Artifacts:")
    width = max(map(len, artifacts))
    for what, where in artifacts.items():
        print(f"   {what:<{width}}  {os.path.relpath(where)}")


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    if subparsers is not None:
        return subparsers.add_parser("demo", dataclass_types=[DemoArguments])
    return ArgumentParser(dataclass_types=[DemoArguments], prog="avlabel demo")


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("demo")
