"""`avlabel train`: supervised fine-tuning of Cosmos Reason on the builder's dataset.

In the style of TRL's `trl/scripts/sft.py`: script arguments, `SFTConfig` and
`ModelConfig`, read by `TrlParser` from a YAML recipe and the command line. One recipe
runs on one GPU or many:

    python -m train --config recipes/cosmos_reason1_7b/qlora.yaml
    accelerate launch --config_file accelerate_config.yaml -m train --config recipes/cosmos_reason1_7b/lora.yaml
    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m train --config recipes/cosmos_reason1_7b/full.yaml

The method follows from `ModelConfig`: `use_peft` gives LoRA, `use_peft` with
`load_in_4bit` gives QLoRA, neither gives full fine-tuning. The output folder holds the
Trainer's checkpoints, `adapter/` (LoRA and QLoRA), `merged/` (a bf16 model plus the
processor, loadable with `from_pretrained`), `loss_curve.png`, `trainer_state.json`,
`recipe.yaml` (every resolved argument) and `train_results.json` (`Trainer.save_metrics`: the
Trainer's metrics and the run's settings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avlabel.core.parser import Deferred
from avlabel.core.sampling import SamplingArguments
from avlabel.infer.constrained import DEFAULT_FORMAT, AnswerConfig, AnswerFormat

logger = logging.getLogger(__name__)


@dataclass
class TrainScriptArguments(SamplingArguments):
    # frame sampling (--fps, --max_frames, --min_pixels, --max_pixels) comes from SamplingArguments; the
    # resolved settings are saved with the trained model, so captioning it sees the same frames
    dataset_name: str | None = field(
        default=None, metadata={"help": "The builder's dataset: a local folder or a Hub dataset id."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split for the evaluation loss during training."})
    dataset_streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset instead of loading it (Hub datasets larger than the disk)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    answer_format: AnswerFormat = field(
        default=DEFAULT_FORMAT,
        metadata={"help": "Assistant target: 'fenced' (```json block, as the Cosmos recipe) or 'plain' (one-line JSON)."},
    )
    system_prompt_file: str | None = field(default=None, metadata={"help": "Replace the system prompt with this file."})
    user_prompt_file: str | None = field(default=None, metadata={"help": "Replace the rubric prompt with this file."})
    short_prompt: bool = field(
        default=False,
        metadata={"help": "Train with the short user prompt instead of the rubric (saves ~1,300 tokens a sample; "
                  "inference must then use the short prompt too)."},
    )
    frame_cache: bool = field(
        default=True, metadata={"help": "Keep decoded frames on disk so later epochs and resumed runs skip decoding."}
    )
    frame_cache_dir: str | None = field(
        default=None, metadata={"help": "Where the frame cache lives (default: <output_dir>/frame_cache)."}
    )
    strict: bool = field(
        default=False,
        metadata={"help": "Stop on a sample that is over max_length or won't decode, instead of reporting and skipping it."},
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Full fine-tuning: keep the vision blocks fixed."})
    freeze_projector: bool = field(
        default=False, metadata={"help": "Full fine-tuning: keep the vision-to-language projector (merger) fixed."}
    )
    kbit_fp32_upcast: bool = field(
        default=False,
        metadata={"help": "QLoRA: run PEFT's prepare_model_for_kbit_training, which keeps every non-quantized weight "
                  "in fp32 (about 2 GiB more on the 7B model; bf16 compute does not need it)."},
    )
    use_liger: bool = field(
        default=True,
        metadata={"help": "On a GPU with liger-kernel installed (pip install 'avlabel[liger]'), train with Liger's Triton "
                  "kernels for the layers it patches (RMSNorm, SwiGLU: use_liger_kernel); false keeps transformers' own."},
    )
    padded_vision_windows: bool = field(
        default=True,
        metadata={"help": "Run the vision tower's windowed SDPA attention as one padded call per layer, as captioning does, "
                  "instead of one call per window (same result and gradients; flash_attention_2 already does one call)."},
    )
    export_merged: bool = field(
        default=True, metadata={"help": "At the end, write merged/: the fine-tuned model in bf16 with the processor."}
    )


def method_of(model_args) -> str:
    """'full', 'lora' or 'qlora', from TRL's ModelConfig."""
    if model_args.load_in_4bit or model_args.load_in_8bit:
        if not model_args.use_peft:
            raise ValueError("quantized weights can't be trained directly: set use_peft: true (QLoRA)")
        return "qlora"
    return "lora" if model_args.use_peft else "full"


