"""Captioning (`avlabel caption`, infer/): parsing, the batched engine, records, resume, many processes.

All on CPU with the randomly initialised tiny model, whose text is random: tests check
the machinery (batching, positions, resume, merging, constraints), not caption quality.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAMILIES, SYNTHETIC_CLIPS, SYNTHETIC_TEST_CLIPS

from avlabel.core.schema import FIELD_NAMES, WHOLE_LABEL, check_label
from avlabel.infer.parse import parse_output

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "infer" / "tiny.yaml"
# One thread per process: on a 2-core machine shared with other jobs, torch's thread pool
# makes the tiny model's small matrix products 30x slower, not faster.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

GOOD = {
    "weather": "Light rain",
    "lighting": "Daytime (diffused light)",
    "road_conditions": "Wet asphalt",
    "traffic_light": "No traffic light",
    "traffic_sign": "Speed limit 30.",
    "additional_traffic_rules": None,
    "road_type": "Local street",
    "junction_type": "Straight segment",
    "lane_type": "One lane each way",
    "additional_map_rules": None,
    "interactive_expanded_metaaction": ["Vehicle following"],
    "safety_analysis": "The ego vehicle follows a car on a wet street.",
    "driving_difficulty": 2,
    "rule_violation": "False",
    "interesting_scenario": "False",
}


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- parsing


def _json(label=GOOD, **kwargs) -> str:
    return json.dumps(label, **kwargs)


@pytest.mark.parametrize(
    "raw",
    [
        _json(),
        "```json\n" + _json(indent=2) + "\n```",
        "<think>The road is wet, a car is ahead {maybe}.</think>\n" + _json(),
        "Here is the label:\n" + _json() + "\nI hope this helps! Let me know {if} you need more.",
        _json().replace('"Speed limit 30."', '"Speed limit 30.\nNo parking."'),  # raw newline in a string
        _json()[:-1] + ",}",  # trailing comma: repaired
        _json().replace('"', "'"),  # single quotes: repaired
    ],
    ids=["plain", "fenced", "think", "trailing-prose", "raw-newline", "trailing-comma", "single-quotes"],
)
def test_parse_reads_what_models_emit(raw):
    parsed = parse_output(raw)
    assert parsed.errors == {}
    assert parsed.valid
    assert parsed.label["weather"] == "Light rain"
    assert parsed.label == check_label(parsed.label)[0]
    assert set(parsed.label) == set(FIELD_NAMES)


def test_parse_truncated_output_keeps_complete_fields_and_says_why():
    raw = _json()
    cut = raw[: raw.index('"safety_analysis"') + len('"safety_analysis": "The ego veh')]
    parsed = parse_output("```json\n" + cut)
    assert not parsed.valid
    assert parsed.label["weather"] == "Light rain" and parsed.label["lane_type"] == "One lane each way"
    assert "safety_analysis" not in parsed.label
    assert "incomplete" in parsed.errors["safety_analysis"][0]
    assert "not closed" in parsed.errors[WHOLE_LABEL][0]
    for name in ("driving_difficulty", "rule_violation", "interesting_scenario"):
        assert parsed.errors[name] == ["is missing"]


def test_parse_reports_per_field_reasons():
    bad = {**GOOD, "weather": "Sunny-ish", "driving_difficulty": 7, "extra": 1}
    del bad["lighting"]
    parsed = parse_output(_json(bad))
    assert not parsed.valid
    assert "unknown category 'Sunny-ish'" in parsed.errors["weather"][0]
    assert parsed.errors["lighting"] == ["is missing"]
    assert "1 to 4" in parsed.errors["driving_difficulty"][0]
    assert parsed.errors["extra"] == ["is not a field of the schema"]
    assert parsed.label["road_type"] == "Local street"  # the good fields still count


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("I cannot tell from this video.", "no JSON object"),
        ("<think>Let me look at the weather. It seems", "<think> block is never closed"),
        ("", "no JSON object"),
        # a degenerate generation, valid JSON past what Python's reader takes: a failed answer, not a failed run
        ('{"weather": ' + "[" * 5000 + "]" * 5000 + "}", "can't be read (nests arrays or objects too deeply)"),
        ('{"weather": ' + "[" * 5000, "can't be read (nests arrays or objects too deeply)"),
        ('{"driving_difficulty": ' + "9" * 5000 + "}", "can't be read (Exceeds the limit (4300 digits)"),
    ],
)
def test_parse_without_a_label_says_why(raw, reason):
    parsed = parse_output(raw)
    assert not parsed.valid and parsed.label == {}
    assert reason in parsed.errors[WHOLE_LABEL][0]


# ----------------------------------------------------------------------------- records


def test_records_survive_a_torn_last_line(tmp_path):
    from avlabel.infer.records import RecordWriter, read_records

    path = tmp_path / "captions.jsonl"
    path.write_text('{"clip_id": "a", "status": "ok"}\n{"clip_id": "b", "sta', encoding="utf-8")
    assert [r["clip_id"] for r in read_records(path)] == ["a"]
    writer = RecordWriter(path)
    writer.write([{"clip_id": "c", "status": "ok"}])
    writer.close()
    assert [r["clip_id"] for r in read_records(path)] == ["a", "c"]
    path.write_text('{"clip_id": "a"}\nnot json\n{"clip_id": "c"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"captions.jsonl:2"):
        read_records(path)


def test_a_label_file_the_file_system_refuses_is_named_and_the_others_are_written(tmp_path):
    """A clip whose id is past 244 bytes (82 CJK characters) names a label file past the 255 bytes a file name may
    have: its label stays in captions.jsonl, the others are written, and the run can finish (a rerun, too)."""
    from avlabel.infer.records import write_labels
    from eval_labels import load_label_file

    label = load_label_file(Path(__file__).parent / "fixtures" / "reference.label.json")
    long_id = "\u8def" * 82  # 246 bytes in UTF-8
    records = [{"clip_id": clip_id, "status": "ok", "valid": True, "label": label} for clip_id in ("short", long_id)]
    for _ in range(2):
        refused = write_labels(tmp_path, records)
        assert list(refused) == [str(tmp_path / "labels" / f"{long_id}.label.json")]
        assert refused[str(tmp_path / "labels" / f"{long_id}.label.json")] == "File name too long"
        assert json.loads((tmp_path / "labels" / "short.label.json").read_text(encoding="utf-8")) == label


# ----------------------------------------------------------------------------- engine


def _clip_inputs(engine, video: Path, max_frames: int):
    from dataclasses import replace

    from avlabel.core.sampling import sample_frames

    return engine.prepare(sample_frames(video, replace(engine.sampling, max_frames=max_frames)))


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_one_clip_at_a_time(tiny_model_of, family, synthetic_raw_dir, one_thread):
    """Left-padded batches (prefilled in micro-batches) give `generate`'s greedy tokens for each clip alone.

    Cosmos Reason 1 is a Qwen2.5-VL, Cosmos Reason 2 a Qwen3-VL: the engine serves both.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from avlabel.core.prompts import load_prompts
    from avlabel.infer.engine import CaptionEngine
    from avlabel.infer.settings import GenerationSettings

    model_dir = tiny_model_of(family)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    reference = AutoModelForImageTextToText.from_pretrained(model_dir).eval()  # transformers' own attention
    processor = AutoProcessor.from_pretrained(model_dir)
    settings = GenerationSettings(temperature=0.0, repetition_penalty=1.05, max_new_tokens=24, min_pixels=3136, max_pixels=16384)
    engine = CaptionEngine(model, processor, load_prompts(), settings, batch_size=4, prefill_batch_size=2)
    videos = sorted((synthetic_raw_dir / "videos").glob("*.mp4"))[:3]
    # different frame counts give different prompt lengths, so the batch needs left padding
    items = [_clip_inputs(engine, video, frames) for video, frames in zip(videos, (2, 6, 4))]
    assert len({item["input_ids"].shape[1] for item in items}) == 3

    batched = engine.generate(items)
    # the benchmark's baseline without confidence (bench/infer_7b.py) decodes the same tokens, minus log-probabilities
    unscored = CaptionEngine(model, processor, load_prompts(), settings, batch_size=4, prefill_batch_size=2,
                             record_logprobs=False).generate(items)
    assert [g.tokens for g in unscored] == [g.tokens for g in batched]
    assert all(len(g.logprobs) == len(g.tokens) for g in batched) and not any(g.logprobs for g in unscored)
    alone = []
    for item in items:
        with torch.no_grad():
            out = reference.generate(**item, do_sample=False, max_new_tokens=24, repetition_penalty=1.05)
            # the engine's one-call vision attention gives transformers' per-window result
            grid = item["video_grid_thw"]
            ours = engine.family.vision_tower(model)(item["pixel_values_videos"], grid_thw=grid).pooler_output
            theirs = engine.family.vision_tower(reference)(item["pixel_values_videos"], grid_thw=grid).pooler_output
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        alone.append(out[0, item["input_ids"].shape[1]:].tolist())
    assert [g.tokens for g in batched] == alone
    assert len({tuple(tokens) for tokens in alone}) > 1  # the clips differ, so equality says something
    assert [g.prompt_tokens for g in batched] == [item["input_ids"].shape[1] for item in items]


