"""The video collator: builder rows in, model-ready batches out.

TRL's own vision collator handles images only, so this is the one place where a clip
becomes training input:

* the conversation is the one inference uses (system prompt, user turn with the video
  and the rubric, assistant turn with the label as JSON);
* frames come from `avlabel.core.sampling.sample_frames` only, at the model's patch
  factor, and reach the processor as they are (`do_sample_frames=False`,
  `do_resize=False`, with the sampling rate as metadata);
* labels are -100 everywhere except the assistant's answer, found through the chat
  template's `{% generation %}` markers;
* a sample longer than `max_length` is never cut (the cut could fall in its answer or
  its video tokens): it is reported and left out, or stops the run when `strict`;
* a clip that won't decode (corrupt mid-stream: the builder's probe reads only its packets
  and first frame) is reported and left out the same way; a batch left with no sample
  takes the next usable training row instead, so at a micro-batch of 1 one bad clip
  can't stop a run;
* decoded frames are cached on disk, so later epochs and resumed runs read arrays
  instead of decoding video again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avlabel.core.prompts import Prompts, build_conversation
from avlabel.core.sampling import Clip, SamplingConfig, VideoError, frame_count, resized_size, sample_frames
from avlabel.core.schema import label_to_json, row_to_label
from avlabel.families import Family
from avlabel.infer.constrained import DEFAULT_FORMAT, AnswerFormat

logger = logging.getLogger(__name__)

def format_answer(label: dict[str, Any], answer_format: AnswerFormat = DEFAULT_FORMAT) -> str:
    """The assistant's answer: the label as JSON.

    "fenced" is the Cosmos recipe's target (a ```json block, indented by two); "plain" is
    one line of JSON, about a third fewer tokens.
    """
    if answer_format == "fenced":
        return f"```json\n{label_to_json(label, indent=2)}\n```"
    if answer_format == "plain":
        return label_to_json(label)
    raise ValueError(f"unknown answer_format {answer_format!r} (expected 'fenced' or 'plain')")


def training_chat_template(processor) -> str:
    """The processor's chat template if it marks the assistant turn, else TRL's training variant.

    Qwen2.5-VL's own template (Cosmos Reason 1's) has no `{% generation %}` markers; TRL
    ships a copy of it that has them.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = processor.chat_template
    if has_generation_markers(template):
        return template
    return get_training_chat_template(processor)


REPLACEMENT_TRIES = 16  # unusable rows in a row before a batch left empty stops the run


def _endless(rows):
    """The rows in order, again and again (a Dataset or IterableDataset: neither is held in memory)."""
    while True:
        empty = True
        for row in rows:
            empty = False
            yield row
        if empty:
            return


def over_length_reason(length: int, max_length: int) -> str:
    return f"{length} tokens, over max_length {max_length}; not truncated"


def report_skipped(report_path: str | Path | None, clip_id: str | None, stage: str, reason: str) -> None:
    """Append a left-out sample to the run's report (`skipped.jsonl`), when there is one."""
    if report_path:
        with open(report_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"clip_id": clip_id, "stage": stage, "reason": reason}) + "\n")


# ----------------------------------------------------------------------------- frames