# ----------------------------------------------------------------------------- model


def load_training_model(model_args, script_args, training_args):
    """The model, loaded for the method: bf16/fp32, 4-bit for QLoRA, vision parts frozen on request."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType
    from trl import get_quantization_config

    from avlabel.families import family_of, load_model

    quantization_config = get_quantization_config(model_args)
    device_map = None
    # 4-bit weights are placed at load time: on this process's GPU, except under FSDP, which shards
    # them itself (it then needs bnb_4bit_quant_storage equal to the dtype of the other weights).
    if quantization_config is not None and torch.cuda.is_available():
        state = PartialState()
        if state.distributed_type != DistributedType.FSDP:
            device_map = {"": state.local_process_index}
    model = load_model(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=model_args.dtype,
        device_map=device_map, quantization_config=quantization_config,
        attn_implementation=model_args.attn_implementation, trust_remote_code=training_args.trust_remote_code,
    )

    family = family_of(model)
    if script_args.padded_vision_windows and family.pad_vision_windows(model):
        logger.info("vision tower: windowed attention as one padded SDPA call per layer")
    for name, param in family.vision_tower(model).named_parameters():
        frozen = script_args.freeze_projector if family.is_projector(name) else script_args.freeze_vision_tower
        if frozen:
            param.requires_grad_(False)
    if quantization_config is not None:
        prepare_kbit(model, script_args, training_args)
        if not torch.cuda.is_available():
            # bitsandbytes repacks a 4-bit layer for CPU inference the first time it runs in eval mode and
            # never unpacks it, so training after an evaluation fails; keep the trainable layout
            for module in model.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
    return model


def prepare_kbit(model, script_args, training_args) -> None:
    """k-bit preparation for QLoRA: freeze the base weights, feed gradients through checkpointing.

    PEFT's `prepare_model_for_kbit_training` also copies every non-quantized weight
    (embeddings, LM head, norms; the 7B model's embeddings and head alone are 1.1B
    parameters) to fp32, which fp16 training needed and bf16 compute does not; that path
    stays available as `kbit_fp32_upcast`.
    """
    if script_args.kbit_fp32_upcast:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
        )
        return
    model.requires_grad_(False)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()


def quantization_summary(model) -> dict | None:
    """How the loaded weights are quantized (None for bf16/fp32), counted from the layers themselves."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    layers = sum(type(module).__name__ in ("Linear4bit", "Linear8bitLt") for module in model.modules())
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if not settings.get("load_in_4bit"):  # 8-bit (LLM.int8): the bnb_4bit_* settings are defaults it never uses
        return {"bits": 8, "quantized_layers": layers}
    return {
        "bits": 4,
        "quant_type": settings.get("bnb_4bit_quant_type"),
        "double_quant": settings.get("bnb_4bit_use_double_quant"),
        "compute_dtype": str(settings.get("bnb_4bit_compute_dtype")),
        "quantized_layers": layers,
    }


def keep_frozen_vision_out_of_backward(model) -> bool:
    """Stop the backward pass at a vision tower none of whose blocks train.

    For adapters with checkpointing, transformers' `enable_input_require_grads` hooks the
    input embeddings of every sub-model, the vision tower's patch embedding included, so
    the backward pass runs through all 32 vision blocks (recomputing each) for gradients
    nothing uses. The projector may still train: its weight gradients need only its input.
    Returns whether a hook was removed.
    """
    from avlabel.families import family_of

    family = family_of(model)
    visual, embeddings = family.vision_tower(model), family.vision_input_embeddings(model)
    if embeddings is None or any(
        param.requires_grad for name, param in visual.named_parameters() if not family.is_projector(name)
    ):
        return False
    hooks = embeddings._forward_hooks
    hooked = [key for key, hook in hooks.items() if getattr(hook, "__name__", "") == "make_inputs_require_grads"]
    for key in hooked:
        del hooks[key]
    return bool(hooked)