# ----------------------------------------------------------------------------- the command


def _caption(tiny_model_dir, **overrides):
    from avlabel.infer.caption import main, make_parser

    argv = ["--config", str(TINY_RECIPE), "--model", str(tiny_model_dir)]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)] if value is not True else [f"--{key}"]
    return main(*make_parser().parse_args_and_config(args=argv))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_constrained_run_with_a_corrupt_clip(tiny_model_of, family, synthetic_raw_dir, tmp_path, one_thread):
    """A manifest with a broken file: the broken clip is recorded as failed, the rest are 100% schema-valid."""
    tiny_model_dir = tiny_model_of(family)
    videos = sorted((synthetic_raw_dir / "videos").glob("*.mp4"))[:5]
    broken = tmp_path / "broken.camera_front_wide_120fov.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 50)
    manifest = tmp_path / "clips.txt"
    manifest.write_text("\n".join([str(v) for v in videos[:2]] + [broken.name] + [str(v) for v in videos[2:]]) + "\n")
    out = tmp_path / "captions"

    summary = _caption(
        tiny_model_dir, input=manifest, output_dir=out, constrained=True, max_text_chars=8, max_new_tokens=400,
        batch_size=6,
    )
    records = _records(out)
    assert [r["clip_id"] for r in records] == [v.name.split(".")[0] for v in videos[:2]] + ["broken"] + [
        v.name.split(".")[0] for v in videos[2:]
    ]
    failed = records[2]
    assert failed["status"] == "failed" and failed["raw"] is None
    assert str(broken) in failed["error"] and "VideoError" in failed["error"]
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 5 and all(r["valid"] and r["errors"] == {} for r in ok)
    for record in ok:
        assert check_label(json.loads(record["raw"]))[1] == {}  # strict JSON, every field valid
        assert record["completion_tokens"] > 0 and record["prompt_tokens"] > 0
        assert record["generation"]["constrained"] is True and record["model"] == str(tiny_model_dir)
        label_file = out / "labels" / f"{record['clip_id']}.label.json"
        assert json.loads(label_file.read_text()) == record["label"]
    assert not (out / "labels" / "broken.label.json").exists()
    assert summary["captioned"] == 5 and summary["failed"] == 1 and summary["valid_rate"] == 1.0
    assert set(summary["field_valid_rate"].values()) == {1.0}
    assert summary["failures"] == {"broken": failed["error"]}
    # the run's own timing and memory records (no GPU here: no peak)
    assert summary["this_run"]["model_load_seconds"] > 0 and summary["this_run"]["peak_gib"] is None
    assert json.loads((out / "summary.json").read_text()) == summary


