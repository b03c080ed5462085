"""A clip reaches the model the same way in training and in captioning.

The training collator (train/collator.py) and the caption engine (infer/engine.py) both
take frames from `avlabel.core.sampling.sample_frames`; this checks the end result: for
the same clip and settings, the same pixel values, video grid and prompt tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAMILIES

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "sft.yaml"


@pytest.fixture(scope="module")
def first_test_row(synthetic_dataset_dir):
    import datasets

    from avlabel.core.loading import load_clip_dataset

    ds = load_clip_dataset(synthetic_dataset_dir, "test")
    return ds.cast_column("video", datasets.Video(decode=False))[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_training_and_captioning_see_the_same_clip(tiny_model_of, family, first_test_row):
    """Each side resolves its sampling from the model folder as it does in a run, with nothing given."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    from avlabel.core.prompts import load_prompts
    from avlabel.core.sampling import sample_frames
    from avlabel.families import family_of
    from avlabel.infer.engine import ClipPreparer, chat_text
    from avlabel.infer.settings import GenerationSettings
    from avlabel.train.collator import FrameCache, VideoSFTCollator
    from avlabel.train.sft import TrainScriptArguments

    tiny_model_dir = tiny_model_of(family)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    train_sampling = TrainScriptArguments().resolve_sampling(config, str(tiny_model_dir))
    caption_sampling = GenerationSettings().sampling(config, str(tiny_model_dir))
    assert caption_sampling == train_sampling and train_sampling.max_frames == 4  # the tiny model's own
    prompts = load_prompts()

    training = VideoSFTCollator(processor=processor, prompts=prompts, frames=FrameCache(None, train_sampling),
                                family=family_of(config))
    trained_on = training.encode(first_test_row)
    captioned = ClipPreparer(processor, chat_text(processor, prompts))(
        sample_frames(first_test_row["video"]["path"], caption_sampling)
    )

    for key in family_of(config).video_keys:  # pixels, grid and (Qwen2.5-VL) seconds per grid
        assert torch.equal(captioned[key], trained_on[key]), key
    # the caption prompt is exactly the training sample up to where the answer starts
    prompt = captioned["input_ids"][0]
    assert torch.equal(trained_on["input_ids"][0, : len(prompt)], prompt)
    assert (trained_on["labels"][0, : len(prompt)] == -100).all() and (trained_on["labels"][0, len(prompt):] != -100).any()
    assert torch.equal(captioned["mm_token_type_ids"][0], trained_on["mm_token_type_ids"][0, : len(prompt)])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_trained_on_other_frames_is_captioned_with_them(tiny_model_of, family, synthetic_dataset_dir,
                                                                 first_test_row, tmp_path):
    """Train LoRA with 2 frames a clip (not the tiny model's 4); caption the result with no sampling given."""
    import json

    import torch
    from transformers import AutoConfig, AutoProcessor

    from avlabel.core.prompts import load_prompts
    from avlabel.core.sampling import SamplingConfig, sample_frames
    from avlabel.families import family_of
    from avlabel.infer.caption import CaptionArguments
    from avlabel.infer.caption import main as caption
    from avlabel.infer.engine import ClipPreparer, chat_text
    from avlabel.infer.settings import GenerationSettings
    from avlabel.train.collator import FrameCache, VideoSFTCollator
    from avlabel.train.sft import train

    tiny_model_dir = tiny_model_of(family)
    out = train(TINY_RECIPE, {
        "model_name_or_path": str(tiny_model_dir), "dataset_name": str(synthetic_dataset_dir),
        "output_dir": str(tmp_path / "sft"), "max_steps": 1, "max_train_samples": 2, "per_device_train_batch_size": 2,
        "eval_strategy": "no", "save_strategy": "no", "report_to": ["none"], "use_peft": True, "max_frames": 2,
    })
    trained = SamplingConfig(**json.loads((out / "train_results.json").read_text())["hyperparameters"]["sampling"])
    assert trained.max_frames == 2

    config = AutoConfig.from_pretrained(tiny_model_dir)
    defaults = GenerationSettings()
    assert defaults.sampling(config, str(out / "merged")) == trained
    # base model + adapter: the adapter's file wins over the base model's 4 frames
    assert defaults.sampling(config, str(tiny_model_dir), str(out / "adapter")) == trained
    assert defaults.sampling(config, str(tiny_model_dir)).max_frames == 4

    processor = AutoProcessor.from_pretrained(out / "merged")
    prompts = load_prompts(short=True)
    trained_on = VideoSFTCollator(processor=processor, prompts=prompts, frames=FrameCache(None, trained),
                                  family=family_of(config)).encode(first_test_row)
    captioned = ClipPreparer(processor, chat_text(processor, prompts))(
        sample_frames(first_test_row["video"]["path"], defaults.sampling(config, str(out / "merged")))
    )
    assert captioned["video_grid_thw"][0, 0] == 1  # 2 frames: one temporal patch
    assert torch.equal(captioned["video_grid_thw"], trained_on["video_grid_thw"])
    assert torch.equal(captioned["pixel_values_videos"], trained_on["pixel_values_videos"])

    # the caption record stores the resolved frames, and so a rerun that names them explicitly still resumes
    folder = tmp_path / "captions"
    args = {"input": str(synthetic_dataset_dir), "output_dir": str(folder), "model": str(out / "merged"),
            "short_prompt": True, "limit": 1, "num_workers": 0, "batch_size": 1}
    caption(CaptionArguments(**args), GenerationSettings(temperature=0.0, max_new_tokens=2))
    record = json.loads((folder / "captions.jsonl").read_text().splitlines()[0])
    assert {k: record["generation"][k] for k in trained.to_dict()} == trained.to_dict()
    again = caption(CaptionArguments(**args), GenerationSettings(temperature=0.0, max_new_tokens=2, max_frames=2))
    assert again["this_run"]["skipped"] == 1
