"""Training (train/): the video collator, the three methods, resume, export, two processes.

Everything runs for real on the randomly initialised tiny model of each family and the
synthetic dataset (tests/conftest.py), with a few optimizer steps per run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny" / "sft.yaml"


# ----------------------------------------------------------------------------- helpers


def _rows(dataset_dir, split="train"):
    """The split's rows as training reads them (through the project's loader: a copied folder reads its own clips)."""
    from datasets import Video

    from avlabel.core.loading import load_clip_dataset

    return load_clip_dataset(dataset_dir, split=split).cast_column("video", Video(decode=False))


def _collator(model_dir, cache_dir=None, **kwargs):
    from transformers import AutoConfig, AutoProcessor

    from avlabel.core.prompts import load_prompts
    from avlabel.families import family_of
    from avlabel.train.collator import FrameCache, VideoSFTCollator

    sampling = kwargs.pop("sampling", None)
    if sampling is None:
        from avlabel.train.sft import TrainScriptArguments

        # the model folder's own sampling (the tiny model's: 4 frames of at most 112x112), as training takes it
        sampling = TrainScriptArguments().resolve_sampling(AutoConfig.from_pretrained(model_dir), str(model_dir))
    processor = kwargs.pop("processor", None) or AutoProcessor.from_pretrained(model_dir)
    return VideoSFTCollator(
        processor=processor, prompts=load_prompts(short=kwargs.pop("short", True)), frames=FrameCache(cache_dir, sampling),
        family=family_of(model_dir), **kwargs,
    )


def _overrides(model_dir, dataset_dir, output_dir, **extra):
    """The tiny recipe cut to 6 optimizer steps, evaluated before and after, saved every 3 steps."""
    return {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(dataset_dir),
        "output_dir": str(output_dir),
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "max_train_samples": 12,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 6,
        "eval_on_start": True,
        "save_strategy": "steps",
        "save_steps": 3,
        "save_total_limit": None,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "report_to": ["none"],
        **extra,
    }


METHODS = {
    "full": {},
    "lora": {"use_peft": True},
    # bitsandbytes 0.50 quantizes to NF4 on the CPU too: QLoRA itself runs here, no fallback
    "qlora": {"use_peft": True, "load_in_4bit": True, "use_bnb_nested_quant": True},
}


@pytest.fixture(scope="module")
def runs(tiny_model_of, synthetic_dataset_dir, tmp_path_factory):
    """One training run per family and method, made on first use and shared by the tests below."""
    from avlabel.train.sft import train

    made: dict[tuple[str, str], Path] = {}

    def run(family: str, method: str) -> Path:
        if (family, method) not in made:
            out = tmp_path_factory.mktemp(f"train_{family}_{method}")
            overrides = _overrides(tiny_model_of(family), synthetic_dataset_dir, out, **METHODS[method])
            made[family, method] = train(TINY_RECIPE, overrides)
        return made[family, method]

    return run


# ----------------------------------------------------------------------------- collator


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", ["model", "stock"])
def test_label_mask_covers_exactly_the_answer(tiny_model_of, synthetic_dataset_dir, family, template):
    from transformers import AutoProcessor

    from avlabel.core.schema import row_to_label
    from avlabel.train.collator import format_answer

    model_dir = tiny_model_of(family)
    processor = AutoProcessor.from_pretrained(model_dir)
    if template == "stock":
        # the template the real checkpoints ship (Cosmos Reason 1 and 2: Qwen2.5-VL's and Qwen3-VL's), which has
        # no {% generation %} markers: TRL's training copy must be used
        import trl

        processor.chat_template = (Path(trl.__file__).parent / "chat_templates" / f"{family}.jinja").read_text()
    collator = _collator(model_dir, processor=processor, answer_format="fenced", short=False)
    rows = [_rows(synthetic_dataset_dir)[i] for i in range(2)]
    batch = collator(rows)
    tokenizer = processor.tokenizer
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]

    for row, ids, labels, attention in zip(rows, batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids, labels = ids.tolist(), labels.tolist()
        # independently of the template machinery: the answer starts after the last
        # "<|im_start|>assistant\n" and ends with the next <|im_end|>
        start = max(i for i, token in enumerate(ids) if token == im_start) + 1 + len(header)
        assert ids[start - len(header) : start] == header
        end = ids.index(im_end, start)
        if template == "stock":  # TRL's copy also marks the newline after <|im_end|>
            end += 1
            assert tokenizer.decode(ids[end]) == "\n"
        for position, (token, label) in enumerate(zip(ids, labels)):
            expected = token if start <= position <= end else -100
            assert label == expected, f"position {position}: label {label}, expected {expected}"
        answer = tokenizer.decode(ids[start : ids.index(im_end, start)])
        assert answer == format_answer(row_to_label(row), "fenced")
        assert json.loads(answer.removeprefix("```json\n").removesuffix("\n```"))["weather"] == row["weather"]
        assert labels[int(attention.sum()) :] == [-100] * (len(labels) - int(attention.sum()))  # padding
    assert batch["mm_token_type_ids"].eq(2).sum() == batch["input_ids"].eq(processor.video_token_id).sum() > 0
    assert set(batch) == {"labels", *collator.family.sequence_keys, *collator.family.video_keys}
    # the model's clock: a grid of 2 frames spans 2 / (frames sampled per second of the clip)
    frames = batch["video_grid_thw"][:, 0] * 2
    spans = [2 / (int(count) / row["duration"]) for count, row in zip(frames, rows)]
    if "second_per_grid_ts" in batch:  # Qwen2.5-VL: a number per video
        assert batch["second_per_grid_ts"].tolist() == pytest.approx(spans, rel=1e-3)
    else:  # Qwen3-VL: the middle of each grid's frames as text before it
        for ids, span, grids in zip(batch["input_ids"], spans, batch["video_grid_thw"][:, 0].tolist()):
            text = tokenizer.decode(ids)
            assert [f"<{(i + 0.25) * span:.1f} seconds>" in text for i in range(grids)] == [True] * grids, text


@pytest.mark.parametrize("family", FAMILIES)
def test_estimated_length_is_the_collated_length(tiny_model_of, synthetic_dataset_dir, family):
    collator = _collator(tiny_model_of(family), answer_format="plain")
    rows = _rows(synthetic_dataset_dir)
    for index in range(3):
        row = rows[index]
        assert collator.estimated_length(row) == collator.encode(row)["input_ids"].shape[1]


def test_a_clip_no_model_takes_is_reported_and_skipped(tiny_model_dir, synthetic_dataset_dir, tmp_path):
    """A row whose clip no Qwen-VL model takes (an extreme aspect ratio, in a dataset built before the builder
    refused them) is set aside with its reason when lengths are estimated; the run goes on with the rest."""
    from avlabel.train.sft import with_lengths

    rows = _rows(synthetic_dataset_dir)
    strip = rows[0]["clip_id"]
    rows = rows.map(lambda clip_id, width, height: {"width": 3200, "height": 14} if clip_id == strip else
                    {"width": width, "height": height}, input_columns=["clip_id", "width", "height"])
    report = tmp_path / "skipped.jsonl"
    collator = _collator(tiny_model_dir, answer_format="plain", report_path=report)
    assert collator.max_length is None  # no length limit: the row is set aside for its size alone

    kept = with_lengths(rows, collator, report, strict=False, is_main=True)
    assert len(kept) == len(rows) - 1 and strip not in kept["clip_id"]
    (entry,) = [json.loads(line) for line in report.read_text().splitlines()]
    assert entry["clip_id"] == strip and "aspect ratio 3200x14 is too extreme for the vision encoder" in entry["reason"]


@pytest.mark.parametrize(("settings", "expected"), [
    ({"load_in_8bit": True}, {"bits": 8}),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, {"bits": 4, "quant_type": "nf4"}),
])
def test_quantization_summary_says_the_bits_the_layers_hold(tiny_model_dir, settings, expected):
    """An 8-bit base is recorded as 8-bit (the card names it), not with the 4-bit settings it never used."""
    from transformers import BitsAndBytesConfig

    from avlabel.families import load_model
    from avlabel.train.sft import quantization_summary

    model = load_model(tiny_model_dir, dtype="float32", quantization_config=BitsAndBytesConfig(**settings))
    summary = quantization_summary(model)
    assert expected.items() <= summary.items() and summary["quantized_layers"] > 0
    assert ("quant_type" in summary) == ("quant_type" in expected)


def test_a_run_whose_every_clip_is_set_aside_says_so(tiny_model_dir, synthetic_dataset_dir, tmp_path):
    from avlabel.train.sft import train

    with pytest.raises(ValueError, match=r"every training clip was set aside \(why, clip by clip: .*skipped.jsonl\); "
                                         r"if they are over --max_length 64, raise it"):
        train(TINY_RECIPE, _overrides(tiny_model_dir, synthetic_dataset_dir, tmp_path / "run", max_length=64))
    assert len((tmp_path / "run" / "skipped.jsonl").read_text().splitlines()) == 12  # max_train_samples


def test_overlong_samples_are_reported_and_skipped_never_cut(tiny_model_dir, synthetic_dataset_dir, tmp_path):
    from avlabel.train.sft import with_lengths

    rows = _rows(synthetic_dataset_dir)
    probe = _collator(tiny_model_dir, answer_format="plain")
    lengths = sorted(probe.estimated_length(row) for row in rows)
    limit = lengths[len(lengths) // 2]  # about half the rows are over
    over = sum(length > limit for length in lengths)
    assert over > 0
    report = tmp_path / "skipped.jsonl"
    collator = _collator(tiny_model_dir, answer_format="plain", max_length=limit, report_path=report)

    kept = with_lengths(rows, collator, report, strict=False, is_main=True)
    assert len(kept) == len(rows) - over and max(kept["length"]) <= limit
    reported = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(reported) == over and all("not truncated" in entry["reason"] for entry in reported)
    with pytest.raises(ValueError, match="strict"):
        with_lengths(rows, collator, None, strict=True, is_main=True)

    # the collator checks the real length too: an over-long row is left out whole, the others kept whole
    long_row = next(row for row in rows if probe.estimated_length(row) > limit)
    short_row = kept[0]
    batch = collator([long_row, short_row])
    assert batch["input_ids"].shape == (1, probe.estimated_length(short_row))
    assert json.loads(report.read_text().splitlines()[-1])["clip_id"] == long_row["clip_id"]
    with pytest.raises(ValueError, match="none of the 1 samples"):
        collator([long_row])
    collator.strict = True
    with pytest.raises(ValueError, match=long_row["clip_id"]):
        collator([long_row, short_row])


def _wreck(path: Path) -> None:
    """Zeros in place of a clip's bytes: a file that no longer decodes, as a failing disk leaves one."""
    path.write_bytes(b"\0" * path.stat().st_size)


