"""The tiny local test models load and run like the real Qwen-VL checkpoints."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForImageTextToText, AutoProcessor

from avlabel.core.prompts import load_prompts
from avlabel.core.sampling import SamplingConfig, sample_frames
from avlabel.core.schema import FIELDS, label_to_json
from avlabel.demo.tiny_model import TEST_MODEL_NOTE, build_tiny_model, build_tokenizer
from avlabel.families import family_of


def _write_clip(path, width=256, height=144, frames=25, fps=10):
    """A small H.264 clip whose frames differ, so sampling has something to pick."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), (i * 9) % 255, dtype=np.uint8)
            image[:, : width // 2, 0] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _label() -> dict:
    label = {f.name: (f.examples or f.choices)[0] if (f.examples or f.choices) else "text" for f in FIELDS}
    label["driving_difficulty"] = 2
    return label


def _messages(answer: str | None, video=None) -> list[dict]:
    prompts = load_prompts(short=True)
    video_part = {"type": "video", "video": video} if video is not None else {"type": "video"}
    messages = [
        {"role": "system", "content": prompts.system},
        {"role": "user", "content": [video_part, {"type": "text", "text": prompts.user}]},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tiny_model_of):
    model_dir = tiny_model_of(request.param)
    return AutoProcessor.from_pretrained(model_dir), AutoModelForImageTextToText.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, loaded):
    """A clip sampled the way training and inference sample it, at a size the tiny model's processor keeps."""
    model = loaded[1]
    config = SamplingConfig.for_model(model.config, min_pixels=56 * 56, max_pixels=112 * 112)
    return sample_frames(_write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4"), config)


def test_folder_says_it_is_a_randomly_initialised_test_model(tiny_model_dir):
    assert "randomly initialised test model" in (tiny_model_dir / "README.md").read_text()
    assert json.loads((tiny_model_dir / "config.json").read_text())["test_model_note"] == TEST_MODEL_NOTE


def test_loads_through_auto_classes_with_qwen_tokens(loaded):
    processor, model = loaded
    family = family_of(model)
    assert type(model) is family.model_class
    assert type(processor).__name__ == family.processor_class_names[0]
    tokenizer = processor.tokenizer
    for token, config_key in [
        ("<|video_pad|>", "video_token_id"),
        ("<|image_pad|>", "image_token_id"),
        ("<|vision_start|>", "vision_start_token_id"),
        ("<|vision_end|>", "vision_end_token_id"),
    ]:
        assert tokenizer.convert_tokens_to_ids(token) == getattr(model.config, config_key)
        assert tokenizer.encode(token, add_special_tokens=False) == [getattr(model.config, config_key)]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end
    assert im_end in model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert len(tokenizer) <= model.config.text_config.vocab_size


def test_labels_tokenize_compactly(loaded):
    """The small tokenizer was trained on the prompts and labels: a label costs few tokens."""
    tokenizer = loaded[0].tokenizer
    text = label_to_json(_label())
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 3


def test_processor_turns_sampled_clip_into_model_inputs(loaded, clip):
    processor, model = loaded
    t, h, w = clip.frames.shape[:3]
    factor = family_of(model).patch_factor(model.config)  # 28 for Qwen2.5-VL, 32 for Qwen3-VL
    assert h % factor == 0 and w % factor == 0 and h * w <= 112 * 112 and t % 2 == 0
    text = processor.apply_chat_template(_messages(None), tokenize=False, add_generation_prompt=True)
    inputs = processor(
        text=[text],
        videos=[clip.frames],
        video_metadata=[clip.processor_metadata()],
        videos_kwargs={"do_sample_frames": False, "do_resize": False},
        return_tensors="pt",
    )
    patch = model.config.vision_config.patch_size
    assert inputs["video_grid_thw"].tolist() == [[t // 2, h // patch, w // patch]]
    video_tokens = (inputs["input_ids"] == model.config.video_token_id).sum().item()
    assert video_tokens == (t // 2) * (h // patch) * (w // patch) // 4
    # mm_token_type_ids marks the video tokens (2) so the model builds 3-D rope positions
    assert (inputs["mm_token_type_ids"] == 2).sum().item() == video_tokens

    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_assistant_mask_covers_exactly_the_answer_and_im_end(loaded, clip):
    processor = loaded[0]
    answer = label_to_json(_label())
    out = processor.apply_chat_template(
        _messages(answer, video=clip.frames),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        processor_kwargs={
            "video_metadata": [clip.processor_metadata()],
            "videos_kwargs": {"do_sample_frames": False, "do_resize": False},
        },
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    masked = [token for token, keep in zip(ids, mask) if keep]
    assert processor.tokenizer.decode(masked) == answer + "<|im_end|>"
    # the masked tokens are one contiguous run at the end, before the closing newline
    first = mask.index(1)
    assert all(mask[first : first + len(masked)]) and not any(mask[:first])


def test_build_is_deterministic_per_seed(tmp_path):
    first = build_tiny_model(tmp_path / "a", seed=3)
    second = build_tiny_model(tmp_path / "b", seed=3)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_qwen3_vl_keeps_its_later_special_tokens():
    """Qwen3 keeps its later special tokens (<think> etc.); Qwen2.5-VL has none of them."""
    qwen3 = build_tokenizer("qwen3_vl")
    assert qwen3.encode("<think>", add_special_tokens=False) == [qwen3.convert_tokens_to_ids("<think>")]
    qwen2_5 = build_tokenizer("qwen2_5_vl")
    assert len(qwen2_5.encode("<think>", add_special_tokens=False)) > 1


def test_real_qwen_vocabulary_has_qwen2_5_vl_ids():
    tokenizer = build_tokenizer("qwen2_5_vl", "qwen")
    assert len(tokenizer) == 151665  # Qwen2.5's vocabulary, without Qwen3's four later tokens
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in expected} == expected
    assert len(tokenizer.encode("<think>", add_special_tokens=False)) > 1  # ordinary text in Qwen2.5-VL
    text = label_to_json(_label())
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
