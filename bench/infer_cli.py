"""Captioning as users run it: `python -m avlabel.infer` on a dataset the builder wrote, timed from outside.

bench/infer_7b.py times the engine in one process (the model built in memory, synthetic frames);
this runs the command itself, as a separate process, on real H.264 clips:

  1. the model folder: the Qwen2.5-VL-7B architecture of Cosmos-Reason1-7B with random bf16 weights
     and the Qwen processor, saved for `from_pretrained` (bench/fsdp_runs.py `build_model`);
  2. clips: `--distinct` synthetic 1280x720 clips of `--seconds` s at 30 fps (avlabel.demo.synthetic),
     hardlinked under further ids up to the largest `--clips` (each id is its own file, decoded on its
     own: bench/builder.py `_link_input`), built into a dataset with `avlabel build` (train split only);
  3. for each count in `--clips`: `python -m avlabel.infer --config recipes/infer/cosmos_reason1_7b.yaml
     --model <folder> --input <dataset> --split train --limit <count>`, every caption forced to `--tokens`
     tokens (`--min_new_tokens`/`--max_new_tokens`: random weights never stop on their own), as the loop's;
  4. `--loop`: bench/infer_7b.py's engine at the recipe's batch size on the same machine, the ceiling.

Measured for each run, from outside the process (every output line is stored with the second it
arrived, in `--logs`/infer_cli_<count>.log; the captions file is polled every 0.2 s, and records are
written a batch at a time):

  first_caption_s        launch -> the first batch of captions on disk (everything a user waits for)
  steady_clips_per_hour  clips written after the first batch, over the time from the first write to the last
  startup_s              first_caption_s less the first batch's own time at the steady rate: what the
                         command does before the model starts on its first batch
  weight_load_s          the command's own `model_load_seconds` (summary.json): weights from disk to the GPU
  startup_excluding_load_s  startup_s - weight_load_s
  total_s                launch -> exit;  after_last_caption_s: the last write -> exit (records, labels)
  peak_gib               the command's own `peak_gib` (summary.json: torch.cuda.max_memory_allocated),
                         the same counter as the loop's; gpu_peak_gib: nvidia-smi's memory.used, polled
  two_runs               with two counts: (larger - smaller) clips over the difference of their total times
                         (the marginal rate) and the start-up that leaves for the smaller run

Results merge into `--out` (one entry per count, and per count and `--command_args`), so the counts can run in
separate calls on one machine:

    python bench/infer_cli.py --clips 256 --loop && python bench/infer_cli.py --clips 2048   # GPU
    python bench/infer_cli.py --tiny --out /tmp/infer_cli_tiny.json   # CPU check: tiny model, small clips
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.builder import _link_input
from bench.fsdp_runs import GpuMemory, build_model, gpu_names
from bench.scaling import child_env

RECIPE = "recipes/infer/cosmos_reason1_7b.yaml"
TINY_RECIPE = "recipes/infer/tiny.yaml"
CLIP = {"width": 1280, "height": 720, "fps": 30.0}
TINY_CLIP = {"width": 256, "height": 144, "fps": 10.0}


# ----------------------------------------------------------------------------- shared with bench/train_cli.py


def prepare_dataset(work: Path, count: int, distinct: int, seconds: float, tiny: bool) -> Path:
    """`count` clips built into a dataset (train split) at work/dataset_<count>; reused when already there."""
    from avlabel.data_builder.build import BuildArguments, build
    from avlabel.demo.synthetic import generate

    dataset = work / f"dataset_{count}"
    if (dataset / "train").is_dir():
        return dataset
    size = TINY_CLIP if tiny else CLIP
    raw = work / f"raw_{size['width']}x{size['height']}_{seconds:g}s"
    start = time.perf_counter()
    ids = generate(raw, min(distinct, count), seed=0, seconds=seconds, progress=False, **size)
    linked = work / f"clips_{count}"
    shutil.rmtree(linked, ignore_errors=True)
    _link_input(raw, ids, count, linked)
    result = build(BuildArguments(input=str(linked), output_dir=str(dataset), test_size=0))
    if result.problems or result.num_rows != count:
        raise SystemExit(f"the builder set clips aside: {result.problems}")
    print(f"{dataset}: {count} clips ({len(ids)} distinct, {size['width']}x{size['height']}, {seconds:g} s, "
          f"{size['fps']:g} fps) in {time.perf_counter() - start:.0f} s", flush=True)
    return dataset


def prepare_model(work: Path, tiny: bool) -> Path:
    """The model folder (bench/fsdp_runs.py `build_model`: the 7B architecture, or the tiny test model)."""
    folder = work / ("tiny_model" if tiny else "model")
    start = time.perf_counter()
    build_model(folder, tiny)
    print(f"{folder}: ready in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


class TimedRun:
    """A command in its own process group: each output line stored with the second it arrived, a file's line
    count polled, the GPUs' memory polled (nvidia-smi), the whole group ended at `timeout`."""

    def __init__(self, command: list[str], log_path: Path, watch: Path | None = None, timeout: float = 3600,
                 batch: int | None = None):
        self.command, self.log_path, self.watch, self.timeout = command, log_path, watch, timeout
        self.batch = batch  # lines `watch` grows by at once (the caption batch): a count between is a write half read
        self.lines: list[tuple[float, str]] = []
        self.writes: list[tuple[float, int]] = []  # (seconds, lines in `watch`) whenever the count grew
        self.rc: int | str | None = None
        self.seconds = 0.0

    def _poll(self, start: float, done: threading.Event) -> None:
        count = 0
        while not done.wait(0.2):
            try:
                with open(self.watch, "rb") as handle:
                    now = sum(1 for _ in handle)
            except FileNotFoundError:
                continue
            if now > count:  # (the final merge rewrites the file: never fewer lines)
                count, seconds = now, round(time.perf_counter() - start, 2)
                if self.writes and self.writes[-1][1] % self.batch:  # the last poll read a batch half written
                    self.writes[-1] = (seconds, count)
                else:
                    self.writes.append((seconds, count))

    def run(self) -> TimedRun:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with GpuMemory() as memory, open(self.log_path, "w", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(self.command)}\n")
            start = time.perf_counter()
            process = subprocess.Popen(self.command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            timer = threading.Timer(self.timeout, os.killpg, (process.pid, signal.SIGKILL))
            timer.start()
            done = threading.Event()
            poller = threading.Thread(target=self._poll, args=(start, done), daemon=True)
            if self.watch is not None:
                poller.start()
            pending = b""
            for chunk in iter(lambda: process.stdout.read1(65536), b""):
                pending += chunk
                *complete, pending = re.split(rb"[\r\n]", pending)  # tqdm redraws with \r
                for raw in complete:
                    if raw.strip():
                        text = raw.decode("utf-8", "replace")
                        self.lines.append((round(time.perf_counter() - start, 2), text))
                        log.write(f"{self.lines[-1][0]:9.2f}  {text}\n")
            self.rc = process.wait()
            self.seconds = time.perf_counter() - start
            timer.cancel()
            done.set()
            if self.watch is not None:
                poller.join()
            if self.rc == -signal.SIGKILL and self.seconds >= self.timeout:
                self.rc = "timeout"
        self.gpu_peak_gib = round(max(memory.peak) / 1024, 2) if memory.peak else None
        return self


def loop_run(script: str, arguments: list[str], out: Path, log_path: Path, timeout: float) -> dict:
    """The loop benchmark `script` (bench/infer_7b.py, bench/train_7b.py) as its own process; its JSON."""
    run = TimedRun([sys.executable, script, *arguments, "--out", str(out)], log_path, timeout=timeout).run()
    if run.rc != 0 or not out.exists():
        return {"error": f"{script} exited {run.rc}; see {log_path.name}", "log": log_path.name}
    return {**json.loads(out.read_text()), "log": log_path.name, "wall_s": round(run.seconds, 1)}


def read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def recipe_values(recipe: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / recipe).read_text(encoding="utf-8"))


