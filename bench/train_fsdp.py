"""Training throughput of the recipes as users run them: each speed setting measured on its own.

Runs `python -m train` with a shipped recipe, exactly as the README tells users to (the full
fine-tune under `accelerate launch --config_file recipes/accelerate/fsdp.yaml` on N GPUs;
LoRA on one GPU), on the Qwen2.5-VL-7B architecture (Cosmos-Reason1-7B's; `--model
cosmos_reason2_8b`: its recipes on Qwen3-VL-8B) with random
weights saved as a model folder, and a dataset of recipe-shaped clips built by the
project's builder: 10 s at 448x252, so 20 frames at 2 fps and 1,440 video tokens, plus the
rubric prompt and the fenced answer: about 2,770 tokens a sample with the synthetic labels.

Each run is one variant of the recipe; `baseline` is the recipe with the settings it had
before issue 21 (vision windows one SDPA call each, no Liger, FSDP's checkpointing of every
layer) and before this benchmark tuned it (`BEFORE_TUNING`: micro-batch, checkpointing);
every other variant changes one thing (`VARIANTS`), and
`a+b` runs several together. For each run it reports, from the run's own logs:

* tokens_per_s_per_gpu: TRL's `num_tokens` (real tokens, padding excluded, summed over the
  processes; trainer_state.json) over the wall time between the end of step `--skip` and
  the last step (the time each step's log line reached this script), divided by the GPUs;
* mfu: 6 x parameters (all of them, vision tower included) x tokens_per_s_per_gpu over
  `--peak_tflops` (989: H100/H200 SXM dense bf16);
* peak_gib: the most GPU memory in use on any of its GPUs (nvidia-smi, polled every 0.5 s:
  what the card has to hold, allocator cache and CUDA context included);
* speed_settings: what the run resolved them to (train_results.json), so a setting that
  did not apply (Liger not installed, no GPU) shows.

Results are merged into `--out` (default bench/results/train_fsdp.json) after every run,
so several calls of at most 10 minutes add up to the table.

    python bench/train_fsdp.py prepare .train_fsdp_data                  # here (needs PyAV): the built dataset
    python bench/train_fsdp.py run .train_fsdp_data --gpus 2             # on the GPUs: the full recipe under FSDP
    python bench/train_fsdp.py run .train_fsdp_data --method lora --gpus 1
    python bench/train_fsdp.py run .train_fsdp_data --tiny               # CPU dry run: tiny model, one process

Frames: the GPU machine has no PyAV, so `run` puts random frames of exactly the shape the
recipe's sampler gives each clip into the run's frame cache (bench/fsdp_runs.py
`fill_frame_cache`); the vision tower's work depends on the shape, not the pixels.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fsdp_runs import GpuMemory, build_model, fill_frame_cache, gpu_names
from bench.scaling import NCCL_SAFETY, child_env

METHODS = {"full": "recipes/accelerate/fsdp.yaml", "lora": None}  # method: FSDP launcher config, or None (one process / DDP)
# --model: the recipes/<model>/<method>.yaml trained, and the architecture built for it (random weights)
MODELS = {"cosmos_reason1_7b": "bench/configs/qwen2_5_vl_7b.json", "cosmos_reason2_8b": "bench/configs/qwen3_vl_8b.json"}
H100_H200_BF16_DENSE_TFLOPS = 989.0
# Recipe-shaped clips: 10 s at 448x252 (16x9 tokens a frame at factor 28: the recipe's budget, no resizing)
CLIP = {"width": 448, "height": 252, "seconds": 10.0, "fps": 4}
TINY_SAMPLING = {"max_frames": 4, "min_pixels": 3136, "max_pixels": 12544}  # --tiny: 4 frames of at most 112x112

# One change each against the baseline. "train": the training script's arguments; "launch": accelerate launch's
# (FSDP only). micro_batch_N is made by `variant_settings`: N samples a micro-batch, the same samples a step.
BASELINE = {"padded_vision_windows": "false", "use_liger": "false"}
# What the recipes set before this benchmark tuned them (2026-12-01), so that `baseline` stays the same starting point
BEFORE_TUNING = {("cosmos_reason1_7b", "lora"): {"per_device_train_batch_size": "1"},
                 ("cosmos_reason2_8b", "lora"): {"activation_checkpointing": "true"}}
VARIANTS = {
    "baseline": {},
    "padded_vision_windows": {"train": {"padded_vision_windows": "true"}},
    "liger": {"train": {"use_liger": "true"}},
    "no_checkpointing": {"train": {"activation_checkpointing": "false"},
                         "launch": {"fsdp_activation_checkpointing": "false"}},
    # transformers' checkpointing of every other layer (activation_checkpointing_kwargs.every_n_layers) in
    # place of FSDP's, which checkpoints every wrapped layer
    "checkpoint_every_2": {"train": {"activation_checkpointing": "true",
                                     "activation_checkpointing_kwargs": '{"every_n_layers": 2}'},
                           "launch": {"fsdp_activation_checkpointing": "false"}},
    "checkpoint_every_4": {"train": {"activation_checkpointing": "true",
                                     "activation_checkpointing_kwargs": '{"every_n_layers": 4}'},
                           "launch": {"fsdp_activation_checkpointing": "false"}},
    "no_reshard_after_forward": {"launch": {"fsdp_reshard_after_forward": "false"}},
}
DEFAULT_VARIANTS = {
    "full": "baseline,padded_vision_windows,liger,no_checkpointing,checkpoint_every_2,micro_batch_4",
    "lora": "baseline,padded_vision_windows,liger,micro_batch_2,micro_batch_4",
}


def results_path(model: str) -> Path:
    """bench/results/train_fsdp.json for Reason 1 7B (the table issue 21 asked for), train_fsdp_<model>.json for others."""
    return REPO / "bench" / "results" / ("train_fsdp.json" if model == "cosmos_reason1_7b" else f"train_fsdp_{model}.json")


def recipe_path(model: str, method: str) -> str:
    return f"recipes/{model}/{method}.yaml"


def read_recipe(model: str, method: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / recipe_path(model, method)).read_text(encoding="utf-8"))


def variant_settings(name: str, recipe: dict, samples_per_step: int, before: dict | None = None) -> dict:
    """{"train": ..., "launch": ...} of a variant or of several joined by '+' (later ones win), over the baseline:
    the recipe with `before` (its settings before tuning) and the speed settings off."""
    before = before or {}
    micro = int(before.get("per_device_train_batch_size", recipe["per_device_train_batch_size"]))
    settings = {"train": {**BASELINE, **before, "gradient_accumulation_steps": str(max(1, samples_per_step // micro))},
                "launch": {}}
    for part in name.split("+"):
        if part.startswith("micro_batch_") and part.removeprefix("micro_batch_").isdigit():
            micro = int(part.removeprefix("micro_batch_"))
            change = {"train": {"per_device_train_batch_size": str(micro),
                                "gradient_accumulation_steps": str(max(1, samples_per_step // micro))}}
        elif part in VARIANTS:
            change = VARIANTS[part]
        else:
            raise SystemExit(f"--variants: unknown variant {part!r} (known: {', '.join(VARIANTS)}, micro_batch_N)")
        for key in ("train", "launch"):
            settings[key].update(change.get(key, {}))
    return settings


def parameter_count(model_dir: Path) -> int:
    """All parameters of the model folder's architecture (vision tower included), counted on the meta device."""
    import torch
    from transformers import AutoConfig

    from avlabel.families import family_of

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return sum(p.numel() for p in family_of(config).model_class._from_config(config).parameters())


