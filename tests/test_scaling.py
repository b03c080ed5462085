"""Scaling benchmark (bench/scaling.py): the multi-process path on the CPU, and its arithmetic.

The GPU numbers come from the device run (BENCHMARKS.md); here the same launcher and
workers run with tiny models in two gloo processes, so the sharding, the DDP wrapping and
the gathering of per-rank results are exercised for real.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_train_with_ddp_and_split_the_clips(tmp_path):
    out = tmp_path / "scaling.json"
    done = subprocess.run(
        [sys.executable, "bench/scaling.py", "--tiny", "--gpus", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    run = report["runs"]["2"]
    assert run["processes"] == 2 and "error" not in run["train"] and "error" not in run["infer"], run

    train = run["train"]
    assert train["ddp"] and len(train["seconds_per_step_by_rank"]) == 2
    assert math.isfinite(train["final_loss"])
    # 2 processes x batch x tokens per sample over the slower rank's step
    expected = 2 * train["batch_per_gpu"] * train["tokens_per_sample"] / max(train["seconds_per_step_by_rank"])
    assert report["train_tokens_per_s"]["2"] == train["tokens_per_s"]
    assert abs(train["tokens_per_s"] - expected) <= 0.01 * expected

    infer = run["infer"]
    clips_per_gpu = report["settings"]["clips_per_gpu"]
    assert infer["clips_by_rank"] == [clips_per_gpu, clips_per_gpu]  # each process captioned its own share
    assert infer["clips"] == 2 * clips_per_gpu
    assert report["infer_clips_per_hour"]["2"] == infer["clips_per_hour"] > 0


def test_efficiency_is_throughput_over_n_times_one_gpu():
    sys.path.insert(0, str(ROOT))
    from bench.scaling import efficiencies

    assert efficiencies({"1": 100.0, "2": 180.0, "4": 340.0}) == {"1": 1.0, "2": 0.9, "4": 0.85}
    assert efficiencies({"2": 180.0}) == {}  # no single-GPU baseline, no efficiency


@pytest.mark.slow
def test_sharded_captioning_benchmark_compares_records_and_reruns(synthetic_dataset_dir, tmp_path):
    """bench/sharded_infer.py on the CPU: 1 and 2 processes give the same records, a rerun skips every clip."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset").symlink_to(synthetic_dataset_dir)
    out = tmp_path / "sharded_infer.json"
    done = subprocess.run(
        [sys.executable, "bench/sharded_infer.py", str(data), "--tiny", "--out", str(out), "--logs", str(tmp_path / "logs"),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    clips = len(list(synthetic_dataset_dir.glob("*/*.mp4")))
    assert [report["runs"][n]["this_run"]["processes"] for n in ("1", "2")] == [1, 2]
    assert report["same_as_1_gpu"]["2"] == {"clips": clips, "identical": clips, "differing": [], "missing": []}
    rerun = report["rerun"]
    assert rerun["this_run"]["skipped"] == clips and rerun["this_run"]["captioned"] == 0 and rerun["records_unchanged"]
