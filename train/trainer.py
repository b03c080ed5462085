"""`SFTTrainer` with one repair: resuming a full fine-tune of a Qwen-VL model.

transformers writes checkpoints in the Hub's key layout (`save_pretrained` undoes the key
renamings that `from_pretrained` applies, e.g. Qwen2.5-VL's `model.layers.*` ->
`model.language_model.layers.*`), but `Trainer` reads a checkpoint back with
`load_state_dict` under the in-memory names, which then match no key at all: the run
resumes with the weights it started from, the optimizer state of the checkpoint, and only
a warning. Here the saved names are mapped back the way they were written.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import is_peft_model
from safetensors.torch import load_file
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from trl import SFTTrainer


class VideoSFTTrainer(SFTTrainer):
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        if (folder / SAFE_WEIGHTS_NAME).exists():
            files = [folder / SAFE_WEIGHTS_NAME]
        elif (folder / SAFE_WEIGHTS_INDEX_NAME).exists():
            index = json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())
            files = [folder / name for name in sorted(set(index["weight_map"].values()))]
        else:
            files = []
        if self.is_fsdp_enabled or is_peft_model(model) or not files:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

        # name on disk -> name in memory, found by writing our own state dict the way save_pretrained does
        # (pure renamings keep the tensors, so their storage identifies them)
        in_memory = model.state_dict()
        by_storage = {tensor.data_ptr(): name for name, tensor in in_memory.items()}
        saved_as = {
            saved: by_storage.get(tensor.data_ptr(), saved)
            for saved, tensor in revert_weight_conversion(model, dict(in_memory)).items()
        }
        state_dict = {}
        for file in files:
            state_dict.update({saved_as.get(name, name): tensor for name, tensor in load_file(file, device="cpu").items()})
        result = model.load_state_dict(state_dict, strict=False)
        if len(result.missing_keys) == len(in_memory):
            raise ValueError(f"{folder}: none of the checkpoint's weights match the model")
        self._issue_warnings_after_load(result)
