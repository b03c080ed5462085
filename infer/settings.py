"""Generation settings: what changes the text a model writes for a clip.

Kept apart from the engine so the command line can read them without importing torch.
Every caption record stores them, and a rerun only skips clips captioned with the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from data_builder.sampling import SamplingConfig


@dataclass
class GenerationSettings:
    """Everything that changes what the model writes for a clip (recorded with every caption)."""

    temperature: float = field(default=0.1, metadata={"help": "Sampling temperature; 0 decodes greedily."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling: keep the most likely tokens up to this mass."})
    repetition_penalty: float = field(default=1.05, metadata={"help": "Penalty on tokens already in the prompt or output."})
    max_new_tokens: int = field(default=4096, metadata={"help": "Most tokens generated per clip."})
    min_new_tokens: int = field(default=0, metadata={"help": "End-of-text is forbidden before this many tokens (benchmarks)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampler: the same inputs, batches and seed give the same text."})
    fps: float = field(default=2.0, metadata={"help": "Frames sampled per second of video."})
    max_pixels: int = field(default=16 * 9 * 28 * 28, metadata={"help": "Pixel budget per frame (252x448 for 16:9)."})
    min_pixels: int = field(default=128 * 28 * 28, metadata={"help": "Smallest frame size in pixels."})
    max_frames: int = field(default=768, metadata={"help": "Most frames taken from one clip."})
    constrained: bool = field(
        default=False, metadata={"help": "Constrain decoding to the label JSON schema (xgrammar): every output parses."}
    )
    max_text_chars: int = field(
        default=2000,
        metadata={"help": "With --constrained: longest free-text field, so a looping model still closes its JSON."},
    )

    def sampling(self, model_config) -> SamplingConfig:
        return SamplingConfig.for_model(
            model_config, fps=self.fps, max_pixels=self.max_pixels, min_pixels=self.min_pixels, max_frames=self.max_frames
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
