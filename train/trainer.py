"""`SFTTrainer` with three repairs to resuming a run.

1. Qwen-VL weights from a one-GPU or DDP full fine-tune. transformers writes checkpoints in
the Hub's key layout (`save_pretrained` undoes the key renamings that `from_pretrained`
applies, e.g. Qwen2.5-VL's `model.layers.*` -> `model.language_model.layers.*`), but
`Trainer` reads a checkpoint back with `load_state_dict` under the in-memory names, which
then match no key at all: the run resumes with the weights it started from, the optimizer
state of the checkpoint, and only a warning. Here the saved names are mapped back the way
they were written.

2. Sharded (FSDP) optimizer state. accelerate reads the shards into the optimizer's own
state tensors (torch.distributed.checkpoint loads in place), then hands them to
`optimizer.load_state_dict`, which copies each one: two AdamW states on the GPU at once.
For a full fine-tune of the 7B model on 2 x 80 GB GPUs that is more than there is
(BENCHMARKS.md). The in-place read alone restores the state, so here it is all that runs.

3. Logs. At a resume Trainer restarts its sum of the train loss (the `train_loss` it reports
then covers only the resumed steps) and drops the loss of the steps since the last log, and
TRL restarts `num_tokens` at zero. `RunTotals` saves them with each checkpoint and a resumed
run starts from them, so its logs and train_results.json read as an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import is_peft_model
from accelerate.utils.constants import OPTIMIZER_NAME as SHARDED_OPTIMIZER_PREFIX
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
from transformers import TrainerCallback
from transformers.core_model_loading import revert_weight_conversion
from transformers.trainer import SCHEDULER_NAME
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from trl import SFTTrainer


def load_sharded_optimizer_state(model, optimizer, folder: str | Path) -> None:
    """Read a torch.distributed.checkpoint optimizer folder (accelerate's layout) into `optimizer`'s state, in place."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # creates the state tensors if none exist yet
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)))


class RunTotals(TrainerCallback):
    """What a resumed run needs to log as the uninterrupted run would, saved with each checkpoint.

    At a checkpoint: the train loss summed over the steps logged so far, the loss and TRL's
    metrics of the steps since the last log (a checkpoint need not fall on a logging step), that
    step, and TRL's token count. They go into the checkpoint's trainer_state.json (under
    "stateful_callbacks", which a resume reads back) and a resumed run starts from them. They
    live in private attributes of Trainer (_total_loss_scalar, _tr_loss, _globalstep_last_logged)
    and TRL's SFTTrainer (_total_train_tokens, _metrics); tests/test_train.py fails if they move.
    """

    KEY = "avlabel_run_totals"

    def __init__(self, trainer: VideoSFTTrainer):
        self.trainer = trainer
        self.loss_before: float | None = None  # a resumed run's: the loss summed over the steps logged before it
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, saved = self.trainer, state.stateful_callbacks.get(self.KEY)
        self.start_step, self.loss_before = state.global_step, None
        if not saved:
            return
        self.loss_before = saved["loss_logged"]
        trainer._tr_loss += saved["loss_unlogged"]
        trainer._globalstep_last_logged = saved["last_logged_step"]
        trainer._total_train_tokens = saved["num_tokens"]
        trainer._metrics["train"].update(saved["metrics_unlogged"])

    def _save(self, state, control) -> None:
        """Called when DefaultFlowCallback (which runs first) has just decided to log and save or not;
        both happen after this, the log first, so the totals are those after the log."""
        if not control.should_save:
            return
        trainer = self.trainer
        logged = (self.loss_before or 0.0) + trainer._total_loss_scalar
        # every process calls this; the log averages the loss over processes, so the saved part does too
        unlogged = trainer.accelerator.reduce(trainer._tr_loss.detach().clone(), reduction="mean").item()
        metrics = {name: list(values) for name, values in trainer._metrics["train"].items()}
        last_logged = trainer._globalstep_last_logged
        if control.should_log and state.global_step > last_logged:  # the log about to be written takes them
            logged, unlogged, metrics, last_logged = logged + unlogged, 0.0, {}, state.global_step
        state.stateful_callbacks[self.KEY] = {
            "loss_logged": logged, "loss_unlogged": unlogged, "last_logged_step": last_logged,
            "num_tokens": trainer._total_train_tokens, "metrics_unlogged": metrics,
        }

    def on_step_end(self, args, state, control, **kwargs):
        self._save(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._save(state, control)


class VideoSFTTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_totals = RunTotals(self)
        self.add_callback(self.run_totals)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs and self.run_totals.loss_before is not None:
            # the end of a resumed run: Trainer's mean covers its own steps; make it every step's
            steps = self.state.global_step - self.run_totals.start_step
            logs["train_loss"] = (self.run_totals.loss_before + logs["train_loss"] * steps) / max(self.state.global_step, 1)
        super().log(logs, start_time)

    def get_eval_dataloader(self, eval_dataset=None):
        # The Trainer has one collator; evaluation gets a copy whose replacement for a batch left empty (every
        # clip failed to decode) is drawn from the evaluation split, so no training clip enters the eval loss.
        rows = (self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str)
                else self.eval_dataset if eval_dataset is None else eval_dataset)
        collator = self.data_collator
        self.data_collator = dataclasses.replace(collator, spares=rows)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator

    def _load_optimizer_and_scheduler(self, checkpoint):
        sharded = Path(checkpoint) / f"{SHARDED_OPTIMIZER_PREFIX}_0" if checkpoint else None
        if sharded is None or not (self.is_fsdp_enabled and sharded.is_dir()):
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_sharded_optimizer_state(self.model, self.optimizer, sharded)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

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
