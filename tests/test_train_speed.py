"""Training speed settings (issue 21) leave the numbers unchanged: gradients, losses, the bench's own reading.

* padded vision windows (avlabel/families/base.py `padded_windows_attention`): the same loss and
  gradients of every trainable weight, vision tower included, as transformers' one SDPA call
  per window, and the same losses over a short run of the training script;
* checkpointing every other layer (`activation_checkpointing_kwargs: {every_n_layers: 2}`): the
  same losses as no checkpointing;
* Liger's kernels: the same losses as transformers' layers, on a GPU only (Triton);
* bench/train_fsdp.py: its CPU dry run reads the training script's logs into its JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES

from avlabel.families import family_of
from avlabel.families.base import VISION_ATTENTION

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny" / "sft.yaml"
# Frames of 140x252 for Qwen2.5-VL (5x9 merged tokens: windows of 4x4, 4x1, 1x4 and 1x1 tokens, so the
# padding mask is exercised), 128x256 for Qwen3-VL (whose windows are its frames)
WIDE_FRAMES = {"max_frames": 4, "min_pixels": 3136, "max_pixels": 256 * 144}


def _training_batch(model_dir, dataset_dir, rows: int = 1) -> dict:
    """`rows` samples of the synthetic dataset, collated by the training collator at WIDE_FRAMES."""
    from datasets import Video, load_dataset
    from transformers import AutoConfig, AutoProcessor

    from avlabel.core.prompts import load_prompts
    from avlabel.train.collator import FrameCache, VideoSFTCollator
    from avlabel.train.sft import TrainScriptArguments

    sampling = TrainScriptArguments(**WIDE_FRAMES).resolve_sampling(AutoConfig.from_pretrained(model_dir), str(model_dir))
    collator = VideoSFTCollator(processor=AutoProcessor.from_pretrained(model_dir), prompts=load_prompts(short=True),
                                frames=FrameCache(None, sampling), family=family_of(model_dir), answer_format="plain")
    dataset = load_dataset(str(dataset_dir), split="train")
    dataset = dataset.cast_column("video", Video(decode=False))
    return collator([dataset[i] for i in range(rows)])


def _loss_and_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: param.grad.detach().clone() for name, param in model.named_parameters()
                           if param.requires_grad and param.grad is not None}


def _vision_sdpa_calls(model, family, batch, monkeypatch) -> int:
    """How many SDPA calls one forward of the vision tower makes."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
        family.vision_tower(model)(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"])
    return len(calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_vision_windows_give_the_per_window_loss_and_gradients(tiny_model_of, synthetic_dataset_dir, family,
                                                                      monkeypatch):
    from transformers import AutoModelForImageTextToText

    model_dir = tiny_model_of(family)
    # float64: the two paths then agree to rounding, so any real difference shows
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="sdpa").double().train()
    adapter = family_of(model)
    batch = _training_batch(model_dir, synthetic_dataset_dir)
    batch["pixel_values_videos"] = batch["pixel_values_videos"].double()
    depth = model.config.vision_config.depth

    per_window_calls = _vision_sdpa_calls(model, adapter, batch, monkeypatch)
    loss, gradients = _loss_and_gradients(model, batch)
    assert adapter.pad_vision_windows(model)
    assert adapter.vision_tower(model).config._attn_implementation == VISION_ATTENTION
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # the language model keeps its own
    padded_calls = _vision_sdpa_calls(model, adapter, batch, monkeypatch)
    padded_loss, padded_gradients = _loss_and_gradients(model, batch)

    # the input has several windows per layer (else both paths would be one call and prove nothing)
    assert per_window_calls > depth and padded_calls == depth, (per_window_calls, padded_calls)
    torch.testing.assert_close(padded_loss, loss, rtol=1e-10, atol=0)
    assert padded_gradients.keys() == gradients.keys()
    vision = [name for name in gradients if ".visual." in f".{name}" and "merger" not in name]
    assert vision and all(gradients[name].abs().sum() > 0 for name in vision)  # the vision tower's weights train
    for name, gradient in gradients.items():
        torch.testing.assert_close(padded_gradients[name], gradient, rtol=1e-8, atol=1e-12, msg=name)


def test_an_attention_other_than_sdpa_is_left_as_asked_for(tiny_model_dir):
    """Only the per-window SDPA path is replaced (flash-attn already attends to every window in one call)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="eager")
    adapter = family_of(model)
    assert adapter.pad_vision_windows(model) is False
    assert adapter.vision_tower(model).config._attn_implementation == "eager"


# ----------------------------------------------------------------------------- short runs of the training script


def _short_run(model_dir, dataset_dir, output_dir, **extra) -> Path:
    """Four full fine-tuning steps of the tiny recipe at WIDE_FRAMES, a loss logged each step."""
    from avlabel.train.sft import train

    overrides = {
        "model_name_or_path": str(model_dir), "dataset_name": str(dataset_dir), "output_dir": str(output_dir),
        "max_steps": 4, "per_device_train_batch_size": 2, "max_train_samples": 8, "logging_steps": 1,
        "eval_strategy": "no", "save_strategy": "no", "report_to": ["none"], "export_merged": False,
        "lr_scheduler_type": "constant", "warmup_steps": 0, **WIDE_FRAMES, **extra,
    }
    return train(TINY_RECIPE, overrides)


def _losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, synthetic_dataset_dir, tmp_path_factory):
    """The short run with transformers' paths: one SDPA call per window, no checkpointing."""
    return _short_run(tiny_model_dir, synthetic_dataset_dir, tmp_path_factory.mktemp("reference"),
                      padded_vision_windows=False)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["padded_vision_windows", "checkpoint_every_2_layers"])