# ----------------------------------------------------------------------------- prepare (CPU, with PyAV)


def prepare(data: Path, clips: int, test_clips: int) -> None:
    """Synthetic recipe-shaped clips built into data/dataset by the project's builder (`avlabel build`)."""
    from avlabel.data_builder.build import BuildArguments, build
    from avlabel.demo.synthetic import generate

    shutil.rmtree(data, ignore_errors=True)
    raw = data / "raw"
    generate(raw, num_clips=clips + test_clips, seed=0, progress=False, **CLIP)
    result = build(BuildArguments(input=str(raw), output_dir=str(data / "dataset"), test_size=test_clips))
    if result.problems:
        raise SystemExit(f"build set clips aside: {result.problems}")
    shutil.rmtree(raw)
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    print(f"{data}: {clips} training and {test_clips} test clips, {size / 1e6:.2f} MB")


# ----------------------------------------------------------------------------- run


def run_sampling(model_dir: Path, tiny: bool):
    """The frame sampling the training run will resolve (the same function, the same arguments)."""
    from transformers import AutoConfig

    from avlabel.train.sft import TrainScriptArguments

    script_args = TrainScriptArguments(**(TINY_SAMPLING if tiny else {}))
    return script_args.resolve_sampling(AutoConfig.from_pretrained(model_dir), str(model_dir))