def test_a_batch_left_empty_takes_the_next_usable_training_row(tiny_model_dir, synthetic_dataset_dir, tmp_path):
    """At a micro-batch of 1, a clip that won't decode would leave the batch empty and stop the run: the collator
    reports it and collates the next usable row of the training split instead."""
    dataset = tmp_path / "dataset"
    shutil.copytree(synthetic_dataset_dir, dataset)
    rows = _rows(dataset)
    assert Path(rows[0]["video"]["path"]).is_relative_to(dataset)  # the copy's clips are wrecked, not the fixture's
    bad = [rows[index] for index in (0, 1)]
    for row in bad:
        _wreck(Path(row["video"]["path"]))
    report = tmp_path / "skipped.jsonl"
    collator = _collator(tiny_model_dir, answer_format="plain", report_path=report)
    with pytest.raises(ValueError, match="none of the 1 samples"):  # no rows to draw from: as before
        collator([bad[0]])

    collator.spares = rows  # the rows in order: the two wrecked ones, then a usable one
    batch = collator([bad[0]])
    assert torch.equal(batch["input_ids"], collator([rows[2]])["input_ids"])
    reported = [json.loads(line) for line in report.read_text().splitlines()]
    assert [entry["clip_id"] for entry in reported] == [bad[0]["clip_id"]] * 2 + [bad[0]["clip_id"], bad[1]["clip_id"]]
    assert all("video can't be decoded" in entry["reason"] for entry in reported)

    copy = pickle.loads(pickle.dumps(collator))  # as spawned dataloader workers get it, mid-pass
    assert torch.equal(copy([bad[0]])["input_ids"], batch["input_ids"])  # its own pass, from the first row

    collator.spares = rows.select([0, 1])  # nothing usable to draw: the dataset itself is broken, and says so
    collator._spare_rows = None
    with pytest.raises(ValueError, match="nor any of the 16 rows tried"):
        collator([bad[0]])


