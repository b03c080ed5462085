"""Generation settings: what changes the text a model writes for a clip.

Kept apart from the engine so the command line can read them without importing torch.
Every caption record stores them, and a rerun only skips clips captioned with the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from avlabel.core.sampling import SamplingArguments, SamplingConfig

from .constrained import AnswerConfig, AnswerFormat


@dataclass
class GenerationSettings(SamplingArguments):
    """Everything that changes what the model writes for a clip (recorded with every caption).

    The frame sampling flags come from SamplingArguments: unset takes the model's own (sampling_config.json
    in the model or adapter folder, saved by training), else its family's defaults: 2 fps at 16x9 tokens a
    frame (252x448 for a 16:9 clip on Qwen2.5-VL, the recipe's; 288x512 on Qwen3-VL). Records store the
    resolved values.
    """

    temperature: float = field(default=0.1, metadata={"help": "Sampling temperature; 0 decodes greedily."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling: keep the most likely tokens up to this mass."})
    repetition_penalty: float = field(default=1.05, metadata={"help": "Penalty on tokens already in the prompt or output."})
    max_new_tokens: int = field(default=4096, metadata={"help": "Most tokens generated per clip."})
    min_new_tokens: int = field(default=0, metadata={"help": "End-of-text is forbidden before this many tokens (benchmarks)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampler: the same inputs, batches and seed give the same text."})
    constrained: bool = field(
        default=False,
        metadata={"help": "Constrain decoding to the label grammar (xgrammar) and close the label within "
                  "--max_new_tokens: every answer is a valid label, fields cut short are listed in cut_fields."},
    )
    answer_format: AnswerFormat | None = field(
        default=None,
        metadata={"help": "With --constrained: the answer's layout (default: the one the model was trained on, "
                  "from its answer_config.json, else fenced)."},
    )
    max_text_chars: int | None = field(
        default=None,
        metadata={"help": "With --constrained: longest text of every free-text field (default: the model's "
                  "answer_config.json, twice the longest training answer of each field, else 2000)."},
    )

    def __post_init__(self):
        from avlabel.core.parser import check_at_least

        super().__post_init__()
        check_at_least(1, max_new_tokens=self.max_new_tokens)
        check_at_least(0, min_new_tokens=self.min_new_tokens, temperature=self.temperature)

    def sampling(self, model_config, model: str | None = None, adapter: str | None = None) -> SamplingConfig:
        """The frames to take: these settings over the sampling saved with the model (an adapter's wins)."""
        return self.resolve_sampling(model_config, adapter, model)

    def answer(self, model: str | None = None, adapter: str | None = None) -> AnswerConfig:
        """The answer layout and text limits: these settings over the config saved with the model (an adapter's wins)."""
        return AnswerConfig.for_model(adapter, model, answer_format=self.answer_format, max_text_chars=self.max_text_chars)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