def random_frames(sampling):
    """`clip_of` for `fill_frame_cache`: random frames of the count and size the sampler gives the row's clip."""
    import numpy as np

    from avlabel.core.sampling import frame_count, resized_size
    from avlabel.train.collator import Clip

    def clip_of(row) -> Clip:
        # the rules of avlabel/train/collator.py video_prompt_tokens, so the run's length estimates hold
        total = max(1, round(float(row["duration"]) * float(row["fps"])))
        frames = frame_count(total, float(row["fps"]), sampling)
        height, width = resized_size(int(row["height"]), int(row["width"]), sampling)
        rng = np.random.default_rng(zlib.crc32(row["clip_id"].encode()))
        return Clip(frames=rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8),
                    sample_fps=frames / total * float(row["fps"]))

    return clip_of


def command_for(method: str, args, settings: dict, overrides: dict) -> list[str]:
    recipe, launcher = recipe_path(args.model, method), METHODS[method]
    if args.tiny or (launcher is None and args.gpus == 1):
        command = [sys.executable, "-m", "train"]  # one process: the single-GPU path
    else:
        launch = [f"--{key}={value}" for key, value in settings["launch"].items()] if launcher else []
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launcher or "accelerate_config.yaml",
                   "--num_processes", str(args.gpus), *launch, "-m", "train"]
    command += ["--config", recipe]
    for key, value in {**overrides, **settings["train"]}.items():
        command += [f"--{key}", str(value)]
    return command


class StepClock:
    """Reads a run's output, keeping it in the log and the arrival time of each training log line (one per step)."""

    def __init__(self, stream, log):
        self.times: list[float] = []
        self._thread = threading.Thread(target=self._read, args=(stream, log), daemon=True)
        self._thread.start()

    def _read(self, stream, log):
        for line in stream:
            now = time.perf_counter()
            log.write(line)
            log.flush()
            start = line.find("{'loss'")  # after any launcher prefix such as "[rank0]:"
            if start < 0:
                continue
            try:
                ast.literal_eval(line[start:].strip())
            except (ValueError, SyntaxError):
                continue
            self.times.append(now)

    def join(self):
        self._thread.join()