@pytest.mark.slow
def test_one_bad_clip_does_not_stop_a_run_at_micro_batch_one(tiny_model_dir, synthetic_dataset_dir, tmp_path):
    """A clip that passed the build but no longer decodes, or is no longer there, is reported in skipped.jsonl,
    and training and its evaluation go on."""
    from avlabel.train.sft import train

    dataset = tmp_path / "dataset"
    shutil.copytree(synthetic_dataset_dir, dataset)
    rows, test_rows = _rows(dataset), _rows(dataset, "test")
    assert Path(test_rows[0]["video"]["path"]).is_relative_to(dataset)  # the copy's clips are wrecked, not the fixture's
    wrecked = {rows[index]["clip_id"] for index in range(0, len(rows), 2)}  # every other training clip
    wrecked.add(test_rows[0]["clip_id"])  # and a test clip, which the evaluation reads
    for row in (*rows, *test_rows):
        if row["clip_id"] in wrecked:
            _wreck(Path(row["video"]["path"]))
    for row in (rows[0], test_rows[0]):  # deleted since the build (or on a disk that is not mounted)
        Path(row["video"]["path"]).unlink()
    out = train(TINY_RECIPE, _overrides(tiny_model_dir, dataset, tmp_path / "run", per_device_train_batch_size=1,
                                        per_device_eval_batch_size=1, max_steps=4, eval_steps=4, eval_on_start=False,
                                        save_strategy="no", export_merged=False))
    results = json.loads((out / "train_results.json").read_text())
    # 4 steps of one clip are a third of the 12 training clips (max_train_samples): the epochs trained, not the recipe's 24
    assert results["steps"] == 4 and results["epochs"] == pytest.approx(4 / 12, abs=0.01)
    assert [step for step, _ in _logged(out, "eval_loss")] == [4]
    reported = {json.loads(line)["clip_id"] for line in (out / "skipped.jsonl").read_text().splitlines()}
    assert test_rows[0]["clip_id"] in reported and reported <= wrecked and len(reported) > 1