def frozen_vision_callback():
    """A callback applying `keep_frozen_vision_out_of_backward` once the Trainer has set up checkpointing."""
    from transformers import TrainerCallback

    class FrozenVisionCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if keep_frozen_vision_out_of_backward(model):
                logger.info("vision tower frozen: the backward pass stops at its output")

    return FrozenVisionCallback()


def liger_problem(model_type: str) -> str | None:
    """Why the installed liger-kernel can't train a `model_type` model here, or None when it can.

    transformers patches a model through Liger's module for its model type. That import fails when the two
    disagree (liger-kernel 0.8.5 imports the Qwen-VL output classes that transformers 5.23 removed), which would
    stop the run when the trainer starts; trying it first lets the run fall back to transformers' layers.
    """
    import importlib
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:  # importable from a source tree, without package metadata
            return "(version unknown)"

    try:
        importlib.import_module(f"liger_kernel.transformers.model.{model_type}")
    except ImportError as err:  # a missing module too: Liger has no kernels for this model type
        return (f"liger-kernel {version('liger-kernel')} can't patch {model_type} under transformers "
                f"{version('transformers')} ({err})")
    return None


def default_lora_targets(model_args, family) -> None:
    """LoRA on the family's language-model layers unless the recipe names targets (e.g. all-linear)."""
    if model_args.use_peft and not model_args.lora_target_modules:
        model_args.lora_target_modules = family.lora_target_modules


# ----------------------------------------------------------------------------- data


def load_splits(script_args, training_args):
    """(train, eval or None) from the builder's dataset, with the `video` column left undecoded."""
    from datasets import Video

    from avlabel.core.loading import load_clip_dataset

    dataset = load_clip_dataset(script_args.dataset_name, name=script_args.dataset_config,
                                streaming=script_args.dataset_streaming)
    splits = []
    for split, limit in (
        (script_args.dataset_train_split, script_args.max_train_samples),
        (script_args.dataset_test_split if training_args.eval_strategy != "no" else None, script_args.max_eval_samples),
    ):
        if split is None:
            splits.append(None)
            continue
        if split not in dataset:
            raise ValueError(f"{script_args.dataset_name}: no split {split!r} (it has {', '.join(dataset)})")
        part = dataset[split].cast_column("video", Video(decode=False))  # the collator samples frames itself
        if limit is not None:
            part = part.take(limit) if script_args.dataset_streaming else part.select(range(min(limit, len(part))))
        splits.append(part)
    return splits[0], splits[1]


def answer_config(dataset, answer_format: str):
    """The answer layout training writes, with text limits from the longest human answers of the split."""
    from datasets import IterableDataset

    from avlabel.core.schema import TEXT_FIELD_NAMES

    labels = dataset.select_columns(list(TEXT_FIELD_NAMES))
    # a streamed split is read only this far: the longest answers of a large sample bound the rest well enough
    return AnswerConfig.from_labels(labels.take(10_000) if isinstance(labels, IterableDataset) else labels, answer_format)


