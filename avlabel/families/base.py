"""The family adapter: everything the rest of the code may know about one model architecture.

Training, captioning, export and the benchmarks ask a `Family` where the vision tower and the
language model are, which layers LoRA adapts, how to get a batch's multimodal RoPE positions,
how to hook the engine's attention functions in, which processor outputs are per token and
which per video, and at what patch factor and pixel budget frames are sampled. Nothing else
names a Qwen module path or a Qwen processor key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# LoRA on the language model's attention and MLP projections, not the vision tower's.
LANGUAGE_LINEAR_LAYERS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Names the engine's attention functions are registered under (transformers' AttentionInterface).
# A vision tower hands its attention-window bounds (`cu_seq_lens_q`, `max_length_q`) only to a
# function whose name contains "flash" (transformers.utils.generic.is_flash_attention_requested).
TEXT_ATTENTION = "avlabel_sdpa"
VISION_ATTENTION = "avlabel_flash_padded_windows"


def padded_windows_attention(module, query, key, value, attention_mask, scaling=None, cu_seq_lens_q=None,
                             max_length_q=None, **kwargs):
    """Every attention window of a vision layer in one SDPA call (captioning and training).

    Without flash-attn, `transformers` runs a Qwen-VL vision tower one SDPA call per window
    (Qwen2.5-VL: ~120 windows a clip in each windowed layer; Qwen3-VL: one per pair of frames), tens
    of thousands of small calls per prefill, forward and backward. Registered under a name
    containing "flash", this function gets the window boundaries (`cu_seq_lens_q`) instead,
    pads every window to the longest, masks the padding keys and attends once. Each window
    still attends only to itself, so the result and its gradients are those of the
    per-window path (tests/test_train_speed.py checks both).
    """
    import torch  # here: importing the families must not load torch (the command line is checked first)

    bounds = cu_seq_lens_q.long()
    lengths = bounds[1:] - bounds[:-1]
    windows, longest = lengths.numel(), int(max_length_q)
    _, heads, total, dim = query.shape
    window_of = torch.repeat_interleave(torch.arange(windows, device=query.device), lengths)
    offset = torch.arange(total, device=query.device) - bounds[:-1][window_of]

    def padded(states):  # (1, heads, total, dim) -> (windows, heads, longest, dim)
        out = states.new_zeros(windows, longest, heads, dim)
        out[window_of, offset] = states[0].transpose(0, 1)
        return out.transpose(1, 2)

    mask = None
    if bool((lengths != longest).any()):
        mask = torch.zeros(windows, longest, dtype=torch.bool, device=query.device)
        mask[window_of, offset] = True
        mask = mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        padded(query), padded(key), padded(value), attn_mask=mask, scale=scaling
    )
    return out.transpose(1, 2)[window_of, offset].unsqueeze(0), None


@dataclass(frozen=True)
class Family:
    model_type: str  # `config.model_type` of its checkpoints: how a model is recognised
    title: str  # for people: which Cosmos Reason generation it is
    model_class_name: str  # the transformers class its checkpoints load as
    config_class_name: str
    processor_class_names: tuple[str, str, str]  # processor, image processor, video processor (transformers)
    patch_size: int  # the vision tower's patch side in pixels; merged 2x2 into one token (the patch factor is twice it)
    video_keys: tuple[str, ...]  # per-video processor outputs: concatenated over a batch, never padded
    rope_keys: tuple[str, ...]  # the batch entries `get_rope_index` reads
    projector_prefixes: tuple[str, ...]  # vision-tower layers that feed the language model (trained with it)
    # whether its video processor's `size` bounds each frame's pixels, as a SamplingConfig's budget does
    # (else it bounds a whole clip's, frames x height x width, and no per-frame budget can be set there)
    per_frame_video_size: bool
    # per-token processor outputs, padded to a batch's longest row
    sequence_keys: tuple[str, ...] = ("input_ids", "attention_mask", "mm_token_type_ids")
    lora_target_modules: str = LANGUAGE_LINEAR_LAYERS
    # Default pixel budget, in merged tokens a frame: at most 16x9 (252x448 for a 16:9 clip at factor
    # 28, the Cosmos recipe's), at least Qwen's video minimum of 128.
    max_tokens_per_frame: int = 16 * 9
    min_tokens_per_frame: int = 128
    merge_size: int = 2

    # -- classes -------------------------------------------------------------------------

    @property
    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    @property
    def config_class(self):
        import transformers

        return getattr(transformers, self.config_class_name)

    def make_processor(self, tokenizer, chat_template: str | None = None, size: dict | None = None, **video_kwargs):
        """This family's processor around `tokenizer` (tiny test models and benchmarks build theirs here)."""
        import transformers

        processor, image, video = (getattr(transformers, name) for name in self.processor_class_names)
        common = {"patch_size": self.patch_size, "merge_size": self.merge_size, "temporal_patch_size": 2,
                  **({"size": size} if size else {})}
        return processor(image_processor=image(**common), tokenizer=tokenizer,
                         video_processor=video(**common, **video_kwargs), chat_template=chat_template)

    # -- frames --------------------------------------------------------------------------

    def patch_factor(self, config=None) -> int:
        """Frame sides are multiples of this: patch size x spatial merge (28 for Qwen2.5-VL, 32 for Qwen3-VL),
        from a model's config, or without one the family's own."""
        if config is None:
            return self.patch_size * self.merge_size
        vision = config.vision_config
        return vision.patch_size * vision.spatial_merge_size

    def sampling_defaults(self, config=None) -> dict[str, int]:
        """The patch factor and pixel budget frames are sampled at when nothing else says (`patch_factor`)."""
        factor = self.patch_factor(config)
        return {"factor": factor, "min_pixels": self.min_tokens_per_frame * factor**2,
                "max_pixels": self.max_tokens_per_frame * factor**2}

    def configure_video_processor(self, video_processor, sampling) -> None:
        """Make a video processor sample frames itself as `sampling` does: its fps and frame limits, and its
        pixel budget where `size` is a per-frame one (`per_frame_video_size`)."""
        video_processor.do_sample_frames = True
        video_processor.fps, video_processor.min_frames = sampling.fps, sampling.min_frames
        video_processor.max_frames = sampling.max_frames
        if self.per_frame_video_size:
            video_processor.size = {"shortest_edge": sampling.min_pixels, "longest_edge": sampling.max_pixels}

    def video_placeholder(self, processor, grid_thw: tuple[int, int, int], sample_fps: float) -> str:
        """The text the processor writes in a video's place, for a video of `grid_thw` patches sampled at `sample_fps`.

        Its video tokens, and with Qwen3-VL a "<t seconds>" timestamp before each temporal
        patch; the count of its tokens is what a clip adds to a prompt.
        """
        import torch
        from transformers.video_utils import VideoMetadata

        frames = grid_thw[0] * processor.video_processor.temporal_patch_size
        metadata = VideoMetadata(total_num_frames=frames, fps=sample_fps, frames_indices=list(range(frames)))
        return processor.replace_video_token({"video_grid_thw": torch.tensor([grid_thw]), "video_metadata": [metadata]},
                                             video_idx=0)

    # -- where things are ----------------------------------------------------------------

    def inner_model(self, model):
        """The module holding `visual` and `language_model`, under a PEFT wrapper or not."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.model

    def vision_tower(self, model):
        return self.inner_model(model).visual

    def language_model(self, model):
        return self.inner_model(model).language_model

    def is_projector(self, name: str) -> bool:
        """Whether a parameter of the vision tower (named relative to it) belongs to the projector."""
        return name.startswith(self.projector_prefixes)

    def vision_input_embeddings(self, model):
        """The vision tower's patch embedding, where transformers' `enable_input_require_grads` hooks; None if it has none."""
        try:
            return self.vision_tower(model).get_input_embeddings()
        except NotImplementedError:  # Qwen3-VL's tower: transformers then hooks nothing there
            return None

    # -- what the caption engine needs ---------------------------------------------------

    def rope_positions(self, model, batch: dict[str, Any]):
        """(3, rows, length) multimodal RoPE positions of a left-padded batch, each row without its padding."""
        positions, _ = self.inner_model(model).get_rope_index(**{k: batch[k] for k in self.rope_keys if k in batch})
        return positions

    def set_attention(self, model, text: Callable | None = None, vision: Callable | None = None) -> None:
        """Route the language model's attention through `text` and the vision tower's through `vision`.

        `vision` is called once per layer with the window bounds (`cu_seq_lens_q`, `max_length_q`);
        without it the vision tower keeps SDPA, one call per window. Without `text` the language
        model keeps the implementation it was loaded with (training: SDPA or flash-attn).
        """
        from transformers import AttentionInterface

        implementations = {"vision_config": VISION_ATTENTION if vision is not None else "sdpa"}
        if text is not None:
            AttentionInterface.register(TEXT_ATTENTION, text)
            implementations["text_config"] = TEXT_ATTENTION
        if vision is not None:
            AttentionInterface.register(VISION_ATTENTION, vision)
        model.set_attn_implementation(implementations)

    def pad_vision_windows(self, model) -> bool:
        """Training: the vision tower's attention as one padded SDPA call per layer (`padded_windows_attention`).

        Only where the tower runs SDPA window by window: under flash-attn it already attends to
        every window in one varlen call, and eager attention is left as asked for. Returns
        whether the attention was switched.
        """
        if self.vision_tower(model).config._attn_implementation != "sdpa":
            return False
        self.set_attention(model, vision=padded_windows_attention)
        return True
