"""Short real runs of the training command under FSDP: full, LoRA and QLoRA on the 7B architecture.

For each method this runs the shipped recipe (recipes/cosmos_reason1_7b/<method>.yaml) with
its FSDP launcher config (recipes/accelerate/fsdp.yaml, fsdp_qlora.yaml for QLoRA) through
`accelerate launch -m train`, exactly as the README tells users to, on every GPU of the
machine, with a randomly initialised Qwen2.5-VL-7B (Cosmos-Reason1-7B's architecture) and a
small synthetic dataset:

  1. 3 optimizer steps, a checkpoint at step 3 (sharded: each GPU writes its part);
  2. the same command with `--resume_from_checkpoint <out>/checkpoint-3 --max_steps 5`:
     2 more steps from the saved weights, optimizer, scheduler and data position, then the
     export: `adapter/` (LoRA, QLoRA) or `merged/` (full), gathered from the shards.

The log of each run, the losses per step (finite?), the checkpoint's files and size, the
exported files, the GPU memory in use (nvidia-smi, sampled every half second) and the wall
time go to `--out`. It runs on every GPU the process sees: CUDA_VISIBLE_DEVICES=0,1 makes
it a 2-GPU run on a bigger machine.

Two stages, because PyAV (35 MB) and bitsandbytes (43 MB) don't both fit the 64 MiB that
travels to the GPU machine:

    python bench/fsdp_runs.py prepare .scaling_data         # here: synthetic clips, dataset, frames
    python bench/fsdp_runs.py run .scaling_data --out $OUT/fsdp_runs.json --logs $OUT   # on the GPUs

`prepare` builds the dataset with data_builder (synthetic clips, `avlabel build`) and
decodes each clip with the training collator's own sampler; `run` hands those frames to
the training run's frame cache, so training never needs PyAV. `run --tiny` runs the same
sequence on the CPU with the tiny test model and the DDP config (FSDP needs GPUs), to check
the launcher.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scaling import NCCL_SAFETY, child_env, run_process_group

METHODS = {  # method: (recipe, launcher config)
    "lora": ("recipes/cosmos_reason1_7b/lora.yaml", "recipes/accelerate/fsdp.yaml"),
    "qlora": ("recipes/cosmos_reason1_7b/qlora.yaml", "recipes/accelerate/fsdp_qlora.yaml"),
    "full": ("recipes/cosmos_reason1_7b/full.yaml", "recipes/accelerate/fsdp.yaml"),
}
# Small frames keep the runs short (4 frames of at most 112x112: 32 video tokens; the rubric
# prompt and the answer make ~1,500 tokens a sample); the sequence length is not what is tested.
SAMPLING = {"max_frames": 4, "min_pixels": 3136, "max_pixels": 12544}
FIRST_STEPS, RESUMED_STEPS = 3, 5


def model_config(tiny_dir: Path | None = None):
    from transformers import AutoConfig, Qwen2_5_VLConfig

    if tiny_dir is not None:
        return AutoConfig.from_pretrained(tiny_dir)
    values = json.loads((REPO / "bench" / "configs" / "qwen2_5_vl_7b.json").read_text())
    return Qwen2_5_VLConfig(**{k: v for k, v in values.items() if not k.startswith("_")})


def sampling_for(config):
    from avlabel.train.sft import TrainScriptArguments

    return TrainScriptArguments(**SAMPLING).resolve_sampling(config)


# ----------------------------------------------------------------------------- prepare (CPU, with PyAV)


def prepare(data: Path, clips: int = 12, test_clips: int = 4) -> None:
    """Synthetic clips -> builder dataset in data/dataset, their sampled frames in data/frames.npz."""
    import numpy as np
    from datasets import Video, load_dataset

    from avlabel.data_builder.build import BuildArguments, build
    from avlabel.demo.synthetic import generate
    from avlabel.train.collator import FrameCache

    shutil.rmtree(data, ignore_errors=True)
    raw = data / "raw"
    generate(raw, num_clips=clips, seed=0, width=224, height=128, seconds=2.0, fps=10, progress=False)
    result = build(BuildArguments(input=str(raw), output_dir=str(data / "dataset"), test_size=test_clips))
    if result.problems:
        raise SystemExit(f"build set clips aside: {result.problems}")
    shutil.rmtree(raw)
    dataset = load_dataset(str(data / "dataset"), download_mode="force_redownload")
    decoder = FrameCache(None, sampling_for(model_config()))  # no directory: decodes, as the collator would
    arrays = {}
    for split in dataset:
        for row in dataset[split].cast_column("video", Video(decode=False)):
            clip = decoder.load(row["video"])
            arrays[f"frames/{row['clip_id']}"] = clip.frames
            arrays[f"fps/{row['clip_id']}"] = np.float64(clip.sample_fps)
    np.savez_compressed(data / "frames.npz", **arrays)
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    print(f"{data}: {len(arrays) // 2} clips, {size / 1e6:.2f} MB")


# ----------------------------------------------------------------------------- run (GPUs)


def build_model(model_dir: Path, tiny: bool, config_path: Path | None = None) -> None:
    """The architecture of `config_path` (default: the 7B's) with random bf16 weights and the Qwen vocabulary, saved
    for `from_pretrained`.
    Written beside and renamed when whole, so a call that dies half-way leaves no folder a later call would reuse."""
    if (model_dir / "config.json").exists():
        return
    partial = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if tiny:
        from avlabel.demo.tiny_model import build_tiny_model

        build_tiny_model(partial, "qwen2_5_vl", "small")
    else:
        import torch

        from avlabel.families import FAMILIES
        from bench.infer_7b import CONFIG, build_full_size, full_size_processor, read_config

        config = read_config(config_path or CONFIG)
        model = build_full_size(config, torch.device("cuda"))
        model.save_pretrained(partial)
        full_size_processor(FAMILIES[config.model_type]).save_pretrained(partial)
        del model
        torch.cuda.empty_cache()
    shutil.rmtree(model_dir, ignore_errors=True)
    partial.rename(model_dir)


def fill_frame_cache(dataset_dir: Path, cache_dir: Path, sampling, clip_of) -> int:
    """Put each row's stand-in frames (`clip_of(row)`, a `Clip`) into a training run's frame cache, under the run's own keys.

    Stands in for PyAV decoding (not on the GPU machine); the cache writes its entries as usual.
    """
    from datasets import Video, load_dataset

    from avlabel.train.collator import FrameCache

    cache = FrameCache(cache_dir, sampling)
    dataset = load_dataset(str(dataset_dir), download_mode="force_redownload")
    count = 0
    for split in dataset:
        for row in dataset[split].cast_column("video", Video(decode=False)):
            cache._decode = lambda video, r=row: clip_of(r)
            cache.load(row["video"])
            count += 1
    return count


def decoded_frames(data: Path):
    """`clip_of` for `fill_frame_cache`: the frames `prepare` decoded."""
    import numpy as np

    from avlabel.train.collator import Clip

    frames = np.load(data / "frames.npz")
    return lambda row: Clip(frames=frames[f"frames/{row['clip_id']}"], sample_fps=float(frames[f"fps/{row['clip_id']}"]))


def nvidia_smi(field: str) -> list[str]:
    """`field` of each GPU this process sees (nvidia-smi ignores CUDA_VISIBLE_DEVICES: those are asked for by index)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    query = ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", *([f"--id={visible}"] if visible else [])]
    return subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()


def gpu_names() -> str:
    """"4 x NVIDIA H100 80GB HBM3": the GPUs this process sees, or "cpu"."""
    try:
        names = nvidia_smi("name")
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    return f"{len(names)} x {names[0]}" if names else "cpu"


class GpuMemory:
    """Most GPU memory in use per GPU (MiB, nvidia-smi) while a run lasts."""

    def __init__(self):
        self.peak: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                used = [int(line) for line in nvidia_smi("memory.used")]
                self.peak = [max(a, b) for a, b in zip(self.peak, used)] if self.peak else used
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def losses(output_dir: Path) -> list[list]:
    state = output_dir / "trainer_state.json"
    if not state.exists():
        return []
    history = json.loads(state.read_text())["log_history"]
    return [[entry["step"], entry["loss"]] for entry in history if "loss" in entry]


def launch(method: str, args, output_dir: Path, log, timeout: float, extra: list[str]) -> dict:
    recipe, launcher = METHODS[method]
    if args.tiny:
        launcher = "accelerate_config.yaml"  # FSDP needs GPUs; the CPU check runs the DDP path
    overrides = {
        "model_name_or_path": args.model_dir, "dataset_name": Path(args.data) / "dataset", "output_dir": output_dir,
        "max_steps": FIRST_STEPS, "save_strategy": "steps", "save_steps": FIRST_STEPS, "eval_strategy": "no",
        "logging_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
        "dataloader_num_workers": 0, "report_to": "none", "frame_cache_dir": Path(args.work) / "frame_cache",
        "export_merged": "false", **SAMPLING,
    }
    if args.tiny:
        overrides.update(use_cpu="true", bf16="false", dtype="float32")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launcher,
               "--num_processes", str(args.num_processes), "-m", "train", "--config", recipe]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    command += extra  # later flags win
    env = child_env()
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    with GpuMemory() as memory:
        rc = run_process_group(command, env, max(timeout, 1), stdout=log, stderr=subprocess.STDOUT)
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "gpu_mib_peak": memory.peak}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def size_gb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9, 2)


