"""`accelerate launch -m infer` on 1, 2 and 4 GPUs: the same records, one GPU per process, resumable.

This runs the captioning command exactly as the README gives it, on the clips that
`python bench/fsdp_runs.py prepare .scaling_data` built (12 synthetic clips, decoded with
PyAV in the worker processes), with a randomly initialised Qwen2.5-VL-7B (Cosmos-Reason1-7B's
architecture) saved the way a checkpoint is, greedy decoding and `--max_new_tokens 64`:

  1. on 1 GPU, then on 2 and on 4 (those the machine has), each into its own output folder;
     the merged `captions.jsonl` of each is compared with the 1-GPU one, clip by clip
     (everything but the timings). Every run decodes one clip at a time (`--batch_size 1`),
     so each clip is computed with the same kernels whatever the GPU count; batching
     changes which bf16 kernels run, and a near-tie token can then differ, on one GPU as
     much as on many. `--batched` adds one more pair of runs with the recipe's batching and
     reports how many clips match then;
  2. the widest command again: a rerun must skip every clip and change no record.

The nvidia-smi peak per GPU while each run lasts shows that every process had its own GPU.
Writes `--out` (JSON) and the runs' output to `--logs`/sharded_infer.log.

    python bench/sharded_infer.py .scaling_data --out $OUT/sharded_infer.json --logs $OUT   # GPUs
    python bench/sharded_infer.py .scaling_data --tiny --out /tmp/si.json --logs /tmp/si    # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fsdp_runs import GpuMemory, build_model, gpu_names
from bench.scaling import NCCL_SAFETY, child_env, counts_for, run_process_group
from avlabel.infer.records import CAPTIONS, SUMMARY, read_records

MAX_NEW_TOKENS = 64


def records(output_dir: Path) -> dict[str, dict]:
    """clip id -> its record, without the timings (which differ from run to run)."""
    path = output_dir / CAPTIONS
    rows = read_records(path) if path.exists() else []
    return {row["clip_id"]: {k: v for k, v in row.items() if k != "seconds"} for row in rows}


def caption(args, processes: int, output_dir: Path, name: str, extra: list[str]) -> dict:
    """One `accelerate launch -m infer` run; its rc, wall time, summary and per-GPU memory peak."""
    recipe = "recipes/infer/tiny.yaml" if args.tiny else "recipes/infer/cosmos_reason1_7b.yaml"
    # the README's command; on CPUs torchrun forms the gloo group (accelerate's CPU launcher wants MPI)
    launcher = "torch.distributed.run --nproc_per_node" if args.tiny else "accelerate.commands.launch --num_processes"
    command = [sys.executable, "-m", *launcher.split(), str(processes)]
    command += ["-m", "infer", "--config", recipe, "--model", args.model_dir, "--input", args.clips,
                "--output_dir", str(output_dir), "--temperature", "0", "--max_new_tokens", str(MAX_NEW_TOKENS),
                "--num_workers", "2", *extra]
    env = child_env()
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    with open(Path(args.logs) / "sharded_infer.log", "a", encoding="utf-8") as log:
        log.write(f"\n# {name}\n$ {' '.join(command)}\n")
        log.flush()
        with GpuMemory() as memory:
            rc = run_process_group(command, env, args.run_timeout, stdout=log, stderr=log)
    summary_path = output_dir / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"processes": processes, "rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "gpu_mib_peak": memory.peak, "this_run": summary.get("this_run"), "captioned": summary.get("captioned")}


def compare(reference: dict[str, dict], other: dict[str, dict]) -> dict:
    same = [clip for clip in reference if other.get(clip) == reference[clip]]
    return {"clips": len(reference), "identical": len(same),
            "differing": sorted(set(reference) - set(same)), "missing": sorted(set(reference) - set(other))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="folder made by `bench/fsdp_runs.py prepare`")
    parser.add_argument("--out", required=True)
    parser.add_argument("--logs", required=True)
    parser.add_argument("--work", default="/dev/shm/sharded_infer")
    parser.add_argument("--model_dir", default="/dev/shm/fsdp_runs/model", help="built here unless it holds a model")
    parser.add_argument("--gpus", default=None, help="GPU counts, e.g. 1,2,4 (default: 1, 2, 4, 8 up to the machine's)")
    parser.add_argument("--batched", action="store_true", help="also compare 1 and the most GPUs at the recipe's batching")
    parser.add_argument("--run_timeout", type=float, default=300)
    parser.add_argument("--tiny", action="store_true", help="CPU check: tiny model, gloo processes")
    args = parser.parse_args()
    for name, value in NCCL_SAFETY.items():
        os.environ.setdefault(name, value)

    work, logs = Path(args.work), Path(args.logs)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "sharded_infer.log").unlink(missing_ok=True)
    if args.tiny:
        args.model_dir = str(work / "model")
    build_model(Path(args.model_dir), args.tiny)
    args.clips = str(Path(args.data).resolve() / "dataset" / "*" / "*.mp4")
    counts = counts_for(args)
    report: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": gpu_names(), "model_dir": args.model_dir,
                    "max_new_tokens": MAX_NEW_TOKENS, "runs": {}, "same_as_1_gpu": {}}

    def save():
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    one_at_a_time = ["--batch_size", "1", "--prefill_batch_size", "1"]
    for n in counts:
        report["runs"][str(n)] = caption(args, n, work / f"gpus_{n}", f"infer_{n}", [*one_at_a_time, "--overwrite", "true"])
        if n != counts[0]:
            report["same_as_1_gpu"][str(n)] = compare(records(work / f"gpus_{counts[0]}"), records(work / f"gpus_{n}"))
        save()
        print(n, json.dumps(report["runs"][str(n)]), json.dumps(report["same_as_1_gpu"].get(str(n))), flush=True)

    widest = work / f"gpus_{counts[-1]}"
    before = records(widest)
    rerun = caption(args, counts[-1], widest, f"infer_{counts[-1]}_rerun", one_at_a_time)
    rerun["records_unchanged"] = records(widest) == before and bool(before)
    report["rerun"] = rerun
    save()
    print("rerun", json.dumps(rerun), flush=True)

    if args.batched:  # the recipe's batching (batch_size, prefill_batch_size from the infer recipe)
        for n in (counts[0], counts[-1]):
            report["runs"][f"{n}_batched"] = caption(args, n, work / f"batched_{n}", f"infer_{n}_batched", ["--overwrite", "true"])
            save()
        report["batched_same_as_1_gpu"] = compare(records(work / f"batched_{counts[0]}"), records(work / f"batched_{counts[-1]}"))
        save()
        print("batched", json.dumps(report["batched_same_as_1_gpu"]), flush=True)


if __name__ == "__main__":
    main()
