"""Scaling over GPUs: training tokens/s and captioning clips/hour on 1, 2, 4 and 8 GPUs.

For each GPU count N (1, 2, 4, 8, those the machine has) this launches N processes with
torchrun, one per GPU, and measures in each run:

* train: the LoRA recipe's shape on the Qwen2.5-VL-7B architecture (Cosmos-Reason1-7B)
  with random weights, exactly as bench/train_7b.py's `lora` mode (r16 on the language
  model, vision frozen, TRL's fused LM head, no activation checkpointing, bf16 autocast,
  AdamW) on the same recipe-shaped samples (1,440 video + 1,400 prompt + 400 answer
  tokens); the model is wrapped in DDP through accelerate when N > 1, so every step
  all-reduces the adapters' gradients. Same per-GPU batch at every N (weak scaling).
  Throughput = N x batch x tokens per sample / the slowest rank's median step time.
* infer: the captioning engine (infer/engine.py) as bench/infer_7b.py runs it (the
  full rubric prompt, synthetic 20-frame 252x448 clips, 400 forced tokens, the same
  per-GPU decode batch); the N processes split N x `--clips_per_gpu` clips with
  accelerate's `split_between_processes`, as `accelerate launch -m infer` does, start
  together after a barrier and are timed until the last one finishes.

Scaling efficiency = throughput(N) / (N x throughput(1)), from runs made one after the
other on the same machine. Writes bench/results/scaling.json (after every run, so a
cut-off run keeps what it measured).

    python bench/scaling.py                            # on a machine with GPUs
    python bench/scaling.py --tiny --out /tmp/s.json   # CPU check: tiny models, 2 gloo processes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU_COUNTS = (1, 2, 4, 8)
# NVLink multicast stays off on shared machines (the device notes); children inherit these.
NCCL_SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def child_env() -> dict[str, str]:
    """The environment of a launched run: NCCL_SAFETY, this repository importable, output unbuffered."""
    return {**os.environ, **NCCL_SAFETY, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}


# ----------------------------------------------------------------------------- workers (one per GPU)


def train_worker(args) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from bench import train_7b

    accelerator = Accelerator(cpu=args.tiny)
    device = accelerator.device
    config = train_7b.model_config(str(train_7b.ROOT / "configs" / "qwen2_5_vl_7b.json"), args.tiny)
    shape = train_7b.TINY_SHAPE if args.tiny else train_7b.SHAPE
    torch.manual_seed(0)
    model = train_7b.peft_language_lora(train_7b.build_model(config, device), bf16_adapters=False)
    train_7b.set_checkpointing(model, False)  # the LoRA recipe trains without activation checkpointing
    if accelerator.num_processes > 1:  # one GPU trains the plain model, as a single-GPU run does
        model = accelerator.prepare_model(model)  # DDP: gradients all-reduced every step
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = train_7b.make_batch(config, shape, args.batch, device, args.accepts_mm_types)
    steps, warmup = (2, 1) if args.tiny else (args.steps, args.warmup)
    timing = train_7b.time_steps(model, params, train_7b.fused_loss, inputs, steps, warmup, device)
    per_rank = gather_object([(timing["seconds_per_step"], timing["peak_gib"])])
    slowest = max(seconds for seconds, _ in per_rank)
    tokens_per_sample = inputs["input_ids"].shape[1]
    accelerator.free_memory()  # drop the prepared model, so the inference part has the GPU to itself
    return {
        "tokens_per_s": round(accelerator.num_processes * args.batch * tokens_per_sample / slowest, 1),
        "seconds_per_step": round(slowest, 4),
        "seconds_per_step_by_rank": [round(seconds, 4) for seconds, _ in per_rank],
        "peak_gib": round(max(peak for _, peak in per_rank), 2),
        "batch_per_gpu": args.batch,
        "tokens_per_sample": tokens_per_sample,
        "final_loss": round(timing["loss"], 3),
        "ddp": accelerator.num_processes > 1,
    }


def infer_worker(args) -> dict:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from bench import infer_7b
    from avlabel.core.prompts import load_prompts
    from avlabel.families import FAMILIES
    from avlabel.infer.engine import CaptionEngine
    from avlabel.infer.inputs import ClipRef
    from avlabel.infer.settings import GenerationSettings

    state = PartialState(cpu=args.tiny)
    config = infer_7b.read_config(infer_7b.CONFIG)
    family = FAMILIES[config.model_type]
    infer_7b.set_frame_shape(config, args.tiny)
    if args.tiny:
        # save_pretrained writes on the main process only: it builds the model, then every process loads it
        with state.main_process_first():
            model, processor = infer_7b.build_tiny(Path(args.result).parent / "tiny_model", family)
    else:
        model, processor = infer_7b.build_full_size(config, state.device), infer_7b.full_size_processor(family)
    settings = GenerationSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens)  # the recipe's sampling
    clips = [ClipRef(f"synthetic-{i}", f"synthetic-{i}") for i in range(state.num_processes * args.clips_per_gpu)]
    cuda = state.device.type == "cuda"
    done = 0
    with state.split_between_processes(clips) as mine:
        engine = CaptionEngine(model, processor, load_prompts(), settings, batch_size=args.infer_batch,
                               prefill_batch_size=args.prefill_batch, cuda_graphs=cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        state.wait_for_everyone()  # all processes start together; the slowest one ends the run
        start = time.perf_counter()
        for results in engine.run(mine, num_workers=args.num_workers, load_frames=infer_7b.synthetic_frames):
            for clip, generation, error, _ in results:
                if error is not None:
                    raise RuntimeError(f"{clip.clip_id}: {error}")
                assert len(generation.tokens) == args.tokens
                done += 1
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    per_rank = gather_object([(done, seconds, peak)])
    total = sum(count for count, _, _ in per_rank)
    slowest = max(sec for _, sec, _ in per_rank)
    return {
        "clips_per_hour": round(total / slowest * 3600, 1),
        "clips": total,
        "seconds": round(slowest, 2),
        "clips_by_rank": [count for count, _, _ in per_rank],
        "seconds_by_rank": [round(sec, 2) for _, sec, _ in per_rank],
        "peak_gib": round(max(p for _, _, p in per_rank), 2),
        "batch_per_gpu": args.infer_batch,
        "prompt_tokens": engine.timings[0]["prompt_length"] if engine.timings else None,
        "completion_tokens": args.tokens,
    }


def worker_main(args) -> None:
    """One process of an N-process run: each part in turn, rank 0 writes {part: result or error}."""
    import gc
    import inspect

    import torch
    from accelerate import PartialState
    from transformers import Qwen2_5_VLForConditionalGeneration

    args.accepts_mm_types = "mm_token_type_ids" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
    state = PartialState(cpu=args.tiny)
    results: dict = {"processes": state.num_processes,
                     "device": torch.cuda.get_device_name(state.device) if state.device.type == "cuda" else "cpu"}
    for part in args.parts.split(","):
        start = time.perf_counter()
        try:
            results[part] = {"train": train_worker, "infer": infer_worker}[part](args)
        except Exception as err:  # noqa: BLE001 - keep the other part's numbers; the parent records the error
            traceback.print_exc()
            results[part] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
        results[part]["wall_s"] = round(time.perf_counter() - start, 1)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        state.wait_for_everyone()
    if state.is_main_process:
        Path(args.result).write_text(json.dumps(results))


# ----------------------------------------------------------------------------- launcher


def launch(count: int, args, result: Path) -> dict:
    """torchrun `count` processes of this script; returns rank 0's results (or the error)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}", __file__,
        "--worker", "--result", str(result), "--parts", args.parts, "--batch", str(args.batch),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--tokens", str(args.tokens),
        "--clips_per_gpu", str(args.clips_per_gpu), "--infer_batch", str(args.infer_batch),
        "--prefill_batch", str(args.prefill_batch), "--num_workers", str(args.num_workers),
    ] + (["--tiny"] if args.tiny else [])
    env = child_env()
    # torchrun sets OMP_NUM_THREADS=1 only when it starts several processes; the same for every N keeps runs comparable
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    returncode = run_process_group(command, env, args.run_timeout)
    if returncode != 0 or not result.exists():
        return {"error": f"{count}-process run ended with {returncode}", "wall_s": round(time.perf_counter() - start, 1)}
    return json.loads(result.read_text())


