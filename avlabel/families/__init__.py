"""Model families: one adapter per architecture, found from the model config's `model_type`.

    family = family_of(model.config)          # or a config, a model folder, a Hub id
    family.vision_tower(model), family.lora_target_modules, family.rope_positions(model, batch) ...

Adding a family: a file here defining its `Family` (see base.py), an entry in `FAMILIES`, a tiny
test model in avlabel/demo/tiny_model.py and a recipe under recipes/.
"""

from __future__ import annotations

from pathlib import Path

from .base import Family
from .loading import bnb_quantization, load_config, load_model, weights_fingerprint
from .qwen2_5_vl import QWEN2_5_VL
from .qwen3_vl import QWEN3_VL

FAMILIES: dict[str, Family] = {family.model_type: family for family in (QWEN2_5_VL, QWEN3_VL)}
# the Cosmos recipe's (Reason 1): frames are sampled at its defaults when no model is known
DEFAULT_FAMILY = QWEN2_5_VL

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "Family", "bnb_quantization", "family_of", "load_config", "load_model", "weights_fingerprint"]


def family_of(source) -> Family:
    """The family of a model, a config, or a model folder / Hub id (its config.json is read)."""
    config = getattr(source, "config", source)
    if isinstance(config, (str, Path)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model type {model_type!r} has no family adapter (known: {', '.join(FAMILIES)}); "
            "add one in avlabel/families/ to train or caption it"
        )
    return FAMILIES[model_type]
