"""What a run leaves behind for inference: the adapter (LoRA, QLoRA) and a merged bf16 model.

`merged/` is a plain checkpoint plus the processor, so `from_pretrained` (and the `infer`
package) load it like the base model; the processor samples frames as training did, also in
plain transformers (`save_processor`). An adapter trained on 4-bit weights is merged into
the base model's bf16 weights, as QLoRA intends: the 4-bit copy was only a training aid.

A run exports its last step itself. Any `checkpoint-N` of it, sharded by FSDP or not, is
exported the same way, on the CPU, with

    avlabel export --checkpoint runs/sft/checkpoint-400 [--output_dir runs/sft/merged-400]
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from avlabel.core.prompts import Prompts
from avlabel.core.sampling import SamplingConfig
from avlabel.families import Family, family_of

logger = logging.getLogger(__name__)


def save_processor(processor, folder: str | Path, sampling: SamplingConfig, prompts: Prompts, family: Family) -> None:
    """Save, beside a model, the processor set to the trained frame sampling, the sampling and the prompts.

    The video processor's config gets the trained fps, frame limits and pixel budget (those its
    `family` can take) with `do_sample_frames: true`, where plain transformers reads them:
    `AutoProcessor.from_pretrained` on a clip path (the model card's snippet) then takes the
    trained number of frames at the trained size. Its frame positions are transformers' own and can differ a little from
    `sample_frames`' (README, "Using the model without avlabel"). `sampling_config.json` keeps the
    exact settings for avlabel, `prompts.json` the prompts the model learned to answer.
    """
    processor = copy.deepcopy(processor)  # the run's own processor keeps sampling nothing itself
    family.configure_video_processor(processor.video_processor, sampling)
    processor.save_pretrained(folder)
    sampling.save(folder)
    prompts.save(folder)


def clear_export(folder: Path) -> None:
    """Remove an earlier export from `folder`, saying so when it held a confidence calibration: one fitted on
    the earlier weights would mis-state this model's confidence, so it has to be fitted again."""
    from avlabel.core.calibration import CALIBRATION_FILE

    if (folder / CALIBRATION_FILE).is_file():
        logger.warning(f"{folder / CALIBRATION_FILE} was fitted on the earlier weights and is removed with them; "
                       f"fit it again for this model (avlabel calibrate --model {folder})")
    shutil.rmtree(folder, ignore_errors=True)


def merge_adapter(base_model: str, adapter_dir: str | Path, out_dir: str | Path, revision: str = "main") -> Path:
    """Load `base_model` in bf16 on the CPU, fold the adapter into it and save it to `out_dir`."""
    from avlabel.families import load_model

    merged = load_model(base_model, revision=revision, dtype="bfloat16", adapter=adapter_dir)
    merged.save_pretrained(out_dir)
    return Path(out_dir)


def export_model(trainer, processor, model_args, output_dir: Path, method: str, sampling: SamplingConfig,
                 prompts: Prompts, merged: bool = True) -> None:
    """Write `adapter/` (PEFT runs) and `merged/`, each with the processor, the frame sampling and the prompts
    (`save_processor`). Every process calls this: FSDP gathers the weights."""
    import torch

    is_main = trainer.accelerator.is_main_process
    peft = method in ("lora", "qlora")
    if not (peft or merged):
        return
    # The whole state dict, gathered on the main process however FSDP shards it. `trainer.save_model`
    # writes no weights under SHARDED_STATE_DICT (its checkpoints are per-rank shards), so the
    # adapter is saved from this too.
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    model = trainer.accelerator.unwrap_model(trainer.model)
    family = family_of(model)
    if is_main:  # a resumed run exports again: nothing of the earlier export may pass for this one's
        for folder in (output_dir / "adapter", output_dir / "merged"):
            clear_export(folder)
    if peft:
        adapter_dir = output_dir / "adapter"
        if is_main:
            model.save_pretrained(adapter_dir, state_dict=state_dict)  # PEFT keeps only the adapter's weights
            save_processor(processor, adapter_dir, sampling, prompts, family)
            if merged:
                merge_adapter(model_args.model_name_or_path, adapter_dir, output_dir / "merged", model_args.model_revision)
                save_processor(processor, output_dir / "merged", sampling, prompts, family)
    elif is_main:
        state_dict = {name: tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()}
        model.save_pretrained(output_dir / "merged", state_dict=state_dict)
        save_processor(processor, output_dir / "merged", sampling, prompts, family)
        # save_pretrained records the dtype of the parameters in memory (fp32 master weights)
        config = type(model.config).from_pretrained(output_dir / "merged")
        for part in (config, *(getattr(config, name) for name in config.sub_configs)):
            part.dtype = torch.bfloat16
        config.save_pretrained(output_dir / "merged")
    trainer.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- checkpoint-N -> merged model


@dataclass
class ExportArguments:
    checkpoint: str = field(metadata={"help": "A checkpoint-N folder of a training run (FSDP-sharded or not)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the merged bf16 model goes (default: <checkpoint>/merged)."})

    def __post_init__(self):
        from avlabel.core.errors import UsageError
        from avlabel.core.parser import check_output_dir

        if not Path(self.checkpoint).is_dir():
            raise UsageError(f"--checkpoint {self.checkpoint}: no such folder; give a checkpoint-N folder of a training run")
        if not self.output_dir:  # a given one is checked with every command's
            check_output_dir(str(self.merged_dir()), "the default --output_dir")

    def merged_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.checkpoint) / "merged"