def add_run_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options both command benchmarks take: the CPU check, where they work and log, a run's limit, the result."""
    parser.add_argument("--tiny", action="store_true", help="CPU check: the tiny test model, small clips, a short run")
    parser.add_argument("--work", default="/tmp/cli_bench", help="model folder, clips and runs (kept for reruns)")
    parser.add_argument("--logs", default=None, help="folder for the runs' timestamped logs (default: --work)")
    parser.add_argument("--run_timeout", type=float, default=1200, help="seconds before a run is ended")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / f"{name}.json"))


def settle(args: argparse.Namespace, defaults: dict[str, tuple]) -> Path:
    """Fill the options left unset ({name: (full size, tiny)}), give the tiny check its own work folder, and make it."""
    for name, (full_size, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full_size)
    if args.tiny:
        args.work = args.work + "_tiny"
    args.logs = args.logs or args.work
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def result_header(tiny: bool) -> dict:
    """Where, when and which model, as each command benchmark's result starts."""
    return {
        "device": gpu_names(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny qwen2_5_vl test model" if tiny
        else "qwen2_5_vl_7b architecture (Cosmos-Reason1-7B), random bf16 weights, Qwen processor",
    }


# ----------------------------------------------------------------------------- captioning


def caption_run(args, model: Path, dataset: Path, count: int) -> dict:
    out = Path(args.work) / f"captions_{count}"
    shutil.rmtree(out, ignore_errors=True)
    recipe = TINY_RECIPE if args.tiny else RECIPE
    command = [sys.executable, "-m", "avlabel.infer", "--config", recipe, "--model", str(model), "--input", str(dataset),
               "--split", "train", "--limit", str(count), "--output_dir", str(out),
               "--max_new_tokens", str(args.tokens), "--min_new_tokens", str(args.tokens), *shlex.split(args.command_args)]
    print(f"captioning {count} clips ...", flush=True)
    batch = next((int(value) for flag, value in zip(command, command[1:]) if flag == "--batch_size"),
                 recipe_values(recipe)["batch_size"])
    run = TimedRun(command, Path(args.logs) / f"infer_cli_{count}.log", watch=out / "captions.jsonl",
                   timeout=args.run_timeout, batch=batch).run()
    summary = read_results(out / "summary.json")
    this_run = summary.get("this_run", {})
    outcome = {
        "command": shlex.join(["python", *command[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "clips": count,
        "rc": run.rc,
        "total_s": round(run.seconds, 1),
        "captioned": summary.get("captioned"),
        "failed": summary.get("failed"),
        "weight_load_s": this_run.get("model_load_seconds"),
        "peak_gib": this_run.get("peak_gib"),
        "gpu_peak_gib": run.gpu_peak_gib,
        "prompt_tokens_per_clip": round(summary["prompt_tokens"] / summary["captioned"], 1) if summary.get("captioned") else None,
        "completion_tokens_per_clip": round(summary["completion_tokens"] / summary["captioned"], 1) if summary.get("captioned") else None,
        "writes": run.writes,
        "log": run.log_path.name,
    }
    if run.writes:
        (first_s, first_clips), (last_s, last_clips) = run.writes[0], run.writes[-1]
        outcome["first_caption_s"] = first_s
        outcome["after_last_caption_s"] = round(run.seconds - last_s, 1)
        if last_clips > first_clips:
            rate = (last_clips - first_clips) / (last_s - first_s)  # clips a second once the first batch is out
            outcome["steady_clips_per_hour"] = round(rate * 3600, 1)
            outcome["startup_s"] = round(first_s - first_clips / rate, 1)
            if outcome["weight_load_s"] is not None:
                outcome["startup_excluding_load_s"] = round(outcome["startup_s"] - outcome["weight_load_s"], 1)
    shutil.rmtree(out, ignore_errors=True)
    return outcome


def two_runs(runs: dict) -> dict | None:
    """The marginal rate between the smallest and the largest finished run (the recipe's flags only), and the
    start-up it leaves."""
    finished = sorted((run for key, run in runs.items() if key.isdigit() and run.get("rc") == 0), key=lambda run: run["clips"])
    if len(finished) < 2 or finished[-1]["clips"] == finished[0]["clips"]:
        return None
    small, large = finished[0], finished[-1]
    if large["total_s"] <= small["total_s"]:  # more clips in no more time (a tiny model's batches): no rate to tell
        return None
    rate = (large["clips"] - small["clips"]) / (large["total_s"] - small["total_s"])
    return {"clips": [small["clips"], large["clips"]], "marginal_clips_per_hour": round(rate * 3600, 1),
            f"startup_s_of_{small['clips']}": round(small["total_s"] - small["clips"] / rate, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", default=None, help="clip counts, one captioning run each (default 256,2048; tiny 8,16)")
    parser.add_argument("--distinct", type=int, default=None, help="distinct clips rendered, the rest are hardlinks "
                        "(default 16; tiny 2)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="clip length (default 10: at 2 fps, the loop's 20 frames; tiny 2)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="caption length forced on every clip, as the loop's (default 400; tiny 8)")
    parser.add_argument("--loop", action="store_true", help="also run bench/infer_7b.py's engine at the recipe's batch")
    parser.add_argument("--command_args", default="", help="more flags for the command, last (e.g. '--num_workers 12')")
    add_run_arguments(parser, "infer_cli")
    args = parser.parse_args()
    work = settle(args, {"clips": ("256,2048", "8,16"), "distinct": (16, 2), "seconds": (10.0, 2.0), "tokens": (400, 8)})
    counts = [int(count) for count in args.clips.split(",")]

    model = prepare_model(work, args.tiny)
    dataset = prepare_dataset(work, max(counts), args.distinct, args.seconds, args.tiny)
    out = Path(args.out)
    results = read_results(out)
    results.update({
        **result_header(args.tiny),
        "clip": {**(TINY_CLIP if args.tiny else CLIP), "seconds": args.seconds, "distinct": min(args.distinct, max(counts)),
                 "completion_tokens": args.tokens},
    })
    runs = results.setdefault("runs", {})
    for count in counts:
        key = f"{count} {args.command_args}".strip()  # a run with more flags is an entry of its own
        runs[key] = caption_run(args, model, dataset, count)
        print(json.dumps({k: v for k, v in runs[key].items() if k != "writes"}), flush=True)
        results["two_runs"] = two_runs(runs)
        write_results(out, results)

    if args.loop:  # the engine in one process, synthetic frames: the same batch, prefill and workers as the recipe
        recipe = recipe_values(TINY_RECIPE if args.tiny else RECIPE)
        arguments = ["--baseline_clips", "0", "--tokens", str(args.tokens), "--batch_sizes", str(recipe["batch_size"]),
                     "--prefill_batch_size", str(recipe["prefill_batch_size"]), "--num_workers", str(recipe["num_workers"]),
                     *(["--tiny", "--clips_per_batch", "1"] if args.tiny else [])]
        print("loop: bench/infer_7b.py ...", flush=True)
        loop = loop_run("bench/infer_7b.py", arguments, work / "infer_7b.json", Path(args.logs) / "infer_cli_loop.log",
                        args.run_timeout)
        engine = loop.get("engine") or {}
        results["loop"] = {"command": shlex.join(["python", "bench/infer_7b.py", *arguments]), "date": loop.get("date"),
                           **{key: engine.get(key) for key in ("clips", "clips_per_hour", "seconds_per_clip", "peak_gib",
                                                               "batch", "prompt_tokens")},
                           **({"error": loop["error"]} if "error" in loop else {})}
        write_results(out, results)
    for run in runs.values():
        if results.get("loop", {}).get("clips_per_hour") and run.get("steady_clips_per_hour"):
            run["steady_vs_loop"] = round(run["steady_clips_per_hour"] / results["loop"]["clips_per_hour"], 3)
    write_results(out, results)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