def test_frame_cache_serves_later_epochs_without_decoding(tiny_model_dir, synthetic_dataset_dir, tmp_path):
    from avlabel.core.sampling import VideoError

    row = dict(_rows(synthetic_dataset_dir)[0])
    clip = tmp_path / "clip.mp4"
    shutil.copy(row["video"]["path"], clip)
    row["video"] = {"path": str(clip), "bytes": None}
    cached = _collator(tiny_model_dir, cache_dir=tmp_path / "cache", answer_format="plain")
    first = cached([row])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    # Wreck the file but keep its size and modification time: only a cache hit can still collate it.
    stat = clip.stat()
    clip.write_bytes(b"\0" * stat.st_size)
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = cached([row])
    for key, value in first.items():
        assert torch.equal(value, again[key]), key
    uncached = _collator(tiny_model_dir, answer_format="plain", strict=True)
    with pytest.raises((VideoError, ValueError)):
        uncached([row])


# ----------------------------------------------------------------------------- training runs


def _logged(output_dir: Path, key: str) -> list[tuple[int, float]]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], entry[key]) for entry in history if key in entry]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_the_loss_falls(runs, family, method):
    out = runs(family, method)
    train_loss = [loss for _, loss in _logged(out, "loss")]
    eval_loss = _logged(out, "eval_loss")
    assert len(train_loss) == 6
    assert sum(train_loss[-2:]) < sum(train_loss[:2]), train_loss
    assert [step for step, _ in eval_loss] == [0, 6] and eval_loss[1][1] < eval_loss[0][1], eval_loss

    results = json.loads((out / "train_results.json").read_text())
    assert results["method"] == method and results["train_samples"] == 12
    assert results["model_load_seconds"] > 0 and results["peak_gib"] is None  # no GPU here: no peak
    assert results["eval_loss"] == pytest.approx(eval_loss[-1][1])
    assert results["final_loss"] == pytest.approx(train_loss[-1])
    assert {"learning_rate", "per_device_train_batch_size", "sampling"} <= results["hyperparameters"].keys()
    # the exported model carries the frames it was trained on: the tiny model's own (4 frames), unless overridden
    assert results["hyperparameters"]["sampling"]["max_frames"] == 4
    for folder in ("merged", "adapter") if method != "full" else ("merged",):
        saved = json.loads((out / folder / "sampling_config.json").read_text())
        assert saved == results["hyperparameters"]["sampling"], folder
    quantization = results["hyperparameters"]["quantization"]
    if method == "qlora":
        assert quantization["bits"] == 4 and quantization["quant_type"] == "nf4" and quantization["double_quant"]
        assert quantization["quantized_layers"] > 0
    else:
        assert quantization is None
    assert (out / "adapter" / "adapter_config.json").exists() == (method != "full")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "merged" / "config.json").exists() and (out / "merged" / "processor_config.json").exists()
    recipe = (out / "recipe.yaml").read_text()
    assert f"model_name_or_path: {results['base_model']}" in recipe and "max_steps: 6" in recipe


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_resume_continues_from_the_saved_step_and_optimizer_state(runs, tiny_model_of, synthetic_dataset_dir, family,
                                                                   tmp_path):
    from safetensors.torch import load_file

    from avlabel.train.sft import train

    first = runs(family, "full")
    resumed = train(
        TINY_RECIPE,
        _overrides(tiny_model_of(family), synthetic_dataset_dir, tmp_path / "resumed",
                   resume_from_checkpoint=str(first / "checkpoint-3"), eval_on_start=False),
    )
    # its recipe trains a new run as this one was trained, without resuming it (--config reads it back)
    assert "resume_from_checkpoint" not in yaml.safe_load((resumed / "recipe.yaml").read_text())
    # the resumed log carries steps 1-3 over from the checkpoint and adds 4-6, with the same losses
    expected, got = _logged(first, "loss"), _logged(resumed, "loss")
    assert [step for step, _ in got] == [step for step, _ in expected] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == 6
    # a checkpoint on a logging step: the logs and the mean loss continue too
    for key in ("learning_rate", "num_tokens"):
        expected, got = _logged(first, key), _logged(resumed, key)
        assert [step for step, _ in got] == [step for step, _ in expected], key
        assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-5), key
    first_results, resumed_results = (json.loads((out / "train_results.json").read_text()) for out in (first, resumed))
    assert resumed_results["train_loss"] == pytest.approx(first_results["train_loss"], rel=1e-5)
    # Steps 4-6 after restoring weights, AdamW moments, schedule and data position give the
    # weights of the uninterrupted run; fresh optimizer state would not.
    expected = load_file(first / "checkpoint-6" / "model.safetensors")
    got = load_file(resumed / "checkpoint-6" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    start = load_file(first / "checkpoint-3" / "model.safetensors")
    assert any(not torch.equal(start[name], got[name]) for name in got)


@pytest.mark.slow
def test_a_run_resumed_in_its_folder_exports_afresh(runs, tiny_model_of, synthetic_dataset_dir, tmp_path, caplog):
    """The resumed run's export replaces the earlier one whole: a calibration fitted on the earlier weights
    would otherwise be applied to the new ones by `caption` and published with them."""
    from avlabel.core.calibration import CALIBRATION_FILE
    from avlabel.train.sft import train

    run = shutil.copytree(runs("qwen2_5_vl", "full"), tmp_path / "run")
    shutil.rmtree(run / "checkpoint-6")  # resume from step 3, in the run's own folder
    (run / "merged" / CALIBRATION_FILE).write_text("{}")
    (run / "merged" / "model-00002-of-00002.safetensors").write_text("a shard of an earlier export")
    train(TINY_RECIPE, _overrides(tiny_model_of("qwen2_5_vl"), synthetic_dataset_dir, run, resume_from_checkpoint="last"))
    assert not (run / "merged" / CALIBRATION_FILE).exists()
    assert not (run / "merged" / "model-00002-of-00002.safetensors").exists()
    assert (run / "merged" / "model.safetensors").is_file()
    assert f"{run / 'merged' / CALIBRATION_FILE} was fitted on the earlier weights" in caplog.text


@pytest.mark.slow
def test_a_resumed_run_logs_as_the_uninterrupted_run(tiny_model_dir, synthetic_dataset_dir, tmp_path):
    """Learning rate, token count and loss continue across a resume, in the log and in train_results.json,
    from a checkpoint (step 3) that falls between two logging steps (2 and 4)."""
    from avlabel.train.sft import train

    settings = {"eval_strategy": "no", "eval_on_start": False, "warmup_steps": 2, "lr_scheduler_type": "cosine",
                "logging_steps": 2, "save_steps": 3, "export_merged": False}
    whole = train(TINY_RECIPE, _overrides(tiny_model_dir, synthetic_dataset_dir, tmp_path / "whole", **settings))
    resumed = train(TINY_RECIPE, _overrides(tiny_model_dir, synthetic_dataset_dir, tmp_path / "resumed",
                                            resume_from_checkpoint=str(whole / "checkpoint-3"), **settings))

    def history(out):
        return json.loads((out / "trainer_state.json").read_text())["log_history"]

    expected, got = history(whole), history(resumed)
    assert [entry["step"] for entry in got] == [entry["step"] for entry in expected] == [2, 4, 6, 6]
    for before, after in zip(expected, got):
        for key in ("learning_rate", "num_tokens", "loss", "entropy", "mean_token_accuracy", "train_loss"):
            assert (key in after) == (key in before), (before["step"], key)
            if key in before:
                assert after[key] == pytest.approx(before[key], rel=1e-5), (before["step"], key)
    assert got[1]["learning_rate"] > 0 and got[1]["num_tokens"] > got[0]["num_tokens"]  # the first log after the resume

    whole_results, resumed_results = (json.loads((out / "train_results.json").read_text()) for out in (whole, resumed))
    # the mean over all six steps (three logged windows of two), not over the three resumed ones
    assert whole_results["train_loss"] == pytest.approx(sum(entry["loss"] for entry in expected[:3]) / 3, rel=1e-5)
    assert resumed_results["train_loss"] == pytest.approx(whole_results["train_loss"], rel=1e-5)
    assert resumed_results["steps"] == 6 and resumed_results["method"] == "full"


def _as_sharded_checkpoint(checkpoint: Path, state_dict: dict, out: Path) -> Path:
    """A copy of `checkpoint` whose weights are an FSDP-sharded folder, written the way accelerate
    writes one (torch.distributed.checkpoint, the state dict under "model"), in a run folder."""
    import torch.distributed.checkpoint as dcp

    for run_file in ("recipe.yaml", "answer_config.json"):
        shutil.copy(checkpoint.parent / run_file, out / run_file)
    copy = out / checkpoint.name
    copy.mkdir()
    shutil.copy(checkpoint / "trainer_state.json", copy)
    dcp.save({"model": state_dict}, storage_writer=dcp.FileSystemWriter(str(copy / "pytorch_model_fsdp_0")))
    return copy


def runs_base_model(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "recipe.yaml").read_text())["model_name_or_path"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_export_merges_a_checkpoint_sharded_or_not(runs, family, method, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from avlabel.train.export import ExportArguments, export_checkpoint

    run = runs(family, method)
    checkpoint = run / "checkpoint-3"
    plain = export_checkpoint(ExportArguments(checkpoint=str(checkpoint), output_dir=str(tmp_path / "plain")))

    if method == "full":  # a full fine-tune's shards hold every weight under its in-memory name
        state_dict = AutoModelForImageTextToText.from_pretrained(checkpoint).state_dict()
    else:  # a PEFT model's hold only the adapter, as accelerate saves it (adapter_only)
        base = AutoModelForImageTextToText.from_pretrained(runs_base_model(run))
        state_dict = get_peft_model_state_dict(PeftModel.from_pretrained(base, str(checkpoint)))
    sharded_run = tmp_path / "sharded_run"
    sharded_run.mkdir()
    sharded = export_checkpoint(ExportArguments(checkpoint=str(_as_sharded_checkpoint(checkpoint, state_dict, sharded_run))))
    assert sharded == sharded_run / "checkpoint-3" / "merged"

    # both give the same bf16 model of step 3, with the run's processor and frame sampling, not the end of the run
    expected, got = load_file(plain / "model.safetensors"), load_file(sharded / "model.safetensors")
    assert expected.keys() == got.keys() and all(t.dtype == torch.bfloat16 for t in got.values() if t.is_floating_point())
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    final = load_file(run / "merged" / "model.safetensors")
    assert any(not torch.equal(final[name], got[name]) for name in got)
    for folder in (plain, sharded):  # the same processor, frame sampling (also for transformers), prompts, answer layout
        for name in ("sampling_config.json", "processor_config.json", "prompts.json", "answer_config.json"):
            assert (folder / name).read_text() == (run / "merged" / name).read_text(), name
        assert json.loads((folder / "processor_config.json").read_text())["video_processor"]["do_sample_frames"] is True
    if method == "full":  # the plain export is the checkpoint's weights, in bf16
        saved = load_file(checkpoint / "model.safetensors")
        assert all(torch.equal(expected[name], saved[name].to(torch.bfloat16)) for name in saved)


def test_export_names_what_is_not_a_checkpoint(tmp_path):
    from avlabel.train.export import ExportArguments, export_checkpoint

    with pytest.raises(FileNotFoundError, match="not a checkpoint of a training run"):
        export_checkpoint(ExportArguments(checkpoint=str(tmp_path)))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_loads_and_generates(runs, family, synthetic_dataset_dir):
    from peft import PeftConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from avlabel.train.collator import build_conversation

    out = runs(family, "lora")
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    processor = AutoProcessor.from_pretrained(out / "merged")
    assert merged.dtype == torch.bfloat16

    # merged = base + scale * B @ A, for a layer the adapter targets
    config = PeftConfig.from_pretrained(out / "adapter")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    base = AutoModelForImageTextToText.from_pretrained(config.base_model_name_or_path)
    name = "model.language_model.layers.0.self_attn.q_proj"
    lora_a = next(v for k, v in adapter.items() if name in k and "lora_A" in k).float()
    lora_b = next(v for k, v in adapter.items() if name in k and "lora_B" in k).float()
    expected = base.get_submodule(name).weight + config.lora_alpha / config.r * lora_b @ lora_a
    torch.testing.assert_close(merged.get_submodule(name).weight.float(), expected, rtol=2e-2, atol=2e-3)
    assert not torch.allclose(merged.get_submodule(name).weight.float(), base.get_submodule(name).weight, atol=1e-4)

    collator = _collator(out / "merged", answer_format="plain")
    row = _rows(synthetic_dataset_dir, "test")[0]
    clip = collator.frames.load(row["video"])
    inputs = processor.apply_chat_template(
        [build_conversation(collator.prompts, clip.frames)], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
        processor_kwargs={"videos_kwargs": {"do_sample_frames": False, "do_resize": False,
                                            "video_metadata": [clip.processor_metadata()]}},
    )
    generated = merged.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_train_through_the_distributed_path(tiny_model_of, synthetic_dataset_dir, family, tmp_path):
    out = tmp_path / "ddp"
    overrides = _overrides(tiny_model_of(family), synthetic_dataset_dir, out, max_steps=2, eval_on_start=False,
                           save_steps=2)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
        "--num_processes", "2", "-m", "train", "--config", str(TINY_RECIPE), "--use_cpu", "true",
    ]
    for key, value in overrides.items():
        command += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "train_results.json").read_text())
    assert results["hardware"].startswith("cpu, 2 process")
    assert results["hyperparameters"]["global_batch_size"] == 4  # 2 per process
    assert [step for step, _ in _logged(out, "loss")] == [1, 2]
    assert (out / "merged" / "model.safetensors").exists()


