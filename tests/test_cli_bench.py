"""Benchmarks of the commands themselves (bench/infer_cli.py, bench/train_cli.py) on the CPU.

The GPU figures come from the device run; here each script runs the real command with the tiny test
model on a small builder dataset, and what it reads from outside (log lines, the captions file, the
command's own summary and train_results.json) must add up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, tmp_path: Path, *options: str) -> dict:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, script, "--tiny", "--work", str(tmp_path / "work"), "--out", str(out), *options],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_infer_cli_times_the_caption_command_and_its_loop(tmp_path):
    report = _bench("bench/infer_cli.py", tmp_path, "--clips", "4,8", "--tokens", "32", "--loop")
    for count in (4, 8):
        run = report["runs"][str(count)]
        assert run["rc"] == 0 and run["captioned"] == count and run["failed"] == 0
        assert run["command"].startswith("python -m avlabel.infer --config recipes/infer/tiny.yaml ")
        assert f"--limit {count} " in run["command"]
        assert run["completion_tokens_per_clip"] == 32  # forced, as the loop's
        # the captions file grew batch by batch (tiny.yaml: 4 clips a batch) up to every clip
        assert [clips for _, clips in run["writes"]][-1] == count
        assert 0 < run["first_caption_s"] <= run["writes"][-1][0] <= run["total_s"]
        assert run["weight_load_s"] > 0 and run["peak_gib"] is None and run["gpu_peak_gib"] is None
        assert (tmp_path / "work_tiny" / f"infer_cli_{count}.log").read_text().startswith("$ ")
    eight = report["runs"]["8"]
    # a steady rate needs two batch writes apart; on a fast CPU the tiny model's two batches can land in one poll
    if len(eight["writes"]) > 1:
        assert eight["steady_clips_per_hour"] > 0 and eight["startup_s"] < eight["first_caption_s"]
    else:
        assert "steady_clips_per_hour" not in eight
    # the marginal rate needs the larger run to take longer, which the tiny model on a fast CPU may not
    assert report["two_runs"] is None or report["two_runs"]["clips"] == [4, 8]
    assert report["loop"]["clips_per_hour"] > 0 and report["loop"]["batch"] == 4
    assert report["device"] == "cpu" and report["date"]


@pytest.mark.slow
def test_train_cli_times_the_training_command(tmp_path):
    report = _bench("bench/train_cli.py", tmp_path, "--methods", "lora")
    run = report["runs"]["lora"]
    assert run["rc"] == 0 and run["command"].startswith("python -m avlabel.train --config recipes/cosmos_reason1_7b/lora.yaml ")
    assert run["steps"] == 3 and len(run["step_s"]) == 3 and run["samples_per_step"] == 4
    recipe = yaml.safe_load((ROOT / "recipes" / "cosmos_reason1_7b" / "lora.yaml").read_text(encoding="utf-8"))
    # the recipe's, as the run's own recipe.yaml gives them back
    assert run["batch"] == recipe["per_device_train_batch_size"]
    assert run["gradient_checkpointing"] is recipe["activation_checkpointing"]
    assert 0 < run["first_step_s"] == run["step_s"][0] < run["step_s"][-1] < run["total_s"]
    assert run["steady_tokens_per_s"] > 0 and run["trainer_tokens_per_s"] > 0 and run["tokens"] > 0
    assert run["startup_s"] < run["first_step_s"]
    assert run["weight_load_s"] > 0 and run["peak_gib"] is None


def test_step_times_reads_the_trainers_log_lines():
    sys.path.insert(0, str(ROOT))
    from bench.train_cli import step_times

    lines = [
        (3.0, "{'loss': '7.146', 'grad_norm': '0.7997', 'num_tokens': '5667', 'epoch': '0.3333'}"),
        (3.5, " 33%|███▎      | 1/3 [00:11<00:23, 11.64s/it]"),
        (9.0, "{'loss': '7.147', 'num_tokens': '1.127e+04', 'epoch': '0.6667'}"),
        (9.2, "{'train_runtime': '28.47', 'train_loss': '7.144', 'epoch': '1'}"),  # the summary: no step
        (9.3, "{'loss': broken"),
    ]
    assert step_times(lines) == [3.0, 9.0]