def run_method(method: str, args, deadline: float) -> dict:
    output_dir = Path(args.work) / method
    shutil.rmtree(output_dir, ignore_errors=True)
    outcome: dict = {"recipe": METHODS[method][0], "launcher": METHODS[method][1], "processes": args.num_processes}
    log_path = Path(args.logs) / f"fsdp_{method}.log"
    with open(log_path, "w", encoding="utf-8") as log:
        first = launch(method, args, output_dir, log, deadline - time.perf_counter(), [])
        first["losses"] = losses(output_dir)
        checkpoint = output_dir / f"checkpoint-{FIRST_STEPS}"
        first["checkpoint_files"] = listing(checkpoint)
        first["checkpoint_gb"] = size_gb(checkpoint) if checkpoint.is_dir() else None
        outcome["first"] = first
        if checkpoint.is_dir() and first["rc"] == 0 and time.perf_counter() < deadline:
            # full fine-tuning exports merged/ from the sharded weights; the adapters export themselves
            export = ["--export_merged", "true"] if method == "full" else []
            resumed = launch(method, args, output_dir, log, deadline - time.perf_counter(),
                             ["--max_steps", str(RESUMED_STEPS), "--resume_from_checkpoint", str(checkpoint), *export])
            resumed["losses"] = [entry for entry in losses(output_dir) if entry[0] > FIRST_STEPS]
            outcome["resumed"] = resumed
    every = first["losses"] + outcome.get("resumed", {}).get("losses", [])
    outcome["losses_finite"] = bool(every) and all(math.isfinite(loss) for _, loss in every)
    outcome["resumed_steps"] = [step for step, _ in outcome.get("resumed", {}).get("losses", [])]
    outcome["adapter_files"] = listing(output_dir / "adapter")
    outcome["merged_files"] = listing(output_dir / "merged")
    outcome["log"] = log_path.name
    return outcome


