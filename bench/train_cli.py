"""Training as users run it: `python -m avlabel.train --config recipes/cosmos_reason1_7b/<method>.yaml`, timed from outside.

bench/train_7b.py times hand-driven steps on synthetic tensors (no dataset, DataLoader or Trainer);
this runs the command itself, as a separate process, on a dataset the builder wrote:

  1. the model folder and the clips as bench/infer_cli.py makes them (the 7B architecture with random
     weights; `--clips` ids of `--distinct` synthetic 1280x720 30 fps clips, built by `avlabel build`);
  2. for each of `--methods`: the recipe as shipped, with only what a benchmark must change:
     `--max_steps`, `--gradient_accumulation_steps` (`--samples_per_step` samples an optimizer step),
     `--logging_steps 1` (a timestamp per step), no evaluation, no checkpoints, `--report_to none`;
     full fine-tuning also gets `--dtype bfloat16` (the recipe's fp32 master weights need ~124 GiB
     before activations: it is meant for FSDP on 2+ GPUs, BENCHMARKS.md) unless `--full_recipe_dtype`.
     Frames are decoded by the recipe's DataLoader workers into a fresh frame cache (the first epoch's
     cost); the run ends with the recipe's export (adapter/, merged/; `--no_merged_export`: adapter/ only);
  3. `--loop`: bench/train_7b.py for the same methods, in the same call, the ceiling; each command run is
     compared with the loop's variant of the same batch and checkpointing.

Measured for each run, from outside (every output line stored with the second it arrived, in
`--logs`/train_cli_<method>.log; the Trainer prints one log line per optimizer step, and its
trainer_state.json gives each step's exact `num_tokens`, TRL's count of non-padding tokens):

  first_step_s           launch -> the first optimizer step logged (everything a user waits for)
  steady_tokens_per_s    tokens of the steps after `--warmup_steps`, over the time they took
  startup_s              first_step_s less one step at the steady rate: what the command does before
                         its first step starts
  weight_load_s          the command's own `model_load_seconds` (train_results.json); startup_excluding_load_s
  total_s                launch -> exit; after_last_step_s: the last step -> exit (export, plots, metrics)
  trainer_tokens_per_s   num_tokens / the Trainer's train_runtime (what the Trainer itself reports)
  peak_gib               the command's own `peak_gib` (torch.cuda.max_memory_allocated while training,
                         the loop's counter); gpu_peak_gib: nvidia-smi's memory.used, polled

Results merge into `--out` (one entry per method, and per method and `--command_args`), so methods can run in
separate calls:

    python bench/train_cli.py --methods lora,qlora --loop      # GPU
    python bench/train_cli.py --tiny --out /tmp/train_cli_tiny.json   # CPU check: tiny model, 3 steps
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import shlex
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fsdp_runs import SAMPLING as TINY_SAMPLING
from bench.infer_cli import (
    TimedRun,
    add_run_arguments,
    loop_run,
    prepare_dataset,
    prepare_model,
    read_results,
    recipe_values,
    result_header,
    settle,
    write_results,
)

RECIPES = "recipes/cosmos_reason1_7b/{}.yaml"


def step_times(lines: list[tuple[float, str]]) -> list[float]:
    """When each optimizer step's log line ({'loss': ...}, printed by the Trainer) arrived."""
    times = []
    for seconds, text in lines:
        text = text.strip()
        if text.startswith("{") and "'loss'" in text:
            try:
                if "loss" in ast.literal_eval(text):
                    times.append(seconds)
            except (ValueError, SyntaxError):
                continue
    return times