def test_a_speed_setting_leaves_the_training_losses_unchanged(reference_run, tiny_model_dir, synthetic_dataset_dir,
                                                              tmp_path, change):
    settings = {
        "padded_vision_windows": {"padded_vision_windows": True},
        "checkpoint_every_2_layers": {"padded_vision_windows": False, "activation_checkpointing": True,
                                      "activation_checkpointing_kwargs": {"every_n_layers": 2}},
    }[change]
    out = _short_run(tiny_model_dir, synthetic_dataset_dir, tmp_path / change, **settings)
    reference, changed = _losses(reference_run), _losses(out)
    assert len(reference) == len(changed) == 4
    assert changed == pytest.approx(reference, rel=1e-6), (change, reference, changed)
    assert reference[-1] != reference[0]  # the weights moved, so equal losses are four steps' worth of equal gradients
    used = json.loads((out / "train_results.json").read_text())["speed_settings"]
    before = json.loads((reference_run / "train_results.json").read_text())["speed_settings"]
    assert before["padded_vision_windows"] is False
    assert used["padded_vision_windows"] is (change == "padded_vision_windows")
    if change == "checkpoint_every_2_layers":
        assert used["activation_checkpointing"] and used["activation_checkpointing_kwargs"] == {"every_n_layers": 2}


@pytest.mark.parametrize("family", FAMILIES)
def test_liger_is_used_only_where_it_can_patch_the_family(family):
    """An H200 run of the LoRA recipe with liger-kernel 0.8.5 installed stopped at the trainer's start: under
    transformers 5.23+ Liger's Qwen-VL modules import output classes transformers removed. The training script
    asks first and falls back; this runs the same check against the installed packages."""
    from importlib import metadata

    from packaging.version import Version

    from avlabel.train.sft import liger_problem

    pytest.importorskip("liger_kernel", reason="pip install 'avlabel[liger]'")
    liger, transformers_version = metadata.version("liger-kernel"), metadata.version("transformers")
    problem = liger_problem(family)
    if Version(liger) <= Version("0.8.5") and Version(transformers_version) >= Version("5.23"):
        # the mismatch the H200 run met: Liger's module imports an output class transformers 5.23 removed
        assert problem is not None and "CausalLMOutputWithPast" in problem
        assert problem.startswith(f"liger-kernel {liger} can't patch {family} under transformers {transformers_version}")
    else:
        assert problem is None, problem  # a Liger that imports for the family: the run uses it
    assert "can't patch not_a_model_type" in liger_problem("not_a_model_type")  # Liger has no module for it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton kernels: they run on a GPU only")
def test_liger_kernels_leave_the_training_losses_unchanged(tiny_model_dir, synthetic_dataset_dir, tmp_path):
    pytest.importorskip("liger_kernel", reason="pip install 'avlabel[liger]'")
    from avlabel.train.sft import liger_problem

    if (problem := liger_problem("qwen2_5_vl")) is not None:
        pytest.skip(problem)
    runs = {}
    for use_liger in (False, True):
        out = tmp_path / f"liger_{use_liger}"
        # a process each: Liger patches transformers' module functions for the whole process
        command = [sys.executable, "-m", "train", "--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny_model_dir),
                   "--dataset_name", str(synthetic_dataset_dir), "--output_dir", str(out), "--max_steps", "4",
                   "--per_device_train_batch_size", "2", "--max_train_samples", "8", "--logging_steps", "1",
                   "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--export_merged", "false",
                   "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--use_liger", str(use_liger).lower()]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[use_liger] = out
    used = json.loads((runs[True] / "train_results.json").read_text())["speed_settings"]
    assert used["use_liger_kernel"] is True
    assert _losses(runs[True]) == pytest.approx(_losses(runs[False]), rel=1e-3)


# ----------------------------------------------------------------------------- bench/train_fsdp.py


@pytest.mark.slow
def test_the_bench_dry_run_reads_the_training_logs_into_its_json(tmp_path):
    bench = [sys.executable, str(ROOT / "bench" / "train_fsdp.py")]
    data, work = tmp_path / "data", tmp_path / "work"
    done = subprocess.run([*bench, "prepare", str(data), "--clips", "4", "--test_clips", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    refused = subprocess.run([*bench, "run", str(data), "--tiny", "--work", str(work), "--out",
                              str(ROOT / "bench" / "results" / "x.json")], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "not a result" in refused.stderr
    out = tmp_path / "dry.json"
    done = subprocess.run([*bench, "run", str(data), "--tiny", "--work", str(work), "--out", str(out), "--steps", "3",
                           "--skip", "1", "--samples_per_step", "2", "--variants", "baseline,padded_vision_windows"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"device", "date", "gpus", "runs"} <= report.keys() and report["gpus"] == 1
    assert list(report["runs"]) == ["full/baseline", "full/padded_vision_windows"]
    for name, run in report["runs"].items():
        assert run["rc"] == 0 and "error" not in run, (name, run)
        assert run["tokens_per_s_per_gpu"] > 0 and 0 < run["mfu"] < 1 and run["measured_steps"] == [2, 3]
        assert run["peak_gib"] is None  # no nvidia-smi here: nothing is made up
        assert len(run["losses"]) == 3 and run["losses_finite"]
    settings = {name: run["speed_settings"]["padded_vision_windows"] for name, run in report["runs"].items()}
    assert settings == {"full/baseline": False, "full/padded_vision_windows": True}
