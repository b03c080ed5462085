"""Canaries: the private library internals the engine and the trainer rely on, one test each.

pyproject.toml bounds transformers at the newest version the suite passed on. Before raising
that bound, run these: each fails with a plain message naming the internal that changed and
the code that depends on it, where the end-to-end tests would only show a wrong number.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from conftest import FAMILIES

from avlabel.families import family_of

VERSION = f"transformers {transformers.__version__}"


def _changed(what: str, used_by: str) -> str:
    return f"{VERSION}: {what}; {used_by} relies on it (see tests/test_canaries.py)"


@pytest.fixture(scope="module")
def tiny(tiny_model_of):
    from transformers import AutoModelForImageTextToText

    def load(family):
        return AutoModelForImageTextToText.from_pretrained(tiny_model_of(family)).eval()

    return load


def _video_inputs(family, frames: int = 4):
    """Pixel patches and grid of a `frames`-frame video two merged tokens square, as the processor makes them."""
    side = 2 * family.merge_size  # patches a side
    grid = torch.tensor([[frames // 2, side, side]])
    channels = 3 * 2 * family.patch_size**2
    return torch.randn(int(grid.prod()), channels, generator=torch.Generator().manual_seed(0)), grid


def _recording(calls: list, attention):
    """`attention`, keeping each call's mask and keyword arguments in `calls`."""

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append({"attention_mask": attention_mask, **kwargs})
        return attention(module, query, key, value, attention_mask, **kwargs)

    return recording


@pytest.mark.parametrize("family", FAMILIES)
def test_a_flash_named_vision_attention_gets_the_window_bounds(tiny, family):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from avlabel.families.base import padded_windows_attention
    from avlabel.infer.engine import _filled_part_attention

    model = tiny(family)
    adapter = family_of(model)
    calls = []

    def vision(module, query, key, value, attention_mask, **kwargs):
        # without bounds, attend over everything, so that the assertion below says what changed
        attention = padded_windows_attention if "cu_seq_lens_q" in kwargs else sdpa_attention_forward
        return attention(module, query, key, value, attention_mask, **kwargs)

    adapter.set_attention(model, text=_filled_part_attention, vision=_recording(calls, vision))
    pixels, grid = _video_inputs(adapter)
    with torch.no_grad():
        adapter.vision_tower(model)(pixels, grid_thw=grid)
    message = _changed(
        "a vision attention function registered under a name containing 'flash' (AttentionInterface.register, "
        "set_attn_implementation({'vision_config': ...}), utils.generic.is_flash_attention_requested) no longer "
        "receives the window bounds cu_seq_lens_q / max_length_q",
        "avlabel/families/base.py's padded_windows_attention (one SDPA call per vision layer: captioning and training)",
    )
    assert len(calls) == model.config.vision_config.depth, message
    assert all({"cu_seq_lens_q", "max_length_q"} <= call.keys() for call in calls), message


