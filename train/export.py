"""What a run leaves behind for inference: the adapter (LoRA, QLoRA) and a merged bf16 model.

`merged/` is a plain checkpoint plus the processor, so `from_pretrained` (and the `infer`
package) load it like the base model. An adapter trained on 4-bit weights is merged into
the base model's bf16 weights, as QLoRA intends: the 4-bit copy was only a training aid.
"""

from __future__ import annotations

from pathlib import Path


def merge_adapter(base_model: str, adapter_dir: str | Path, out_dir: str | Path, processor=None, revision: str = "main") -> Path:
    """Load `base_model` in bf16 on the CPU, fold the adapter into it and save it to `out_dir`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(base_model, revision=revision, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    if processor is not None:
        processor.save_pretrained(out_dir)
    return Path(out_dir)


def export_model(trainer, processor, model_args, output_dir: Path, method: str, merged: bool = True) -> None:
    """Write `adapter/` (PEFT runs) and `merged/`. Every process calls this: FSDP gathers the weights."""
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
    if peft:
        adapter_dir = output_dir / "adapter"
        if is_main:
            model.save_pretrained(adapter_dir, state_dict=state_dict)  # PEFT keeps only the adapter's weights
            processor.save_pretrained(adapter_dir)
            if merged:
                merge_adapter(model_args.model_name_or_path, adapter_dir, output_dir / "merged", processor, model_args.model_revision)
    elif is_main:
        state_dict = {name: tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()}
        model.save_pretrained(output_dir / "merged", state_dict=state_dict)
        processor.save_pretrained(output_dir / "merged")
        # save_pretrained records the dtype of the parameters in memory (fp32 master weights)
        config = type(model.config).from_pretrained(output_dir / "merged")
        for part in (config, *(getattr(config, name) for name in config.sub_configs)):
            part.dtype = torch.bfloat16
        config.save_pretrained(output_dir / "merged")
    trainer.accelerator.wait_for_everyone()