def read_sharded_weights(folder: Path) -> dict:
    """The whole state dict of an FSDP-sharded model folder, under the names the model had in memory."""
    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        merge_fsdp_weights(str(folder), scratch)  # what `accelerate merge-weights` runs
        return load_file(Path(scratch) / "model.safetensors")


def export_checkpoint(args: ExportArguments) -> Path:
    """Merge `args.checkpoint` into a bf16 model with the run's processor, frame sampling, prompts and answer layout."""
    import yaml
    # accelerate's name for an FSDP checkpoint's sharded model (a torch.distributed.checkpoint folder)
    from accelerate.utils.constants import FSDP_MODEL_NAME
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoProcessor
    from trl import get_peft_config

    from avlabel.core.prompts import load_prompts
    from avlabel.families import load_model
    from avlabel.infer.constrained import ANSWER_FILE

    from .sft import make_parser, method_of

    checkpoint = Path(args.checkpoint)
    recipe = checkpoint.parent / "recipe.yaml"
    if not (checkpoint / "trainer_state.json").exists() or not recipe.exists():
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint of a training run (needs trainer_state.json and ../recipe.yaml)")
    config = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    script_args, _, model_args = make_parser().parse_dict(config, allow_extra_keys=True)
    base_id, revision = model_args.model_name_or_path, model_args.model_revision
    sharded = checkpoint / f"{FSDP_MODEL_NAME}_0"
    full = method_of(model_args) == "full"
    if full and not sharded.is_dir():  # a plain full checkpoint is a model folder already
        model = load_model(checkpoint, dtype="bfloat16")
    elif full or sharded.is_dir():
        model = load_model(base_id, revision=revision, dtype="bfloat16")
    else:  # a PEFT checkpoint folder is an adapter of the base model
        model = load_model(base_id, revision=revision, dtype="bfloat16", adapter=checkpoint)
    if full and sharded.is_dir():
        result = model.load_state_dict(read_sharded_weights(sharded), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{sharded}: {len(result.missing_keys)} weights missing, {len(result.unexpected_keys)} unexpected "
                             f"(e.g. {(result.missing_keys + result.unexpected_keys)[:3]})")
    elif not full and sharded.is_dir():  # adapter weights only, as accelerate saves a PEFT model
        model = get_peft_model(model, get_peft_config(model_args))
        weights = read_sharded_weights(sharded)
        result = set_peft_model_state_dict(model, weights)
        if result.unexpected_keys or not weights:
            raise ValueError(f"{sharded}: {len(result.unexpected_keys)} weights match no adapter layer")
        model = model.merge_and_unload()
    out = args.merged_dir()
    model.save_pretrained(out)
    prompts = load_prompts(script_args.system_prompt_file, script_args.user_prompt_file, script_args.short_prompt)
    save_processor(AutoProcessor.from_pretrained(base_id, revision=revision), out,
                   script_args.resolve_sampling(model.config, base_id), prompts, family_of(model))
    answer = checkpoint.parent / ANSWER_FILE  # written by training: the answer layout and text limits
    if answer.exists():
        shutil.copy(answer, out / ANSWER_FILE)
    return out


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    if subparsers is not None:
        return subparsers.add_parser("export", dataclass_types=[ExportArguments])
    return ArgumentParser(dataclass_types=[ExportArguments], prog="avlabel export")


def main(args: ExportArguments) -> Path:
    out = export_checkpoint(args)
    print(f"{args.checkpoint} -> {out}")
    return out


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("export")