def with_lengths(dataset, collator, report_path: Path | None, strict: bool, is_main: bool):
    """Add a `length` column (for `train_sampling_strategy: group_by_length`) and set aside rows over `max_length`,
    or that no model of the family can take (an extreme aspect ratio, in a dataset built before the builder
    refused it).

    Lengths come from the probe columns, so nothing is decoded here; each row set aside
    is logged and written to `report_path`.
    """
    from datasets import IterableDataset

    from .collator import over_length_reason, report_skipped

    unusable = -1  # the length column of a row no model of the family can take

    def estimate(row) -> tuple[int, str | None]:
        try:
            return collator.estimated_length(row), None
        except ValueError as err:  # the vision encoder's size rules refuse the clip
            return unusable, str(err)

    def add_length(row):
        return {"length": estimate(row)[0]}

    def fits(length: int) -> bool:
        return length != unusable and (collator.max_length is None or length <= collator.max_length)

    def report(row, length):
        reason = estimate(row)[1] if length == unusable else over_length_reason(length, collator.max_length)
        if strict:
            raise ValueError(f"clip {row['clip_id']}: {reason} (run without --strict to skip such samples)")
        if is_main:
            logger.warning("skipping clip %s: %s", row["clip_id"], reason)
            report_skipped(report_path, row["clip_id"], "length", reason)

    if isinstance(dataset, IterableDataset):

        def kept(row):
            if not fits(row["length"]):
                report(row, row["length"])
                return False
            return True

        return dataset.map(add_length).filter(kept)

    # datasets can't hash a function holding a processor; name the result by everything the lengths depend on
    settings = [dataset._fingerprint, collator.answer_format, collator.prompts.sha, collator.chat_template,
                json.dumps(collator.frames.sampling.to_dict(), sort_keys=True), str(len(collator.processor.tokenizer))]
    dataset = dataset.map(add_length, new_fingerprint=hashlib.sha1("|".join(settings).encode()).hexdigest())
    keep = []
    for index, length in enumerate(dataset["length"]):
        if fits(length):
            keep.append(index)
        else:
            report(dataset[index], length)
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


# ----------------------------------------------------------------------------- run


# what this one run was told to do, not how to train: a recipe read back with --config would resume a new run
RUN_ONLY = ("resume_from_checkpoint",)


def _resolved_arguments(*parsed) -> dict:
    """Every argument of the run as one flat mapping that `--config` reads back."""
    resolved: dict[str, Any] = {}
    for args in parsed:
        # TrainingArguments.to_dict turns enums and nested configs into plain values and hides tokens
        values = args.to_dict() if hasattr(args, "to_dict") else dataclasses.asdict(args)
        for name, value in values.items():
            if name.startswith("_") or name in RUN_ONLY or (isinstance(value, str) and value.startswith("<")
                                                             and value.endswith("_TOKEN>")):
                continue
            resolved[name] = value
    return resolved


def _hardware(world_size: int) -> str:
    import torch

    if torch.cuda.is_available():
        return f"{world_size} x {torch.cuda.get_device_name(0)}"
    return f"cpu, {world_size} process(es), {os.cpu_count()} cores"