def test_a_finished_run_reruns_without_loading_the_model(tiny_model_dir, synthetic_raw_dir, tmp_path, one_thread):
    """A rerun with every clip done reports so and stops before the processor or the weights load: after the
    first run the model folder keeps only what names the run (config and the settings files), and the rerun
    through the command line still finishes."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    clips = sorted((synthetic_raw_dir / "videos").glob("*.mp4"))[:2]
    manifest = tmp_path / "clips.txt"
    manifest.write_text("".join(f"{clip}\n" for clip in clips))
    out = tmp_path / "captions"
    first = _caption(model, input=manifest, output_dir=out, max_new_tokens=16)
    assert first["this_run"]["captioned"] == 2
    # what the run's identity reads (the weights' bytes for their fingerprint, not loaded into a model); without the
    # tokenizer's files neither the processor nor the model (loaded after it) could load
    kept = {"config.json", "sampling_config.json", "answer_config.json", "calibration.json", "model.safetensors"}
    moved = [path for path in model.iterdir() if path.name not in kept]
    assert any("tokenizer" in path.name for path in moved)
    (tmp_path / "moved").mkdir()
    for path in moved:
        path.rename(tmp_path / "moved" / path.name)

    done = subprocess.run([sys.executable, "-m", "avlabel", "caption", "--config", str(TINY_RECIPE), "--model", str(model),
                           "--input", str(manifest), "--output_dir", str(out), "--max_new_tokens", "16"],
                          cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"nothing to do: every clip already has a record in {out}" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["captioned"] == 2 and summary["this_run"]["skipped"] == 2 and summary["this_run"]["captioned"] == 0
    assert summary["this_run"]["model_load_seconds"] is None
    assert [r["clip_id"] for r in _records(out)] == [clip.name.split(".")[0] for clip in clips]


@pytest.mark.slow
def test_a_retrained_model_in_the_same_folder_is_not_resumed_and_overwrite_waits_for_the_checks(
        tiny_model_dir, synthetic_raw_dir, tmp_path, one_thread):
    """Resume goes by the weights, not the folder's name: the captions of the model trained before would pass
    for the new one's. --overwrite clears them only once the command's checks pass, and only what caption wrote."""
    import shutil

    from safetensors.torch import load_file, save_file

    from avlabel.core.errors import UsageError

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    manifest = tmp_path / "clips.txt"
    manifest.write_text(f"{sorted((synthetic_raw_dir / 'videos').glob('*.mp4'))[0]}\n")
    out = tmp_path / "captions"
    _caption(model, input=manifest, output_dir=out, max_new_tokens=16)
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1  # trained again, into the same folder
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match="captions made with a different weights_sha"):
        _caption(model, input=manifest, output_dir=out, max_new_tokens=16)

    (out / "labels" / "mine.label.json").write_text("{}")  # the user's, not caption's
    earlier = (out / "captions.jsonl").read_text()
    with pytest.raises(UsageError, match="below"):  # refused after the inputs and model are read: nothing is cleared
        _caption(model, input=manifest, output_dir=out, max_new_tokens=5, constrained=True, overwrite=True)
    assert (out / "captions.jsonl").read_text() == earlier
    _caption(model, input=manifest, output_dir=out, max_new_tokens=16, overwrite=True)
    assert _records(out)[0]["weights_sha"]["model"] != json.loads(earlier)["weights_sha"]["model"]
    assert (out / "labels" / "mine.label.json").is_file()


def test_killed_run_resumes_without_losing_or_repeating_clips(tiny_model_dir, synthetic_raw_dir, tmp_path, one_thread):
    out = tmp_path / "captions"
    command = [
        sys.executable, "-m", "infer", "--config", str(TINY_RECIPE), "--model", str(tiny_model_dir),
        "--input", str(synthetic_raw_dir), "--output_dir", str(out), "--batch_size", "1", "--max_new_tokens", "64",
    ]
    process = subprocess.Popen(command, cwd=REPO, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    captions = out / "captions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if captions.exists() and captions.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    before = {r["clip_id"]: r for r in (json.loads(line) for line in captions.read_text().splitlines() if line.endswith("}"))}
    total = len(list((synthetic_raw_dir / "videos").glob("*.mp4")))
    assert 3 <= len(before) < total
    assert not (out / "summary.json").exists()

    summary = _caption(tiny_model_dir, input=synthetic_raw_dir, output_dir=out, batch_size=4, max_new_tokens=64)
    records = _records(out)
    ids = [r["clip_id"] for r in records]
    assert len(ids) == len(set(ids)) == total
    assert all(r["status"] == "ok" for r in records)
    assert summary["this_run"]["skipped"] == len(before)
    assert summary["this_run"]["captioned"] == total - len(before)
    for record in records:  # work done before the kill is kept as it was
        if record["clip_id"] in before:
            assert record == before[record["clip_id"]]

    # a third run has nothing left to do; other settings in the same folder are refused
    assert _caption(tiny_model_dir, input=synthetic_raw_dir, output_dir=out, max_new_tokens=64)["this_run"]["skipped"] == total
    with pytest.raises(ValueError, match="different generation"):
        _caption(tiny_model_dir, input=synthetic_raw_dir, output_dir=out, max_new_tokens=32)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_give_the_one_process_result(tiny_model_of, family, synthetic_dataset_dir, tmp_path, one_thread):
    """torchrun with 2 CPU processes (gloo): each captions its share, the merge equals a 1-process run."""
    tiny_model_dir = tiny_model_of(family)
    one = tmp_path / "one"
    two = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "infer",
        "--config", str(TINY_RECIPE), "--model", str(tiny_model_dir), "--input", str(synthetic_dataset_dir),
        "--split", "train", "--output_dir", str(two), "--max_new_tokens", "16", "--batch_size", "3",
    ]
    result = subprocess.run(command, check=False, cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _caption(tiny_model_dir, input=synthetic_dataset_dir, split="train", output_dir=one, max_new_tokens=16, batch_size=3)

    def comparable(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in _records(out)]

    assert comparable(two) == comparable(one)
    assert len(comparable(one)) == SYNTHETIC_CLIPS - SYNTHETIC_TEST_CLIPS  # the builder's train split
    assert not list(two.glob("captions.rank-*.jsonl"))  # shards were merged away
    summary = json.loads((two / "summary.json").read_text())
    assert summary["this_run"]["processes"] == 2 and summary["captioned"] == len(comparable(one)), summary["failures"]
    assert sorted(p.name for p in (two / "labels").iterdir()) == sorted(p.name for p in (one / "labels").iterdir())


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_and_4bit_weights(tiny_model_of, family, synthetic_raw_dir, tmp_path, one_thread):
    """A PEFT adapter changes what is written (merged, or on top of 4-bit weights) and is recorded."""
    tiny_model_dir = tiny_model_of(family)
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    adapter = tmp_path / "adapter"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    # random (not zero) LoRA weights, so the adapter visibly changes the output
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(adapter)

    clips = sorted((synthetic_raw_dir / "videos").glob("*.mp4"))[:2]
    manifest = tmp_path / "clips.txt"
    manifest.write_text("\n".join(map(str, clips)) + "\n")
    runs = {}
    for name, extra in {"base": {}, "adapter": {"adapter": adapter}, "qlora": {"adapter": adapter, "quantization": "4bit"}}.items():
        _caption(tiny_model_dir, input=manifest, output_dir=tmp_path / name, max_new_tokens=12, **extra)
        runs[name] = _records(tmp_path / name)
    assert all(r["status"] == "ok" for records in runs.values() for r in records)
    raw = {name: [r["raw"] for r in records] for name, records in runs.items()}
    assert raw["adapter"] != raw["base"]
    assert {r["adapter"] for r in runs["adapter"] + runs["qlora"]} == {str(adapter)}
    assert {r["generation"]["quantization"] for r in runs["qlora"]} == {"4bit"}

    # the 4-bit run's weights really are 4-bit, loaded as caption loads them (whether rounding changes 12 greedy
    # tokens of a random model is chance, so its text is no evidence either way)
    from avlabel.families import bnb_quantization, load_model

    quantized = load_model(str(tiny_model_dir), adapter=str(adapter), dtype="float32",
                           quantization_config=bnb_quantization("4bit", "float32"))
    layers = {name: module for name, module in quantized.named_modules() if isinstance(module, Linear4bit)}
    assert any(name.endswith("q_proj.base_layer") for name in layers)
    full = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    name, layer = next((name, layer) for name, layer in layers.items() if name.endswith("q_proj.base_layer"))
    original = full[name.replace("base_model.model.", "").replace(".base_layer", "") + ".weight"]
    restored = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert restored.shape == original.shape and not torch.equal(restored, original)
    assert torch.allclose(restored, original, atol=0.2 * original.abs().max().item())
