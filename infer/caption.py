"""`avlabel caption`: label clips with Cosmos Reason (or any Qwen2.5-VL / Qwen3-VL model).

    avlabel caption --config recipes/infer/cosmos_reason1_7b.yaml --input clips/ --output_dir captions/
    accelerate launch -m infer --config recipes/infer/cosmos_reason1_7b.yaml --input clips/ --output_dir captions/

Writes `captions.jsonl` (one record per clip), `labels/<clip_id>.label.json` and
`summary.json` to the output folder. Frames are sampled as the model was trained (the
`sampling_config.json` that training saves in its model or adapter folder) unless --fps,
--max_frames, --min_pixels or --max_pixels say otherwise; a `calibration.json` there (`avlabel
calibrate`) calibrates the records' confidence. Rerunning the same command resumes: clips already
captioned with the same model, adapter, prompts and settings are skipped, failed ones
are retried. Under `accelerate launch` every process captions its share of the clips
into its own shard, and the main process merges the shards at the end.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .settings import GenerationSettings

logger = logging.getLogger(__name__)
FAILURES_SHOWN = 20  # failed clips printed one line each; captions.jsonl holds every one


@dataclass
class CaptionArguments:
    input: str = field(
        metadata={"help": "Clips: a builder dataset (folder or Hub id, see --split), a folder of clips, a glob, "
                  "or a manifest (.txt, .jsonl, .csv)."}
    )
    output_dir: str = field(default="captions", metadata={"help": "Folder for captions.jsonl, labels/ and summary.json."})
    split: str = field(default="test", metadata={"help": "Split to caption when --input is a dataset."})
    model: str = field(default="nvidia/Cosmos-Reason1-7B", metadata={"help": "Model: Hub id or local folder."})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter (LoRA) folder or Hub id to apply."})
    quantization: Literal["4bit", "8bit"] | None = field(
        default=None, metadata={"help": "Load the weights in 4 or 8 bits (bitsandbytes) to save GPU memory."}
    )
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float32."})
    system_prompt_file: str | None = field(default=None, metadata={"help": "Replace the system prompt with this file."})
    user_prompt_file: str | None = field(default=None, metadata={"help": "Replace the rubric (user prompt) with this file."})
    short_prompt: bool = field(
        default=False, metadata={"help": "Use the short user prompt (only for models fine-tuned with it)."}
    )
    batch_size: int = field(default=64, metadata={"help": "Clips decoded together (lowered automatically if memory is short)."})
    prefill_batch_size: int = field(default=8, metadata={"help": "Clips per prefill forward pass."})
    num_workers: int = field(default=4, metadata={"help": "Processes decoding frames ahead of the model (0: in-process)."})
    cuda_graphs: bool = field(default=True, metadata={"help": "Replay decode steps as CUDA graphs (GPU only)."})
    limit: int | None = field(default=None, metadata={"help": "Caption only the first N clips of the input."})
    overwrite: bool = field(default=False, metadata={"help": "Delete earlier captions in --output_dir and start over."})

    def __post_init__(self):
        """Refuse what is wrong on the command line itself before anything loads."""
        from avlabel.core.parser import check_at_least, check_input, check_model, check_source, check_split

        check_at_least(1, batch_size=self.batch_size, prefill_batch_size=self.prefill_batch_size, limit=self.limit)
        check_at_least(0, num_workers=self.num_workers)
        check_model(self.model, "--model", "--adapter")
        if self.adapter:
            check_source(self.adapter, "--adapter", "adapter")
        check_input(self.input)
        check_split(self.input, self.split, "--input")


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    types = [CaptionArguments, GenerationSettings]
    if subparsers is not None:
        return subparsers.add_parser("caption", dataclass_types=types)
    return ArgumentParser(dataclass_types=types, prog="avlabel caption")


def _record(clip, generation, error: str | None, seconds: float, identity: dict[str, Any],
            token_bytes: list[bytes], calibration=None) -> dict[str, Any]:
    from .confidence import answer_confidence
    from .parse import parse_output

    record = {"clip_id": clip.clip_id, "video": clip.path, **identity}
    if generation is None:
        return {
            **record, "raw": None, "label": {}, "valid": False, "errors": {}, "cut_fields": {}, "confidence": {},
            "confidence_raw": {}, "text_mean_logprob": {}, "clip_confidence": None, "prompt_tokens": None,
            "completion_tokens": None, "seconds": round(seconds, 4), "status": "failed", "error": error,
        }
    parsed = parse_output(generation.text)
    answered = [name for name in parsed.label if name not in generation.cut_fields]
    confidence = answer_confidence([token_bytes[t] for t in generation.tokens], generation.logprobs, answered)
    # the model folder's calibration.json (avlabel/core/calibration.py): `confidence` calibrated, the model's own
    # probabilities in `confidence_raw`; without one both are the model's
    confidence = calibration.calibrate(confidence) if calibration else {**confidence, "confidence_raw": confidence["confidence"]}
    return {
        **record,
        "raw": generation.text,
        "label": parsed.label,
        "valid": parsed.valid,
        "errors": parsed.errors,
        # constrained decoding finished these fields itself (token budget) or stopped them (length limit):
        # the label is valid, but these values are not the model's whole answer
        "cut_fields": generation.cut_fields,
        # infer/confidence.py: p of each closed-set answer, mean token log-probability of free text, the clip's lowest p
        **confidence,
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": len(generation.tokens),
        "seconds": round(seconds, 4),
        "status": "ok",
        "error": None,
    }


def _check_budget(tokenizer, settings: GenerationSettings, answer) -> None:
    """Refuse (constrained) or warn about (free) a --max_new_tokens that no valid label fits in."""
    from avlabel.core.errors import UsageError

    from .constrained import budget_error, minimum_budget

    minimum = minimum_budget(tokenizer, answer)
    if settings.max_new_tokens < minimum:
        if settings.constrained:
            raise UsageError(budget_error(settings.max_new_tokens, minimum, answer))
        logger.warning("%s: no answer can be a valid label", budget_error(settings.max_new_tokens, minimum, answer))


def _clear(out: Path) -> None:
    """--overwrite: remove what earlier caption runs wrote in `out` (records, summary, their clips' label files),
    nothing else."""
    from avlabel.core.layouts import LABEL_SUFFIX

    from . import records

    for record in records.read_all(out):
        (out / records.LABELS / f"{record['clip_id']}{LABEL_SUFFIX}").unlink(missing_ok=True)
    for path in records.record_files(out):
        path.unlink()
    (out / records.SUMMARY).unlink(missing_ok=True)


def run_identity(args: CaptionArguments, settings: GenerationSettings, prompts, dtype: str, sampling, answer,
                 calibration) -> dict[str, Any]:
    """What every record of this run carries: a rerun resumes only records with the same identity."""
    from avlabel.families import weights_fingerprint

    return {
        "model": args.model,
        "adapter": args.adapter,
        # a model retrained into the same folder is another model
        "weights_sha": {"model": weights_fingerprint(args.model), "adapter": weights_fingerprint(args.adapter)},
        "prompt_sha": prompts.sha,
        "generation": {**settings.to_dict(), **sampling.to_dict(), "dtype": dtype, "quantization": args.quantization,
                       **({"answer": answer.to_dict()} if settings.constrained else {})},
        # the record's `confidence` is calibrated with these parameters (None: the model's own probabilities)
        "calibration": calibration.record_entry() if calibration else None,
    }


def caption_share(mine: list, args: CaptionArguments, settings: GenerationSettings, state, out: Path, processor, prompts,
                  dtype: str, sampling, answer, calibration, identity: dict[str, Any]) -> float:
    """Caption this process's clips into its own shard; returns the seconds loading the weights took."""
    import torch
    from tqdm.auto import tqdm

    from avlabel.families import bnb_quantization, load_model

    from . import records
    from .engine import CaptionEngine, ClipPreparer, chat_text, prepared_clips

    # the decoding workers start now and have frames ready when the weights are loaded
    prepared = prepared_clips(mine, ClipPreparer(processor, chat_text(processor, prompts), getattr(torch, dtype)),
                              sampling, args.batch_size, args.num_workers)
    loading = time.perf_counter()
    model = load_model(args.model, adapter=args.adapter, dtype=dtype, device_map={"": state.device},
                       quantization_config=bnb_quantization(args.quantization, dtype)).eval()
    load_seconds = round(time.perf_counter() - loading, 2)
    engine = CaptionEngine(
        model, processor, prompts, settings, args.batch_size, args.prefill_batch_size, args.cuda_graphs,
        sampling=sampling, answer=answer,
    )
    writer = records.RecordWriter(records.shard_path(out, state.process_index, state.num_processes))
    progress = tqdm(total=len(mine), desc="captioning", unit="clip", disable=not state.is_local_main_process)
    try:
        for batch in engine.run(mine, prepared=prepared):
            writer.write([_record(clip, gen, error, sec, identity, engine.token_bytes, calibration)
                          for clip, gen, error, sec in batch])
            progress.update(len(batch))
    finally:
        writer.close()
        progress.close()
    return load_seconds


def merge_and_summarize(out: Path, clips: list, todo: list, state, start: float, load_seconds: float | None,
                        identity: dict[str, Any]) -> dict:
    """Merge the shards into captions.jsonl, write labels/ and summary.json, print the run's line; returns the summary."""
    import torch

    from . import records

    merged = records.merge(out, [clip.clip_id for clip in clips])
    unwritten = records.write_labels(out, merged)
    status = {r["clip_id"]: r.get("status") for r in merged}
    todo_ids = {clip.clip_id for clip in todo}
    this_run = {
        "captioned": sum(status.get(c) == "ok" for c in todo_ids),
        "failed": sum(status.get(c) == "failed" for c in todo_ids),
        "skipped": len(clips) - len(todo),
        "processes": state.num_processes,
        "seconds": round(time.perf_counter() - start, 2),
        # this (the main) process's: loading the weights, and the most GPU memory its tensors took
        "model_load_seconds": load_seconds,
        "peak_gib": round(torch.cuda.max_memory_allocated(state.device) / 2**30, 2) if state.device.type == "cuda" else None,
    }
    wanted = {clip.clip_id for clip in clips}
    summary = records.summarize([r for r in merged if r["clip_id"] in wanted], len(clips), this_run, identity)
    (out / records.SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(
        f"{summary['captioned']}/{len(clips)} clips captioned ({this_run['captioned']} now, {this_run['skipped']} "
        f"skipped as done), {summary['failed']} failed, schema-valid rate {summary['valid_rate']}; wrote {out}"
    )
    for path, reason in list(unwritten.items())[:FAILURES_SHOWN]:
        print(f"warning: {path}: not written ({reason}); the clip's label is in {out / records.CAPTIONS}")
    failed = [r for r in merged if r["clip_id"] in todo_ids and r.get("status") == "failed"]
    for record in failed[:FAILURES_SHOWN]:
        print(f"failed: {record['video']}: {record['error']}")
    if failed:
        more = f"{len(failed) - FAILURES_SHOWN} more, and " if len(failed) > FAILURES_SHOWN else ""
        print(f"{more}every reason, in {out / records.CAPTIONS} (status \"failed\"); a failed clip is tried again "
              "when caption runs again, so fix or replace the files, or leave them out")
    return summary


def main(args: CaptionArguments, settings: GenerationSettings) -> dict:
    import torch
    from accelerate import PartialState

    from avlabel.core.calibration import Calibration
    from avlabel.core.prompts import load_prompts
    from avlabel.families import load_config

    from . import records
    from .inputs import resolve_inputs

    # without a GPU, `cpu=True` lets torchrun / mpirun processes form a gloo group
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(args.output_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    with state.main_process_first():  # the main process writes any clips a Hub dataset stores as bytes
        clips = resolve_inputs(args.input, args.split, cache_dir=out / ".clips")
    clips = clips[: args.limit] if args.limit else clips

    prompts = load_prompts(args.system_prompt_file, args.user_prompt_file, args.short_prompt)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if state.device.type == "cuda" else "float32")
    # resolved before any record is read: a rerun with the same effective frames resumes however they were given
    sampling = settings.sampling(load_config(args.model, "--model"), args.model, args.adapter)
    answer = settings.answer(args.model, args.adapter)
    calibration = Calibration.for_model(args.adapter, args.model)
    identity = run_identity(args, settings, prompts, dtype, sampling, answer, calibration)
    earlier = [] if args.overwrite else records.read_all(out)
    records.check_same_run(earlier, identity, out)
    done = records.done_clip_ids(earlier)
    todo = [clip for clip in clips if clip.clip_id not in done]
    state.wait_for_everyone()  # every process has read the same records before any writes

    if not todo:  # a finished run: fold in any shards and summarise, loading no processor and no model
        if not state.is_main_process:
            return {}
        print(f"nothing to do: every clip already has a record in {out} (--overwrite starts over)")
        return merge_and_summarize(out, clips, todo, state, time.perf_counter(), None, identity)
    from transformers import AutoProcessor  # after the inputs and earlier records are known good: it imports the model code

    processor = AutoProcessor.from_pretrained(args.model)  # loaded once: its tokenizer is a second or two
    _check_budget(processor.tokenizer, settings, answer)
    if args.overwrite and state.is_main_process:  # only now: a run refused above leaves the earlier captions as they were
        _clear(out)
    state.wait_for_everyone()  # cleared before any process writes

    start = time.perf_counter()
    load_seconds = None
    with state.split_between_processes(todo) as mine:
        if mine:
            load_seconds = caption_share(mine, args, settings, state, out, processor, prompts, dtype, sampling, answer,
                                         calibration, identity)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    return merge_and_summarize(out, clips, todo, state, start, load_seconds, identity)


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("caption")