@pytest.mark.parametrize("family", FAMILIES)
def test_a_registered_text_attention_sees_the_callers_4d_mask_and_writes_through_cache_update(tiny, family):
    from avlabel.infer.engine import SlotCache, _filled_part_attention

    model = tiny(family)
    adapter = family_of(model)
    calls = []
    adapter.set_attention(model, text=_recording(calls, _filled_part_attention))
    text = model.config.text_config
    length = 6
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = SlotCache(text.num_hidden_layers, 1, text.num_key_value_heads, head_dim, 8, torch.float32, "cpu")
    cache.prefill_rows = slice(0, 1)
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    ids = torch.arange(1, length + 1)[None]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(length).view(1, 1, -1).expand(3, 1, -1),
              cache=cache, use_cache=True, logits_to_keep=1)
    assert len(calls) == text.num_hidden_layers and all(call["attention_mask"] is mask for call in calls), _changed(
        "a 4-D attention mask passed to forward() no longer reaches the attention function registered for the "
        "language model unchanged (masking_utils, or set_attn_implementation({'text_config': ...}))",
        "infer/engine.py's prefill and decode masks (left padding, the filled part of the KV cache)",
    )
    written = [bool(keys[0, :, :length].abs().sum() > 0) and not keys[0, :, length:].any() for keys in cache.keys]
    assert written == [True] * text.num_hidden_layers, _changed(
        "the model no longer writes each layer's keys and values through `cache.update(key, value, layer_idx)` "
        "of the object passed as forward(cache=...)", "infer/engine.py's SlotCache",
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_get_rope_index_takes_the_adapters_keys(tiny, family):
    model = tiny(family)
    adapter = family_of(model)
    accepted = inspect.signature(adapter.inner_model(model).get_rope_index).parameters
    missing = [key for key in adapter.rope_keys if key not in accepted]
    assert not missing, _changed(
        f"{type(adapter.inner_model(model)).__name__}.get_rope_index no longer takes {missing}",
        f"avlabel/families ({adapter.model_type}.rope_keys) and the caption engine's left-padded positions",
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_input_gradient_hooks_are_found_by_their_function_name(tiny, family):
    from avlabel.train.sft import keep_frozen_vision_out_of_backward

    model = tiny(family)
    adapter = family_of(model)
    model.enable_input_require_grads()
    hooked = [hook.__name__ for module in model.modules() for hook in module._forward_hooks.values()]
    assert hooked and set(hooked) == {"make_inputs_require_grads"}, _changed(
        f"PreTrainedModel.enable_input_require_grads' hooks are now named {sorted(set(hooked))}, "
        "not make_inputs_require_grads", "train/sft.py's keep_frozen_vision_out_of_backward (removes them by name)",
    )
    model.requires_grad_(False)
    embeddings = adapter.vision_input_embeddings(model)
    assert keep_frozen_vision_out_of_backward(model) == (embeddings is not None)
    assert embeddings is None or not embeddings._forward_hooks


def test_trainer_resume_internals_keep_their_signatures():
    from transformers import Trainer

    expected = {
        "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
        "_load_optimizer_and_scheduler": ["self", "checkpoint"],
        "_issue_warnings_after_load": ["self", "load_result"],
    }
    for name, parameters in expected.items():
        method = getattr(Trainer, name, None)
        assert method is not None and list(inspect.signature(method).parameters) == parameters, _changed(
            f"Trainer.{name} is now {inspect.signature(method) if method else 'gone'}", "train/trainer.py's VideoSFTTrainer",
        )
    source = inspect.getsource(Trainer)
    for call in ("self._load_from_checkpoint(", "self._load_optimizer_and_scheduler("):
        assert call in source, _changed(f"Trainer no longer calls {call}...) when resuming", "train/trainer.py")


def test_weight_renaming_can_be_reverted():
    from transformers.core_model_loading import revert_weight_conversion

    assert list(inspect.signature(revert_weight_conversion).parameters) == ["model", "state_dict"], _changed(
        "transformers.core_model_loading.revert_weight_conversion no longer takes (model, state_dict)",
        "train/trainer.py (resuming a full fine-tune's checkpoint under its in-memory names)",
    )


def test_checkpoint_file_names():
    from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME
    from transformers.trainer import SCHEDULER_NAME

    assert (FSDP_MODEL_NAME, OPTIMIZER_NAME, SCHEDULER_NAME) == ("pytorch_model_fsdp", "optimizer", "scheduler.pt"), (
        f"accelerate/transformers checkpoint names changed to {(FSDP_MODEL_NAME, OPTIMIZER_NAME, SCHEDULER_NAME)}; "
        "train/trainer.py and train/export.py find sharded checkpoints by them"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_writes_the_video_placeholder_through_replace_video_token(tiny_model_of, family):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_of(family))
    parameters = list(inspect.signature(processor.replace_video_token).parameters)
    assert parameters[:2] == ["video_inputs", "video_idx"], _changed(
        f"{type(processor).__name__}.replace_video_token is now {inspect.signature(processor.replace_video_token)}",
        "avlabel/families Family.video_placeholder (a clip's prompt length before decoding it, train/collator.py)",
    )


def test_trl_training_chat_template_helpers():
    from trl import chat_template_utils

    missing = [name for name in ("get_training_chat_template", "has_generation_markers")
               if not callable(getattr(chat_template_utils, name, None))]
    assert not missing, (f"trl: trl.chat_template_utils no longer has {missing}; train/collator.py's "
                         "training_chat_template (the assistant-only loss mask) relies on them")


def test_bitsandbytes_cpu_repacking_switch():
    import bitsandbytes as bnb

    assert hasattr(bnb.nn.Linear4bit(8, 8), "support_avx512bf16_for_cpu"), (
        f"bitsandbytes {bnb.__version__}: Linear4bit.support_avx512bf16_for_cpu is gone; train/sft.py sets it to keep "
        "4-bit layers trainable on a CPU after an evaluation (check that QLoRA on CPU still trains after eval)"
    )
