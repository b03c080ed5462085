"""Qwen3-VL: the architecture of Cosmos Reason 2 (nvidia/Cosmos-Reason2-2B, -8B).

Patches of 16 pixels merged 2x2, so frame sides are multiples of 32; the default budget keeps
the Reason 1 recipe's 16x9 tokens a frame (288x512 for 16:9). Besides `merger`, the
`deepstack_merger_list` layers project intermediate vision features into the language
model, so they count as projector. Time reaches the model as text (a "<t seconds>" before
each temporal patch), not as `second_per_grid_ts`. The vision tower has no patch embedding
that transformers hooks for input gradients. Its attention has no windows: every layer
attends within one temporal patch (a pair of frames), and transformers' SDPA path makes one
call per pair; `padded_windows_attention` makes one call of them all (equal sizes: no mask).
"""

from .base import Family

QWEN3_VL = Family(
    model_type="qwen3_vl",
    title="Qwen3-VL (Cosmos Reason 2)",
    model_class_name="Qwen3VLForConditionalGeneration",
    config_class_name="Qwen3VLConfig",
    processor_class_names=("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor"),
    patch_size=16,
    video_keys=("pixel_values_videos", "video_grid_thw"),
    rope_keys=("input_ids", "mm_token_type_ids", "video_grid_thw", "attention_mask"),
    projector_prefixes=("merger.", "deepstack_merger_list."),
    per_frame_video_size=False,
)