def run_process_group(command: list[str], env: dict, timeout: float, **kwargs) -> int | str:
    """Run `command` in its own process group; on timeout end the whole group (torchrun's workers too)."""
    import signal

    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, **kwargs)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timeout"


def efficiencies(throughput: dict[str, float]) -> dict[str, float]:
    """throughput(N) / (N x throughput(1)) for each N measured along with N = 1."""
    if "1" not in throughput:
        return {}
    return {n: round(value / (int(n) * throughput["1"]), 3) for n, value in throughput.items()}


def counts_for(args) -> list[int]:
    if args.gpus:
        return [int(n) for n in args.gpus.split(",")]
    if args.tiny:
        return [1, 2]
    import torch

    available = torch.cuda.device_count()
    if available == 0:
        raise SystemExit("no GPU found: run with --tiny for the CPU check")
    return [n for n in GPU_COUNTS if n <= available]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scaling.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU, processes over gloo")
    parser.add_argument("--gpus", default=None, help="GPU counts to run, e.g. 1,2 (default: 1,2,4,8 up to what is there)")
    parser.add_argument("--parts", default="train,infer")
    parser.add_argument("--batch", type=int, default=1, help="training samples per GPU per step (the LoRA recipe's 1)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=400, help="completion length forced on every clip")
    parser.add_argument("--clips_per_gpu", type=int, default=128, help="clips each process captions (one decode batch)")
    parser.add_argument("--infer_batch", type=int, default=128, help="decode batch per GPU (BENCHMARKS.md: the best)")
    parser.add_argument("--prefill_batch", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=8, help="frame workers per process")
    parser.add_argument("--run_timeout", type=int, default=900, help="seconds before one N-process run is stopped")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:  # toy sizes, so the whole sweep runs in seconds on two cores
        args.tokens, args.clips_per_gpu, args.infer_batch, args.prefill_batch, args.num_workers = 4, 2, 2, 2, 0
    if args.worker:
        worker_main(args)
        return

    import torch
    import transformers

    report: dict = {
        "device": None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny test model (CPU check)" if args.tiny else
                 "Qwen2.5-VL-7B architecture (Cosmos-Reason1-7B), random bf16 weights",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "method": {
            "train": "LoRA r16 on the language model, no activation checkpointing, TRL fused LM head, bf16 autocast, "
                     "AdamW; DDP through accelerate for N > 1; same batch per GPU; tokens/s = N x batch x tokens per "
                     f"sample / slowest rank's median step ({args.steps} steps after {args.warmup} warm-up)",
            "infer": "infer/engine.py, recipe sampling, forced completions, synthetic frames; N processes split "
                     "N x clips_per_gpu clips with accelerate's split_between_processes; clips/hour = all clips / "
                     "slowest process's wall time (engine start-up included)",
        },
        "settings": {"batch_per_gpu": args.batch, "clips_per_gpu": args.clips_per_gpu, "infer_batch": args.infer_batch,
                     "prefill_batch": args.prefill_batch, "completion_tokens": args.tokens, "num_workers": args.num_workers},
        "train_tokens_per_s": {},
        "infer_clips_per_hour": {},
        "train_efficiency": {},
        "infer_efficiency": {},
        "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for count in counts_for(args):
            print(f"== {count} process(es)", flush=True)
            run = launch(count, args, Path(scratch) / f"result_{count}.json")
            report["runs"][str(count)] = run
            report["device"] = report["device"] or run.get("device")
            for part, key in (("train", "train_tokens_per_s"), ("infer", "infer_clips_per_hour")):
                value = run.get(part, {}).get(key.split("_", 1)[1])
                if value is not None:
                    report[key][str(count)] = value
            report["train_efficiency"] = efficiencies(report["train_tokens_per_s"])
            report["infer_efficiency"] = efficiencies(report["infer_clips_per_hour"])
            out.write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(run), flush=True)

    print(f"\n{report['device']}")
    print(f"{'GPUs':>4} {'train tok/s':>12} {'eff':>6} {'infer clips/h':>14} {'eff':>6}")
    for n in report["runs"]:
        train = report["train_tokens_per_s"].get(n)
        infer = report["infer_clips_per_hour"].get(n)
        print(f"{n:>4} {train if train is not None else 'error':>12} {report['train_efficiency'].get(n, ''):>6} "
              f"{infer if infer is not None else 'error':>14} {report['infer_efficiency'].get(n, ''):>6}")


if __name__ == "__main__":
    main()
