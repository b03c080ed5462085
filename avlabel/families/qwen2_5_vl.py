"""Qwen2.5-VL: the architecture of Cosmos Reason 1 (nvidia/Cosmos-Reason1-7B).

A windowed-attention vision tower (patches of 14 pixels, merged 2x2: frame sides are
multiples of 28) whose `merger` projects into the language model. The processor gives each
video its seconds per temporal grid (`second_per_grid_ts`), which the 3-D RoPE positions use.
Vision attention is block-diagonal: windows of 112x112 pixels (8x8 patches; smaller at a
frame's right and bottom edges) in most layers, whole temporal patches (a pair of frames) in the
`fullatt_block_indexes` layers. Uneven windows: `padded_windows_attention` masks the padding.
"""

from .base import Family

QWEN2_5_VL = Family(
    model_type="qwen2_5_vl",
    title="Qwen2.5-VL (Cosmos Reason 1)",
    model_class_name="Qwen2_5_VLForConditionalGeneration",
    config_class_name="Qwen2_5_VLConfig",
    processor_class_names=("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
    patch_size=14,
    video_keys=("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
    rope_keys=("input_ids", "mm_token_type_ids", "video_grid_thw", "second_per_grid_ts", "attention_mask"),
    projector_prefixes=("merger.",),
    per_frame_video_size=True,
)