def run(args) -> None:
    start = time.perf_counter()
    deadline = start + args.budget_s
    for name, value in NCCL_SAFETY.items():
        os.environ.setdefault(name, value)
    # the model (17 GB), a merged export (17 GB) and, for full fine-tuning, a ~100 GB checkpoint
    needed = 0 if args.tiny else 40e9 + (110e9 if "full" in args.methods else 0)
    for folder in (args.work, "/tmp/fsdp_runs"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder).free >= needed:
            break
    else:
        raise SystemExit(f"{args.work} and /tmp/fsdp_runs: less than {needed / 1e9:.0f} GB free for {args.methods}")
    args.work = folder
    work = Path(folder)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    if args.model_dir is None:
        args.model_dir = str(work / "model")
    if args.num_processes is None:
        import torch

        args.num_processes = 2 if args.tiny else torch.cuda.device_count()
    report: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": gpu_names(), "processes": args.num_processes,
                    "methods": {}}
    build_model(Path(args.model_dir), args.tiny)
    report["model_build_s"] = round(time.perf_counter() - start, 1)
    report["frames_cached"] = fill_frame_cache(Path(args.data) / "dataset", work / "frame_cache",
                                               sampling_for(model_config(Path(args.model_dir) if args.tiny else None)),
                                               decoded_frames(Path(args.data)))
    for method in args.methods.split(","):
        if time.perf_counter() > deadline - args.min_run_s:
            report["methods"][method] = {"skipped": f"less than {args.min_run_s} s of the budget left"}
            continue
        report["methods"][method] = run_method(method, args, deadline)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(method, json.dumps(report["methods"][method]), flush=True)
        shutil.rmtree(work / method, ignore_errors=True)  # checkpoints and exports: up to ~120 GB in /dev/shm
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    prep = sub.add_parser("prepare", help="build the synthetic dataset and its frames (needs PyAV)")
    prep.add_argument("data")
    go = sub.add_parser("run", help="train each method under FSDP, then resume it")
    go.add_argument("data")
    go.add_argument("--out", required=True, help="summary JSON")
    go.add_argument("--logs", required=True, help="folder for fsdp_<method>.log")
    go.add_argument("--work", default="/dev/shm/fsdp_runs", help="model, frame cache and outputs")
    go.add_argument("--model_dir", default=None, help="where the random 7B model is saved (default <work>/model)")
    go.add_argument("--methods", default="lora,qlora,full")
    go.add_argument("--num_processes", type=int, default=None, help="default: every GPU")
    go.add_argument("--budget_s", type=float, default=3600, help="stop starting runs after this many seconds")
    go.add_argument("--min_run_s", type=float, default=60, help="don't start a method with less time left")
    go.add_argument("--tiny", action="store_true", help="CPU check: tiny model, 2 gloo processes, DDP config")
    args = parser.parse_args()
    if args.stage == "prepare":
        prepare(Path(args.data))
    else:
        run(args)


if __name__ == "__main__":
    main()