def run_one(method: str, variant: str, args, common: dict, recipe: dict, n_params: int) -> dict:
    import signal

    settings = variant_settings(variant, recipe, args.samples_per_step, BEFORE_TUNING.get((args.model, method)))
    output_dir = Path(args.work) / "runs" / f"{method}_{variant}"
    shutil.rmtree(output_dir, ignore_errors=True)
    command = command_for(method, args, settings, {**common, "output_dir": output_dir})
    log_path = Path(args.logs) / f"train_fsdp_{method}_{variant.replace('+', '__')}.log"  # a "+" in a file name doesn't travel back from the device
    outcome: dict = {"method": method, "variant": variant, "gpus": args.gpus, "device": args.device,
                     "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "log": log_path.name,
                     "settings": settings, "command": " ".join(command)}
    if args.tiny and settings["launch"]:
        outcome["not_applied"] = f"accelerate launch {settings['launch']} (FSDP only; the dry run is one process)"
    env = child_env()
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log, GpuMemory() as memory:
        log.write(f"$ {outcome['command']}\n")
        process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        clock = StepClock(process.stdout, log)
        try:
            outcome["rc"] = process.wait(timeout=max(1.0, args.deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            outcome["rc"] = "timeout"
        clock.join()
    outcome["wall_s"] = round(time.perf_counter() - start, 1)
    train = settings["train"]
    samples_per_step = int(train.get("per_device_train_batch_size", recipe["per_device_train_batch_size"])) * int(
        train["gradient_accumulation_steps"])
    outcome.update(measure(output_dir, clock.times, args, n_params, samples_per_step))
    peak = [mib / 1024 for mib in memory.peak]
    outcome["peak_gib"] = round(max(peak), 2) if peak else None  # None: no nvidia-smi (CPU dry run)
    outcome["peak_gib_per_gpu"] = [round(gib, 2) for gib in peak]
    shutil.rmtree(output_dir, ignore_errors=True)
    return outcome


def measure(output_dir: Path, times: list[float], args, n_params: int, samples_per_step: int) -> dict:
    """Throughput from the run's own records: trainer_state.json's num_tokens per step, the log lines' arrival times."""
    state_file, results_file = output_dir / "trainer_state.json", output_dir / "train_results.json"
    if not state_file.exists():
        return {"error": "the run wrote no trainer_state.json (see its log)"}
    steps = [entry for entry in json.loads(state_file.read_text())["log_history"] if "loss" in entry]
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    out: dict = {"losses": [[entry["step"], entry["loss"]] for entry in steps],
                 "speed_settings": results.get("speed_settings")}
    if len(times) != len(steps):
        return {**out, "error": f"{len(times)} log lines read for {len(steps)} logged steps"}
    if len(steps) <= args.skip:
        return {**out, "error": f"{len(steps)} steps logged, not more than --skip {args.skip}"}
    first, last = args.skip - 1, len(steps) - 1  # measured: the steps after `first`, through `last`
    tokens = steps[last]["num_tokens"] - steps[first]["num_tokens"]
    seconds = times[last] - times[first]
    per_gpu = tokens / seconds / args.gpus
    samples = (last - first) * samples_per_step * args.gpus
    out.update({
        "tokens_per_s_per_gpu": round(per_gpu, 1),
        "mfu": float(f"{6 * n_params * per_gpu / (args.peak_tflops * 1e12):.4g}"),
        "measured_steps": [steps[first + 1]["step"], steps[last]["step"]],
        "seconds_per_step": round(seconds / (last - first), 3),
        "tokens_per_sample": round(tokens / samples, 1),
        "losses_finite": all(math.isfinite(entry["loss"]) for entry in steps),
    })
    if "train_runtime" in results:  # the Trainer's own figure: every step, the first ones included
        out["whole_run_tokens_per_s_per_gpu"] = round(steps[last]["num_tokens"] / results["train_runtime"] / args.gpus, 1)
    return out


def common_overrides(method: str, args) -> dict:
    """What every run of a method shares: the bench's model, data and length, no saving, one log line a step."""
    overrides = {
        "model_name_or_path": args.model_dir, "dataset_name": Path(args.data) / "dataset",
        "max_steps": args.steps, "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no",
        "report_to": "none", "export_merged": "false", "disable_tqdm": "true", "warmup_steps": 0,
        "frame_cache_dir": Path(args.work) / "frame_cache",
    }
    if args.tiny:
        overrides.update(use_cpu="true", bf16="false", dtype="float32", dataloader_num_workers=0, short_prompt="true",
                         **TINY_SAMPLING)
    return overrides


def versions() -> dict:
    """The libraries the runs train with; liger-kernel's absence is recorded too."""
    from importlib import metadata

    found = {}
    for name in ("torch", "transformers", "accelerate", "trl", "peft", "liger-kernel", "triton"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def run(args) -> None:
    start = time.perf_counter()
    args.deadline = start + args.budget_s
    if args.tiny and Path(args.out).resolve().is_relative_to((REPO / "bench" / "results").resolve()):
        raise SystemExit(f"--out {args.out}: a --tiny dry run is not a result; write it outside bench/results/")
    for name, value in NCCL_SAFETY.items():
        os.environ.setdefault(name, value)
    needed = 0 if args.tiny else 25e9  # the 7B or 8B model in bf16 (17 GB), the frame cache, the runs' outputs
    for folder in (args.work, "/tmp/train_fsdp"):
        work = Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(work).free >= needed or (work / f"model_{args.model}" / "config.json").exists():
            break
    else:
        raise SystemExit(f"{args.work} and /tmp/train_fsdp: less than {needed / 1e9:.0f} GB free for the model and runs")
    args.work = str(work)
    args.logs = args.logs or str(work / "logs")
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    args.model_dir = args.model_dir or str(work / ("tiny_model" if args.tiny else f"model_{args.model}"))
    if args.gpus is None:
        import torch

        args.gpus = 1 if args.tiny or args.method == "lora" else torch.cuda.device_count()
    if args.tiny:
        args.gpus = 1
    elif "CUDA_VISIBLE_DEVICES" not in os.environ:
        # the run's GPUs: one process alone must see one GPU (Trainer would use nn.DataParallel over several)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(args.gpus)))
    args.device = "cpu (tiny dry run)" if args.tiny else gpu_names().split(" x ", 1)[-1]
    build_model(Path(args.model_dir), args.tiny, REPO / MODELS[args.model])
    n_params = parameter_count(Path(args.model_dir))
    sampling = run_sampling(Path(args.model_dir), args.tiny)
    frames = fill_frame_cache(Path(args.data) / "dataset", work / "frame_cache", sampling, random_frames(sampling))

    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    report.update({
        "device": args.device, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gpus": args.gpus if args.method == "full" else report.get("gpus", args.gpus),
        "model": f"{MODELS[args.model]} architecture, random weights; recipe {recipe_path(args.model, args.method)}"
        if not args.tiny else "tiny qwen2_5_vl",
        "parameters": n_params,
        "mfu_basis": f"6 x {n_params:,} parameters x tokens/s per GPU / {args.peak_tflops:g} TFLOP/s (dense bf16 peak)",
        "throughput_basis": f"TRL num_tokens (no padding) over the steps after step {args.skip}; peak_gib: nvidia-smi",
        "versions": versions(),
        "frames_cached": frames,
        "sampling": sampling.to_dict(),
    })
    common = common_overrides(args.method, args)
    recipe = read_recipe(args.model, args.method)
    for variant in args.variants.split(","):
        key = f"{args.method}/{variant}"
        if time.perf_counter() > args.deadline - args.min_run_s:
            report["runs"][key] = {"skipped": f"less than {args.min_run_s} s of the budget left"}
            continue
        report["runs"][key] = run_one(args.method, variant, args, common, recipe, n_params)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        row = report["runs"][key]
        print(f"{key}: rc {row['rc']}, {row.get('tokens_per_s_per_gpu')} tokens/s per GPU, MFU {row.get('mfu')}, "
              f"peak {row.get('peak_gib')} GiB {row.get('error', '')}", flush=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    prep = sub.add_parser("prepare", help="build the recipe-shaped dataset (needs PyAV)")
    prep.add_argument("data")
    prep.add_argument("--clips", type=int, default=40, help="training clips (default: 40, as issue 21's run)")
    prep.add_argument("--test_clips", type=int, default=4)
    go = sub.add_parser("run", help="train each variant of a recipe and measure it")
    go.add_argument("data")
    go.add_argument("--method", choices=list(METHODS), default="full")
    go.add_argument("--model", choices=list(MODELS), default="cosmos_reason1_7b",
                    help="the recipes folder trained, and the architecture built for it")
    go.add_argument("--variants", default=None, help=f"comma-separated; a+b combines (default per method: {DEFAULT_VARIANTS})")
    go.add_argument("--gpus", type=int, default=None, help="processes (default: every GPU for full, 1 for lora)")
    go.add_argument("--out", default=None, help="results JSON, merged into (default bench/results/train_fsdp.json, "
                    "train_fsdp_<model>.json for another --model; --tiny: <work>/train_fsdp_tiny.json)")
    go.add_argument("--logs", default=None, help="folder for each run's log (default <work>/logs)")
    go.add_argument("--work", default="/dev/shm/train_fsdp", help="model, frame cache and run outputs")
    go.add_argument("--model_dir", default=None, help="where the random model is saved (default <work>/model_<model>)")
    go.add_argument("--steps", type=int, default=5, help="optimizer steps a run")
    go.add_argument("--skip", type=int, default=2, help="steps left out of the throughput (warm-up)")
    go.add_argument("--samples_per_step", type=int, default=4, help="samples per GPU per optimizer step")
    go.add_argument("--peak_tflops", type=float, default=H100_H200_BF16_DENSE_TFLOPS,
                    help="the GPU's dense bf16 peak for MFU (989: H100/H200 SXM)")
    go.add_argument("--budget_s", type=float, default=3600, help="stop starting runs after this many seconds")
    go.add_argument("--min_run_s", type=float, default=120, help="don't start a run with less time left")
    go.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, one process, no FSDP")
    args = parser.parse_args()
    if args.stage == "prepare":
        prepare(Path(args.data), args.clips, args.test_clips)
        return
    if args.skip < 1 or args.steps <= args.skip:
        parser.error(f"--skip {args.skip} --steps {args.steps}: need 1 <= skip < steps (the timing starts at the end of step `skip`)")
    args.variants = args.variants or DEFAULT_VARIANTS[args.method]
    if args.out is None:
        args.out = str(Path(args.work) / "train_fsdp_tiny.json") if args.tiny else str(results_path(args.model))
    run(args)


if __name__ == "__main__":
    main()
