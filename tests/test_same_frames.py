"""A clip reaches the model the same way in training and in captioning.

The training collator (train/collator.py) and the caption engine (infer/engine.py) both
take frames from `data_builder.sampling.sample_frames`; this checks the end result: for
the same clip and settings, the same pixel values, video grid and prompt tokens.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def first_test_row(synthetic_dataset_dir):
    import datasets

    from data_builder.loading import load_clip_dataset

    ds = load_clip_dataset(synthetic_dataset_dir, "test")
    return ds.cast_column("video", datasets.Video(decode=False))[0]


def test_training_and_captioning_see_the_same_clip(tiny_model_dir, first_test_row):
    import torch
    from transformers import AutoConfig, AutoProcessor

    from data_builder.prompts import load_prompts
    from data_builder.sampling import sample_frames
    from infer.engine import ClipPreparer, chat_text
    from infer.settings import GenerationSettings
    from train.collator import FrameCache, VideoSFTCollator

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    settings = GenerationSettings(fps=2.0, max_frames=4, min_pixels=3136, max_pixels=12544)
    sampling = settings.sampling(AutoConfig.from_pretrained(tiny_model_dir))
    prompts = load_prompts()

    training = VideoSFTCollator(processor=processor, prompts=prompts, frames=FrameCache(None, sampling))
    trained_on = training.encode(first_test_row)
    captioned = ClipPreparer(processor, chat_text(processor, prompts))(sample_frames(first_test_row["video"]["path"], sampling))

    assert torch.equal(captioned["video_grid_thw"], trained_on["video_grid_thw"])
    assert torch.equal(captioned["pixel_values_videos"], trained_on["pixel_values_videos"])
    assert torch.equal(captioned["second_per_grid_ts"], trained_on["second_per_grid_ts"])
    # the caption prompt is exactly the training sample up to where the answer starts
    prompt = captioned["input_ids"][0]
    assert torch.equal(trained_on["input_ids"][0, : len(prompt)], prompt)
    assert (trained_on["labels"][0, : len(prompt)] == -100).all() and (trained_on["labels"][0, len(prompt):] != -100).any()
    assert torch.equal(captioned["mm_token_type_ids"][0], trained_on["mm_token_type_ids"][0, : len(prompt)])