def _last_logged(log_history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return values[-1] if values else None


def adapt_training_arguments(training_args, script_args, family) -> None:
    """Set what this script's collator, this machine and the recipe's speed options need in `training_args`."""
    import torch

    # What SFTTrainer needs for a custom video collator: raw rows reach the collator, which
    # tokenizes, masks and enforces max_length itself.
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {"skip_prepare_dataset": True}
    # pinned memory needs a GPU; without one torch warns at every data loader
    training_args.dataloader_pin_memory = training_args.dataloader_pin_memory and torch.cuda.is_available()
    if isinstance(training_args.resume_from_checkpoint, str) and training_args.resume_from_checkpoint.lower() in ("true", "last"):
        training_args.resume_from_checkpoint = True  # the newest checkpoint-* in output_dir
    if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false") == "true":
        # FSDP checkpoints its wrapped layers itself; transformers refuses both at once
        training_args.activation_checkpointing = training_args.gradient_checkpointing = False
    if script_args.use_liger and torch.cuda.is_available():  # Liger's kernels are Triton: GPUs only
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            logger.info("liger-kernel is not installed: transformers' own layers (pip install 'avlabel[liger]')")
        elif (problem := liger_problem(family.model_type)) is not None:
            logger.warning(f"use_liger: {problem}; training with transformers' own layers")
        else:
            # transformers applies Liger's layer kernels; TRL keeps its own fused LM head (no Liger cross-entropy)
            training_args.use_liger_kernel = True


def save_recipe(output_dir: Path, *parsed) -> None:
    """recipe.yaml: every resolved argument, readable back with `--config`."""
    import yaml

    resolved = _resolved_arguments(*parsed)
    (output_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")


def make_collator(processor, prompts, model, family, script_args, training_args, model_args, output_dir: Path):
    """The video collator: frames sampled (and cached) as the recipe says, over-long samples reported to skipped.jsonl."""
    from .collator import FrameCache, VideoSFTCollator

    cache_dir = (script_args.frame_cache_dir or output_dir / "frame_cache") if script_args.frame_cache else None
    return VideoSFTCollator(
        processor=processor,
        prompts=prompts,
        frames=FrameCache(cache_dir, script_args.resolve_sampling(model.config, model_args.model_name_or_path)),
        family=family,
        max_length=training_args.max_length,
        answer_format=script_args.answer_format,
        strict=script_args.strict,
        pad_to_multiple_of=training_args.pad_to_multiple_of,
        report_path=output_dir / "skipped.jsonl",
    )


def prepare_datasets(script_args, training_args, collator, output_dir: Path, is_main: bool):
    """(train, eval or None, answer config): the splits with their lengths, the answer layout saved to `output_dir`."""
    with training_args.main_process_first(desc="dataset lengths"):
        train_dataset, eval_dataset = load_splits(script_args, training_args)
        # the answer's layout and text limits for constrained captioning, saved with the model (and here for export)
        answer = answer_config(train_dataset, script_args.answer_format)
        if is_main:
            answer.save(output_dir)
        train_dataset = with_lengths(train_dataset, collator, collator.report_path, script_args.strict, is_main)
        if hasattr(train_dataset, "__len__") and len(train_dataset) == 0:  # TRL would stop on it with StopIteration
            raise ValueError(f"--dataset_name {script_args.dataset_name}: every training clip was set aside (why, "
                             f"clip by clip: {collator.report_path}); if they are over --max_length "
                             f"{training_args.max_length}, raise it or train with --short_prompt")
        collator.spares = train_dataset  # a batch whose every clip fails to decode takes the next usable row
        if eval_dataset is not None:
            eval_dataset = with_lengths(eval_dataset, collator, collator.report_path, script_args.strict, is_main)
    return train_dataset, eval_dataset, answer


def final_eval_loss(trainer, eval_dataset) -> float | None:
    """The evaluation loss at the last step: the one logged there, else evaluated now (None without an eval split)."""
    if eval_dataset is None:
        return None
    logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if logged and logged[-1]["step"] == trainer.state.global_step:
        return logged[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def run_summary(trainer, train_output, method: str, script_args, training_args, model_args, *, train_dataset,
                load_seconds: float, peak_gib: float | None, prompts, quantization: dict | None, sampling,
                padded_vision_windows: bool, eval_loss: float | None) -> dict[str, Any]:
    """train_results.json: the Trainer's own metrics (train_loss over every step, a resumed run's included;
    runtime, flos) and what the model card needs to describe the run."""
    log_history = trainer.state.log_history
    return {
        **train_output.metrics,
        "method": method,
        "base_model": model_args.model_name_or_path,
        "dataset": script_args.dataset_name,
        "train_samples": len(train_dataset) if hasattr(train_dataset, "__len__") else None,
        "epochs": round(trainer.state.epoch or 0.0, 2),  # trained, not asked for: max_steps can stop a run early
        "steps": trainer.state.global_step,
        "hardware": _hardware(training_args.world_size),
        # the main process's: loading the weights, and the most GPU memory its tensors took while training
        "model_load_seconds": round(load_seconds, 2),
        "peak_gib": peak_gib,
        "prompt_sha": prompts.sha,
        "short_prompt": script_args.short_prompt,
        "answer_format": script_args.answer_format,
        "hyperparameters": {
            "learning_rate": training_args.learning_rate,
            "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "global_batch_size": training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size,
            "max_length": training_args.max_length,
            "bf16": training_args.bf16,
            "gradient_checkpointing": training_args.gradient_checkpointing,
            "lora_r": model_args.lora_r if model_args.use_peft else None,
            "lora_alpha": model_args.lora_alpha if model_args.use_peft else None,
            "lora_target_modules": model_args.lora_target_modules if model_args.use_peft else None,
            "quantization": quantization,
            "sampling": sampling.to_dict(),
        },
        # what the speed settings resolved to on this machine (bench/train_fsdp.py reads them back)
        "speed_settings": {
            "padded_vision_windows": padded_vision_windows,
            "use_liger_kernel": training_args.use_liger_kernel,
            "activation_checkpointing": training_args.activation_checkpointing,
            "activation_checkpointing_kwargs": training_args.activation_checkpointing_kwargs,
            "fsdp_activation_checkpointing": os.environ.get("FSDP_ACTIVATION_CHECKPOINTING") == "true",
        },
        "final_loss": _last_logged(log_history, "loss") or train_output.metrics["train_loss"],
        "eval_loss": eval_loss,
    }


def main(script_args: TrainScriptArguments, training_args, model_args) -> Path:
    import torch
    from transformers import AutoProcessor
    from trl import get_peft_config

    from avlabel.core.prompts import load_prompts
    from avlabel.families import family_of, load_config
    from avlabel.families.base import VISION_ATTENTION

    from .export import export_model
    from .plots import plot_loss
    from .trainer import VideoSFTTrainer

    if not script_args.dataset_name:
        raise ValueError("dataset_name is required: the builder's dataset folder or a Hub dataset id")
    method = method_of(model_args)
    family = family_of(load_config(model_args.model_name_or_path, "--model_name_or_path", model_args.model_revision,
                                   training_args.trust_remote_code))
    default_lora_targets(model_args, family)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    adapt_training_arguments(training_args, script_args, family)
    is_main = training_args.process_index == 0
    if is_main:
        save_recipe(output_dir, script_args, training_args, model_args)

    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    loading = time.perf_counter()
    model = load_training_model(model_args, script_args, training_args)
    load_seconds = time.perf_counter() - loading
    quantization = quantization_summary(model)  # of the loaded weights, before PEFT wraps them
    prompts = load_prompts(script_args.system_prompt_file, script_args.user_prompt_file, script_args.short_prompt)
    collator = make_collator(processor, prompts, model, family, script_args, training_args, model_args, output_dir)
    train_dataset, eval_dataset, answer = prepare_datasets(script_args, training_args, collator, output_dir, is_main)

    trainer = VideoSFTTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
        callbacks=[frozen_vision_callback()],
    )
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    eval_loss = final_eval_loss(trainer, eval_dataset)

    trainer.save_state()  # trainer_state.json: the whole log history
    # the exported model carries its frames (captioning it uses them by default) and its prompts
    export_model(trainer, processor, model_args, output_dir, method, collator.frames.sampling, prompts,
                 merged=script_args.export_merged)
    if is_main:
        for folder in (output_dir / "adapter", output_dir / "merged"):
            if folder.is_dir():  # the exported model carries its answer layout: constrained captioning uses it
                answer.save(folder)
        plot_loss(trainer.state.log_history, output_dir / "loss_curve.png", title=f"{method} fine-tuning")
        trainer.save_metrics("train", run_summary(
            trainer, train_output, method, script_args, training_args, model_args, train_dataset=train_dataset,
            load_seconds=load_seconds, peak_gib=peak_gib, prompts=prompts, quantization=quantization,
            sampling=collator.frames.sampling,
            padded_vision_windows=family.vision_tower(model).config._attn_implementation == VISION_ATTENTION,
            eval_loss=eval_loss,
        ))
    trainer.accelerator.wait_for_everyone()
    return output_dir


# ----------------------------------------------------------------------------- entry points


# TRL's SFTConfig imports torch and the Trainer (seconds): a command line is checked against a
# snapshot of its options first (tests/test_cli_errors.py keeps it current).
SFT_CONFIG = Deferred("trl:SFTConfig", Path(__file__).with_name("sft_options.json"), ("trl", "transformers"))


def check_arguments(values: dict[str, Any]) -> None:
    """What can be refused before torch loads: no dataset or model, quantized weights without an adapter to train,
    or a resume with nothing to resume."""
    from avlabel.core.errors import UsageError
    from avlabel.core.parser import check_model, check_source

    for option, what in (("dataset_name", "the folder `avlabel build` wrote, or a Hub dataset id"),
                         ("model_name_or_path", "a model folder or a Hub model id")):
        if not values.get(option):
            raise UsageError(f"--{option} is required: {what} (on the command line or in the --config recipe)")
    check_source(values["dataset_name"], "--dataset_name", "dataset")
    check_model(values["model_name_or_path"], "--model_name_or_path")
    quantized = [f"--{name}" for name in ("load_in_4bit", "load_in_8bit") if values.get(name)]
    if quantized and not values.get("use_peft"):  # method_of says so too, but only once torch and the model load
        raise UsageError(f"{quantized[0]}: quantized weights can't be trained directly; add --use_peft true (QLoRA)")
    resume, output_dir = values.get("resume_from_checkpoint"), values.get("output_dir")
    if resume in (None, "", False) or str(resume).lower() == "false":
        if output_dir:
            check_fresh_run_folder(Path(output_dir))
        return
    if str(resume).lower() in ("true", "last"):
        # transformers' get_last_checkpoint looks for these; importing it would load torch
        if output_dir and not any(path.is_dir() and path.name.split("-")[1].isdigit() for path in Path(output_dir).glob("checkpoint-*")):
            raise UsageError(f"--resume_from_checkpoint {resume}: {output_dir} holds no checkpoint-N folder to resume; "
                             "leave the flag out to start the run")
    elif not Path(resume).is_dir():
        raise UsageError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")


# what a run leaves that a new run in the same folder would silently replace (with save_total_limit, delete)
FINISHED_OR_SAVED = ("checkpoint-*", "merged", "adapter", "train_results.json")


def check_fresh_run_folder(output_dir: Path) -> None:
    """A run that starts (no --resume_from_checkpoint) writes into a folder that is new, empty, or holds only a start
    that saved nothing; the Trainer would otherwise overwrite an earlier run's model and prune its checkpoints,
    or write over a folder training never made (a dataset's card, say)."""
    from avlabel.core.errors import UsageError

    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not (output_dir / "recipe.yaml").is_file():  # the first file a run writes
        raise UsageError(f"--output_dir {output_dir}: the folder holds files training did not write; "
                         "give a new or empty folder for the run")
    saved = sorted({path.name for pattern in FINISHED_OR_SAVED for path in output_dir.glob(pattern)})
    if saved:
        raise UsageError(f"--output_dir {output_dir}: it holds an earlier run ({', '.join(saved[:3])}); continue it with "
                         "--resume_from_checkpoint last, or give a new --output_dir (remove the folder to start it over)")


def make_parser(subparsers=None):
    from trl import ModelConfig

    from avlabel.core.parser import ArgumentParser

    dataclass_types = [TrainScriptArguments, SFT_CONFIG, ModelConfig]
    if subparsers is not None:
        return subparsers.add_parser("train", dataclass_types=dataclass_types, check=check_arguments)
    return ArgumentParser(dataclass_types=dataclass_types, check=check_arguments, prog="avlabel train")


def train(recipe_path: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Run the recipe at `recipe_path` with `overrides` (argument name -> value); returns the output folder."""
    import yaml

    config = yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8")) or {}
    for name, value in config.pop("env", {}).items():
        os.environ[name] = str(value)
    config.update(overrides or {})
    return main(*make_parser().parse_dict(config))


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("train")