def test_console_command_exposes_train(capsys):
    from avlabel import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--answer_format" in text and "--use_peft" in text and "--max_length" in text


def test_sharded_optimizer_state_is_restored_in_place(tmp_path):
    """The FSDP resume path: optimizer state saved as accelerate does (torch.distributed.checkpoint),
    read back into a fresh optimizer, which then takes exactly the step the original takes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from avlabel.train.trainer import load_sharded_optimizer_state

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(model, optimizer, seed):
        generator = torch.Generator().manual_seed(seed)
        loss = model(torch.randn(5, 8, generator=generator)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    original, original_opt = model_and_optimizer()
    for seed in range(3):
        step(original, original_opt, seed)
    folder = tmp_path / "checkpoint" / "optimizer_0"
    dcp.save({"optimizer": get_optimizer_state_dict(original, original_opt)}, storage_writer=dcp.FileSystemWriter(str(folder)))

    resumed, resumed_opt = model_and_optimizer()
    resumed.load_state_dict(original.state_dict())
    load_sharded_optimizer_state(resumed, resumed_opt, folder)
    for p_original, p_resumed in zip(original.parameters(), resumed.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(original_opt.state[p_original][key], resumed_opt.state[p_resumed][key]), key
    step(original, original_opt, 3)
    step(resumed, resumed_opt, 3)
    for p_original, p_resumed in zip(original.parameters(), resumed.parameters()):
        assert torch.equal(p_original, p_resumed)
