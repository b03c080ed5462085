"""Captioning against vLLM: the project's engine and vLLM's offline `LLM.generate`, same clips, one GPU, one run.

Builds the architecture of `--config` (default Qwen2.5-VL-7B, Cosmos-Reason1-7B) with random
bf16 weights, saves it as a model folder (vLLM loads only folders; `--model_dir`, /dev/shm by
default) and gives both engines the same inputs: the frames of `bench/infer_7b.py` (the shape the
project's sampler takes from a 10 s 720p clip, with its metadata: 2 fps), the same prompt text
(system prompt and full rubric through the chat template) and the recipe's sampling (temperature
0.1, top-p 0.9, repetition penalty 1.05). Workloads:

* forced_400: every caption 400 tokens (end-of-text barred);
* mixed_lengths: clip i's caption ends at a length drawn uniformly from `--min_tokens`..`--tokens`
  (seeded), as real captions end at different lengths. The engine decodes a batch until its
  longest caption ends; vLLM refills finished slots;
* greedy_agreement: `--agreement_clips` clips decoded greedily by both (temperature 0, no
  repetition penalty, `--tokens` tokens): the share of tokens identical up to the first difference.

Each workload has its own clips (frames seeded by clip number), so vLLM's prefix and
multimodal caches can't reuse one workload's clips in the next; its shared system prompt
they may. FlashInfer is not carried to the GPU machine, so vLLM samples top-p with its
PyTorch sampler (VLLM_USE_FLASHINFER_SAMPLER=0), as the engine does (a full sort).

The engine runs first (its figures survive a vLLM failure), then its model is freed and vLLM
starts in the same process. Every vLLM attempt and its error goes to `--attempts_log`
(bench/results/infer_peer_attempts.log by default).

    python bench/infer_peer.py                          # on a GPU with vllm installed
    python bench/infer_peer.py --tiny --out /tmp/peer.json   # CPU check of the engine side
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import infer_7b
from infer_7b import rates, synthetic_frames

from avlabel.core.prompts import load_prompts
from avlabel.families import FAMILIES
from avlabel.infer.engine import CaptionEngine, chat_text
from avlabel.infer.inputs import ClipRef
from avlabel.infer.settings import GenerationSettings


def log_attempt(path: Path, what: str, error: BaseException | None = None) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    line = f"{stamp} {what}: " + ("ok" if error is None else f"{type(error).__name__}: {error}".replace("\n", " ")[:2000])
    print(line, flush=True)
    with path.open("a", encoding="utf-8") as log:
        log.write(line + "\n")


def clip_lengths(clips: range, low: int, high: int, seed: int = 0) -> dict[int, int]:
    rng = random.Random(seed)
    return {index: rng.randint(low, high) for index in clips}


def engine_greedy(model, processor, prompts, clips: range, tokens: int) -> dict[int, list[int]]:
    settings = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=tokens, min_new_tokens=tokens)
    engine = CaptionEngine(model, processor, prompts, settings, batch_size=len(clips), prefill_batch_size=8)
    refs = [ClipRef(f"synthetic-{i}", f"synthetic-{i}") for i in clips]
    out = {}
    for results in engine.run(refs, num_workers=0, load_frames=synthetic_frames):
        for clip, generation, error, _ in results:
            if error is not None:
                raise RuntimeError(f"{clip.clip_id}: {error}")
            out[int(clip.clip_id.rsplit("-", 1)[1])] = generation.tokens
    return out


def agreement(first: dict[int, list[int]], second: dict[int, list[int]], tokens: int) -> dict:
    """Tokens identical up to the first difference, as a share of `tokens`, per clip and on average."""
    shares = []
    for index in sorted(first):
        a, b = first[index], second[index]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(round(same / tokens, 4))
    return {"clips": len(shares), "tokens": tokens, "mean": round(sum(shares) / len(shares), 4), "per_clip": shares,
            "first_token_identical": sum(1 for i in first if first[i][:1] == second[i][:1])}


# ----------------------------------------------------------------------------- vLLM


def vllm_inputs(text: str, indices) -> list[dict]:
    """The prompt text with each clip's frames and their metadata (what the engine's processor call gets)."""
    inputs = []
    for index in indices:
        sampled = synthetic_frames(f"synthetic-{index}", None)
        metadata = {**sampled.processor_metadata(), "do_sample_frames": False}
        inputs.append({"prompt": text, "multi_modal_data": {"video": (sampled.frames, metadata)}})
    return inputs


def vllm_timed(llm, inputs: list[dict], params: list) -> tuple[dict, list]:
    sync = infer_7b.sync
    sync()
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    sync()
    seconds = time.perf_counter() - start
    return rates(len(inputs), seconds), outputs


def run_vllm(args, text: str, clips: dict[str, range], lengths: dict[int, int], settings: GenerationSettings,
             attempts: Path) -> dict:
    from transformers.processing_utils import ProcessorMixin
    from vllm import LLM, SamplingParams

    # vLLM 0.22 tokenizes a prompt with its video placeholder but without the video (profiling, and its
    # text-only path); transformers 5.24's processor input check refuses that ("Found 1 <|video_pad|> tokens
    # in the text but no videos were passed"), so the check is skipped in this benchmark's process
    ProcessorMixin.validate_inputs = lambda self, *args, **kwargs: None

    recipe = {"temperature": settings.temperature, "top_p": settings.top_p,
              "repetition_penalty": settings.repetition_penalty}
    base = dict(model=args.model_dir, dtype="bfloat16", seed=0, max_model_len=args.max_model_len,
                gpu_memory_utilization=args.gpu_memory_utilization, limit_mm_per_prompt={"image": 0, "video": 1},
                mm_processor_kwargs={"fps": 2.0, "do_sample_frames": False})
    # CUDA graphs and torch.compile first; then without them; then also without the processor arguments
    variants = [{}, {"enforce_eager": True}, {"enforce_eager": True, "mm_processor_kwargs": None}]
    llm = None
    for extra in variants:
        kwargs = {**base, **extra}
        start = time.perf_counter()
        try:
            llm = LLM(**kwargs)
            startup = time.perf_counter() - start
            log_attempt(attempts, f"vllm LLM({', '.join(f'{k}={v}' for k, v in extra.items()) or 'defaults'})")
            break
        except Exception as err:  # noqa: BLE001 - every attempt and its error is the record
            traceback.print_exc()
            log_attempt(attempts, f"vllm LLM({', '.join(f'{k}={v}' for k, v in extra.items()) or 'defaults'})", err)
            gc.collect()
            torch.cuda.empty_cache()
    if llm is None:
        return {"error": "LLM construction failed: see the attempts log"}
    import vllm

    config = llm.llm_engine.vllm_config
    out = {"vllm": vllm.__version__, "startup_s": round(startup, 1), "llm_kwargs": {k: str(v) for k, v in kwargs.items()},
           "max_num_seqs": config.scheduler_config.max_num_seqs,
           "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
           "enforce_eager": config.model_config.enforce_eager,
           "prefix_caching": config.cache_config.enable_prefix_caching}
    llm.generate(vllm_inputs(text, clips["warm_up"]), SamplingParams(max_tokens=8, **recipe), use_tqdm=False)

    forced = SamplingParams(max_tokens=args.tokens, min_tokens=args.tokens, **recipe)
    out["forced_400"], outputs = vllm_timed(llm, vllm_inputs(text, clips["forced_400"]), [forced] * args.clips)
    assert all(len(o.outputs[0].token_ids) == args.tokens for o in outputs)
    print("vllm forced:", json.dumps(out["forced_400"]), flush=True)

    mixed = [SamplingParams(max_tokens=lengths[i], min_tokens=lengths[i], **recipe) for i in clips["mixed_lengths"]]
    out["mixed_lengths"], outputs = vllm_timed(llm, vllm_inputs(text, clips["mixed_lengths"]), mixed)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [lengths[i] for i in clips["mixed_lengths"]]
    print("vllm mixed:", json.dumps(out["mixed_lengths"]), flush=True)

    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens, min_tokens=args.tokens)
    outputs = llm.generate(vllm_inputs(text, clips["greedy"]), greedy, use_tqdm=False)
    out["greedy_tokens"] = {i: list(o.outputs[0].token_ids) for i, o in zip(clips["greedy"], outputs)}
    out["prompt_tokens"] = len(outputs[0].prompt_token_ids)
    return out


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(infer_7b.CONFIG), help="the architecture: a file of bench/configs")
    parser.add_argument("--tiny", action="store_true", help="CPU check with the tiny test model (vLLM skipped if absent)")
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=400, help="forced caption length, and the longest mixed one")
    parser.add_argument("--min_tokens", type=int, default=120, help="shortest caption of the mixed workload")
    parser.add_argument("--agreement_clips", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=128, help="the engine's decode batch")
    parser.add_argument("--prefill_batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=8)
    parser.add_argument("--model_dir", default="/dev/shm/peer_model", help="where the random model is saved for vLLM")
    parser.add_argument("--max_model_len", type=int, default=4096)
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.6,
                        help="vLLM's share of the GPU: 84 GB of an H200, room for a retry after a failed start")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "infer_peer.json"))
    parser.add_argument("--attempts_log", help="default: beside --out, <its name>_attempts.log")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM in this process, after the engine's model is freed
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # FlashInfer is not on the GPU machine
    attempts = Path(args.attempts_log or Path(args.out).with_name(Path(args.out).stem + "_attempts.log"))
    attempts.parent.mkdir(parents=True, exist_ok=True)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = infer_7b.read_config(args.config)
    family = FAMILIES[config.model_type]
    prompts = load_prompts()
    infer_7b.set_frame_shape(config, args.tiny)
    if args.tiny:
        args.model_dir = tempfile.mkdtemp()
        model, processor = infer_7b.build_tiny(Path(args.model_dir), family)
    else:
        model, processor = infer_7b.build_full_size(config, device), infer_7b.full_size_processor(family)
        start = time.perf_counter()
        model.save_pretrained(args.model_dir)
        processor.save_pretrained(args.model_dir)
        print(f"saved the model to {args.model_dir} in {time.perf_counter() - start:.0f} s", flush=True)
    settings = GenerationSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens)  # the recipe's sampling
    n = args.clips
    clips = {"forced_400": range(n), "mixed_lengths": range(n, 2 * n), "greedy": range(2 * n, 2 * n + args.agreement_clips),
             "warm_up": range(10**6, 10**6 + 2)}
    lengths = clip_lengths(clips["mixed_lengths"], args.min_tokens, args.tokens)
    result = {
        **infer_7b.run_header(args, family, device),
        "clips": args.clips,
        "settings": {"frames": dict(infer_7b.FRAME_SHAPE), "fps": 2.0, "prompt": "system + full rubric",
                     "temperature": settings.temperature, "top_p": settings.top_p,
                     "repetition_penalty": settings.repetition_penalty, "forced_tokens": args.tokens,
                     "mixed_tokens": [args.min_tokens, args.tokens], "mixed_mean_tokens": round(sum(lengths.values()) / n, 1),
                     "engine_batch": args.batch_size, "engine_prefill_batch": args.prefill_batch_size},
        "forced_400": {}, "mixed_lengths": {},
    }

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    run = dict(model=model, processor=processor, prompts=prompts, settings=settings, batch=args.batch_size,
               prefill=args.prefill_batch_size, clips=args.clips, workers=args.num_workers, graphs=True)
    engine = {"forced_400": infer_7b.engine_run(**run)}
    engine["mixed_lengths"] = infer_7b.engine_run(**{**run, "settings": GenerationSettings(max_new_tokens=args.tokens)},
                                                  lengths=lengths, first=clips["mixed_lengths"].start)
    for workload, figures in engine.items():
        result[workload].update(engine_clips_per_hour=figures["clips_per_hour"], engine=figures)
        print(f"engine {workload}: {json.dumps(figures)}", flush=True)
    engine_tokens = engine_greedy(model, processor, prompts, clips["greedy"], args.tokens)
    save()
    text = chat_text(processor, prompts)
    del model, run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    try:
        import vllm  # noqa: F401

        log_attempt(attempts, "import vllm")
    except Exception as err:  # noqa: BLE001 - recorded; the engine's figures stand on their own
        log_attempt(attempts, "import vllm", err)
        result["vllm_error"] = f"{type(err).__name__}: {err}"[:500]
        save()
        return
    try:
        peer = run_vllm(args, text, clips, lengths, settings, attempts)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        log_attempt(attempts, "vllm generate", err)
        peer = {"error": f"{type(err).__name__}: {err}"[:500]}
    if "error" in peer:
        result["vllm_error"] = peer["error"]
    else:
        greedy = peer.pop("greedy_tokens")
        for workload in ("forced_400", "mixed_lengths"):
            result[workload].update(vllm_clips_per_hour=peer[workload]["clips_per_hour"], vllm=peer.pop(workload))
            result[workload]["engine_over_vllm"] = round(
                result[workload]["engine_clips_per_hour"] / result[workload]["vllm_clips_per_hour"], 3)
        result["greedy_agreement"] = agreement(engine_tokens, greedy, args.tokens)
        result["vllm"] = peer
    save()
    print(f"\n{result['device']}, {args.clips} clips")
    print(f"{'workload':<16}{'engine clips/h':>16}{'vLLM clips/h':>14}")
    for workload in ("forced_400", "mixed_lengths"):
        row = result[workload]
        print(f"{workload:<16}{row['engine_clips_per_hour']:>16}{row.get('vllm_clips_per_hour', '-')!s:>14}")
    if "greedy_agreement" in result:
        print("greedy agreement:", result["greedy_agreement"]["mean"])


if __name__ == "__main__":
    main()