class FrameCache:
    """Sampled frames on disk, keyed by the clip and the sampling settings.

    A key covers the file's path, size and modification time (or its bytes, for clips
    stored inside the dataset) and every sampling setting, so a changed clip or a
    changed setting never reads stale frames. Entries are written to a temporary name
    and renamed, so concurrent dataloader workers and ranks never see half a file.
    """

    def __init__(self, directory: str | Path | None, sampling: SamplingConfig):
        self.directory = Path(directory) if directory else None
        self.sampling = sampling
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _key(self, video: dict) -> str:
        digest = hashlib.sha1(json.dumps(self.sampling.to_dict(), sort_keys=True).encode())
        if video.get("bytes"):
            digest.update(video["bytes"])
        else:
            path = Path(video["path"]).resolve()
            try:
                stat = path.stat()
            except OSError as err:  # deleted since the build, or on a disk that is not mounted: skipped like a bad clip
                raise VideoError(video["path"], f"can't be read ({err.strerror or err})") from None
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    def load(self, video: dict) -> Clip:
        """Frames of a dataset `video` value ({"path", "bytes"}), from the cache or by decoding."""
        if self.directory is None:
            return self._decode(video)
        entry = self.directory / f"{self._key(video)}.npz"
        if entry.exists():
            with np.load(entry) as data:
                return Clip(frames=data["frames"], sample_fps=float(data["sample_fps"]))
        clip = self._decode(video)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, frames=clip.frames, sample_fps=np.float64(clip.sample_fps))
        os.replace(tmp, entry)
        return clip

    def _decode(self, video: dict) -> Clip:
        if video.get("bytes"):
            # Clips embedded in the dataset (a Hub dataset's parquet) have no file to open.
            suffix = Path(video.get("path") or "clip.mp4").suffix or ".mp4"
            with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
                handle.write(video["bytes"])
                handle.flush()
                sampled = sample_frames(handle.name, self.sampling)
        else:
            sampled = sample_frames(video["path"], self.sampling)
        return Clip(frames=sampled.frames, sample_fps=sampled.sample_fps)