def train_run(args, method: str, model: Path, dataset: Path) -> dict:
    recipe = RECIPES.format(method)
    values = recipe_values(recipe)
    batch = values["per_device_train_batch_size"]
    output_dir = Path(args.work) / f"train_{method}"
    shutil.rmtree(output_dir, ignore_errors=True)
    overrides = {
        "model_name_or_path": model, "dataset_name": dataset, "output_dir": output_dir, "max_steps": args.steps,
        "gradient_accumulation_steps": max(1, args.samples_per_step // batch), "logging_steps": 1,
        "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
    }
    if args.no_merged_export:
        overrides["export_merged"] = "false"
    if method == "full" and not args.full_recipe_dtype:
        overrides["dtype"] = "bfloat16"  # one GPU: bf16 weights and AdamW state, as the loop's full fine-tuning
    if args.tiny:  # the CPU: fp32, the tiny model's few small frames, one decoding worker
        overrides.update(use_cpu="true", bf16="false", dtype="float32", dataloader_num_workers=1, **TINY_SAMPLING)
    command = [sys.executable, "-m", "avlabel.train", "--config", recipe]
    for name, value in overrides.items():
        command += [f"--{name}", str(value)]
    command += shlex.split(args.command_args)  # last: they win
    print(f"training {method} ...", flush=True)
    run = TimedRun(command, Path(args.logs) / f"train_cli_{method}.log", timeout=args.run_timeout).run()
    metrics = read_results(output_dir / "train_results.json")
    state = read_results(output_dir / "trainer_state.json")
    resolved = recipe_values(str(output_dir / "recipe.yaml")) if (output_dir / "recipe.yaml").exists() else {}
    tokens = [entry["num_tokens"] for entry in state.get("log_history", []) if "loss" in entry]
    times = step_times(run.lines)
    outcome = {
        "command": shlex.join(["python", *command[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rc": run.rc,
        "total_s": round(run.seconds, 1),
        "steps": len(times),
        "batch": batch,
        "samples_per_step": overrides["gradient_accumulation_steps"] * batch,
        # transformers 5 names it activation_checkpointing (gradient_checkpointing: its deprecated alias)
        "gradient_checkpointing": resolved.get("activation_checkpointing", resolved.get("gradient_checkpointing")),
        "dtype": resolved.get("dtype"),
        "weight_load_s": metrics.get("model_load_seconds"),
        "peak_gib": metrics.get("peak_gib"),
        "gpu_peak_gib": run.gpu_peak_gib,
        "train_runtime_s": metrics.get("train_runtime"),
        "tokens": tokens[-1] if tokens else None,
        "step_s": times,
        "log": run.log_path.name,
    }
    if tokens and metrics.get("train_runtime"):
        outcome["trainer_tokens_per_s"] = round(tokens[-1] / metrics["train_runtime"], 1)
    if times and len(times) == len(tokens):
        outcome["first_step_s"] = times[0]
        outcome["after_last_step_s"] = round(run.seconds - times[-1], 1)
        warm = min(args.warmup_steps, len(times) - 2)
        if warm >= 0 and len(times) > warm + 1:
            rate = (tokens[-1] - tokens[warm]) / (times[-1] - times[warm])
            outcome["steady_tokens_per_s"] = round(rate, 1)
            outcome["startup_s"] = round(times[0] - tokens[0] / rate, 1)
            if outcome["weight_load_s"] is not None:
                outcome["startup_excluding_load_s"] = round(outcome["startup_s"] - outcome["weight_load_s"], 1)
    shutil.rmtree(output_dir, ignore_errors=True)  # the merged export: 17 GB a method
    return outcome


def loop_variant(loop: dict, method: str, run: dict) -> dict | None:
    """The loop's variant of `method` with the run's batch and checkpointing."""
    for variant in loop.get(f"{method}_variants", []):
        if variant.get("batch") == run["batch"] and variant.get("gradient_checkpointing") == run["gradient_checkpointing"]:
            return {key: variant.get(key) for key in ("tokens_per_s", "seconds_per_step", "peak_gib", "batch",
                                                       "gradient_checkpointing", "tokens_per_sample", "error")
                    if key in variant}
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,qlora,full", help="recipes of recipes/cosmos_reason1_7b to run")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a run (default 12; tiny 3)")
    parser.add_argument("--warmup_steps", type=int, default=2, help="steps left out of the steady rate")
    parser.add_argument("--samples_per_step", type=int, default=4, help="samples an optimizer step (accumulation)")
    parser.add_argument("--clips", type=int, default=None, help="clips in the dataset (default 64; tiny 12)")
    parser.add_argument("--distinct", type=int, default=None, help="distinct clips rendered (default 16; tiny 2)")
    parser.add_argument("--seconds", type=float, default=None, help="clip length (default 10; tiny 2)")
    parser.add_argument("--full_recipe_dtype", action="store_true", help="full: keep the recipe's fp32 master weights")
    parser.add_argument("--no_merged_export", action="store_true",
                        help="skip the recipe's merged/ export at the end (about a minute of a 7B run)")
    parser.add_argument("--loop", action="store_true", help="also run bench/train_7b.py for the same methods")
    parser.add_argument("--command_args", default="", help="more flags for every command, last (e.g. "
                        "'--dataloader_num_workers 8')")
    add_run_arguments(parser, "train_cli")
    args = parser.parse_args()
    work = settle(args, {"steps": (12, 3), "clips": (64, 12), "distinct": (16, 2), "seconds": (10.0, 2.0)})
    methods = args.methods.split(",")

    model = prepare_model(work, args.tiny)
    dataset = prepare_dataset(work, args.clips, args.distinct, args.seconds, args.tiny)
    out = Path(args.out)
    results = read_results(out)
    results.update({
        **result_header(args.tiny),
        "dataset": {"clips": args.clips, "distinct": min(args.distinct, args.clips), "seconds": args.seconds},
    })
    runs = results.setdefault("runs", {})
    keys = {method: f"{method} {args.command_args}".strip() for method in methods}  # more flags: an entry of its own
    for method in methods:
        runs[keys[method]] = train_run(args, method, model, dataset)
        print(json.dumps({k: v for k, v in runs[keys[method]].items() if k != "step_s"}), flush=True)
        write_results(out, results)

    if args.loop:
        arguments = ["--modes", args.methods, *(["--tiny"] if args.tiny else [])]
        print("loop: bench/train_7b.py ...", flush=True)
        loop = loop_run("bench/train_7b.py", arguments, work / "train_7b.json", Path(args.logs) / "train_cli_loop.log",
                        args.run_timeout)
        for method in methods:
            run = runs[keys[method]]
            run["loop"] = {"command": shlex.join(["python", "bench/train_7b.py", *arguments]), "date": loop.get("date"),
                           **(loop_variant(loop, method, run) or {"error": loop.get("error", "no such variant")})}
            steady, ceiling = run.get("steady_tokens_per_s"), run["loop"].get("tokens_per_s")
            if steady and ceiling:
                run["steady_vs_loop"] = round(steady / ceiling, 3)
        write_results(out, results)
    print(json.dumps({method: {k: v for k, v in run.items() if k != "step_s"} for method, run in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