def video_prompt_tokens(row: dict, sampling: SamplingConfig, processor, family: Family) -> int:
    """Prompt tokens a clip's video becomes, from the builder's probe columns (no decoding).

    Frame count and size follow `sample_frames`' rules; the tokens are those of the text the
    processor writes in the video's place. Exact for a constant frame rate, an estimate for
    a variable one (the collator checks the real count).
    """
    total = max(1, round(float(row["duration"]) * float(row["fps"])))
    frames = frame_count(total, float(row["fps"]), sampling)
    height, width = resized_size(int(row["height"]), int(row["width"]), sampling)
    video = processor.video_processor
    grid = (frames // video.temporal_patch_size, height // video.patch_size, width // video.patch_size)
    placeholder = family.video_placeholder(processor, grid, sample_fps=frames / total * float(row["fps"]))
    return len(processor.tokenizer(placeholder, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- collator


@dataclass
class VideoSFTCollator:
    """Collates builder rows (`video`, label columns) into a training batch for the model's family.

    Output: `labels` (-100 outside the answer) and the processor's outputs: the family's
    per-token ones (`input_ids`, `attention_mask`, `mm_token_type_ids`: the model needs it
    for its 3-D positions) padded on the right, its per-video ones (`pixel_values_videos`,
    `video_grid_thw`, and for Qwen2.5-VL `second_per_grid_ts`) concatenated. Rows that
    can't be used (over-long, or a clip that won't decode) are reported to `report_path`
    and left out; with `strict` they raise instead. A batch left with none takes the next
    usable row of `spares`, the split it collates (train.trainer gives evaluation a copy
    drawing from the evaluation split): an empty batch would stop the run.
    """

    processor: Any
    prompts: Prompts
    frames: FrameCache
    family: Family
    max_length: int | None = None
    answer_format: AnswerFormat = DEFAULT_FORMAT
    strict: bool = False
    pad_to_multiple_of: int | None = None
    report_path: str | Path | None = None
    chat_template: str = field(default="")
    spares: Any = None  # rows (a Dataset or IterableDataset) to draw a replacement from
    _spare_rows: Any = field(default=None, init=False, repr=False)  # where the replacements have got to

    def __post_init__(self):
        self.chat_template = self.chat_template or training_chat_template(self.processor)
        tokenizer = self.processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn or forkserver (Python 3.14's default on Linux) get a pickled copy,
        # and a generator doesn't pickle: each copy starts its own pass over `spares`
        return {**self.__dict__, "_spare_rows": None}

    def encode(self, row: dict) -> dict:
        """One row as unpadded tensors (batch dimension 1), labels masked to the answer."""
        clip = self.frames.load(row["video"])
        answer = format_answer(row_to_label(row), self.answer_format)
        encoded = self.processor.apply_chat_template(
            [build_conversation(self.prompts, clip.frames, answer)],
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=True,
            processor_kwargs={
                "videos_kwargs": {
                    "do_sample_frames": False,  # frames come from our sampler, as inference gets them
                    "do_resize": False,
                    "video_metadata": [clip.processor_metadata()],
                }
            },
        )
        mask = encoded.pop("assistant_masks")
        labels = encoded["input_ids"].clone()
        labels[mask == 0] = -100
        encoded["labels"] = labels
        return encoded

    def estimated_length(self, row: dict) -> int:
        """Tokens of a row without decoding its video: text tokens plus `video_prompt_tokens`.

        Lets the dataset drop over-long rows (and group by length) before training starts.
        """
        answer = format_answer(row_to_label(row), self.answer_format)
        text = self.processor.apply_chat_template(
            build_conversation(self.prompts, None, answer), chat_template=self.chat_template, tokenize=False
        )
        text_tokens = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        # the one video placeholder token becomes the video's tokens
        return text_tokens - 1 + video_prompt_tokens(row, self.frames.sampling, self.processor, self.family)

    def _skip(self, row: dict, reason: str) -> None:
        where = f"clip {row.get('clip_id', '?')} ({(row.get('video') or {}).get('path')})"
        if self.strict:
            raise ValueError(f"{where}: {reason} (run without --strict to skip such samples)")
        logger.warning("skipping %s: %s", where, reason)
        report_skipped(self.report_path, row.get("clip_id"), "collate", reason)

    def _usable(self, row: dict) -> dict | None:
        """The encoded row, or None when it is reported and left out (raises with `strict`)."""
        try:
            sample = self.encode(row)
        except VideoError as err:
            self._skip(row, f"video can't be decoded: {err.reason}")
            return None
        length = sample["input_ids"].shape[1]
        if self.max_length is not None and length > self.max_length:
            self._skip(row, over_length_reason(length, self.max_length))
            return None
        return sample

    def _replacement(self, batch_size: int) -> dict:
        """The next usable row of `spares`, for a batch whose every row was left out.

        Rows are read in order, starting over at the end, from where the last replacement stopped
        (each dataloader worker keeps its own place); REPLACEMENT_TRIES unusable rows in a row mean
        the dataset itself is broken, and stop the run.
        """
        what = (f"none of the {batch_size} samples of this batch could be used (see the warnings above"
                + (f" and {self.report_path}" if self.report_path else "") + ")")
        if self.spares is None:
            raise ValueError(f"{what}; rebuild the dataset or raise max_length")
        if self._spare_rows is None:
            self._spare_rows = _endless(self.spares)
        tried = 0
        for tried, row in enumerate(itertools.islice(self._spare_rows, REPLACEMENT_TRIES), start=1):
            sample = self._usable(row)
            if sample is not None:
                return sample
        raise ValueError(f"{what}, nor any of the {tried} rows tried in their place: check the clips the report "
                         "names (rebuild the dataset) or raise max_length")

    def __call__(self, rows: list[dict]) -> dict:
        import torch
        from trl.trainer.utils import pad

        encoded = [sample for sample in map(self._usable, rows) if sample is not None]
        if not encoded:
            encoded.append(self._replacement(len(rows)))

        padding = {"input_ids": self.pad_token_id, "labels": -100}
        batch = {
            key: pad([sample[key][0] for sample in encoded], padding_value=padding.get(key, 0), padding_side="right",
                     pad_to_multiple_of=self.pad_to_multiple_of)
            for key in (*self.family.sequence_keys, "labels")
        }
        for key in self.family.video_keys:
            batch[key] = torch.cat([torch.as_tensor(sample[key]) for sample in encoded])
        return batch
