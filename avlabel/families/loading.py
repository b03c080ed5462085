"""The one model loader: training, captioning, export and the benchmarks load a checkpoint here."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def bnb_quantization(kind: str | None, compute_dtype: str = "bfloat16"):
    """bitsandbytes settings for weights loaded in '4bit' (NF4) or '8bit'; None for full-precision weights."""
    if kind is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be '4bit' or '8bit', got {kind!r}")


def load_config(name_or_path: str | Path, option: str = "model", revision: str | None = None,
                trust_remote_code: bool = False):
    """The model's AutoConfig, the first thing read of it: a model that can't be fetched (offline, no network, a
    private or mistyped repo) is named with the option that gave it, not only with transformers' sentence."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    from avlabel.core.errors import one_line

    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        offline = (" HF_HUB_OFFLINE is set: download it where the Hub can be reached (`hf download "
                   f"{name_or_path}`), or give a local folder") if constants.HF_HUB_OFFLINE else ""
        raise OSError(f"{option} {name_or_path}: can't be loaded ({one_line(err)}){offline}") from None


def load_model(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    dtype: Any = "auto",
    device_map: Any = None,
    quantization_config: Any = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    adapter: str | Path | None = None,
):
    """A Hub id or model folder, loaded through its family's model class, with an optional PEFT adapter.

    `dtype` is a torch dtype, its name, or "auto" (the checkpoint's). An adapter is merged into
    the weights, which costs nothing per token, unless they are quantized and can't absorb it:
    then it stays on top of them.
    """
    import torch

    from . import family_of

    config = load_config(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {
        "config": config,
        "revision": revision,
        "dtype": getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype,
        "device_map": device_map,
        "quantization_config": quantization_config,
        "attn_implementation": attn_implementation,
        "trust_remote_code": trust_remote_code,
    }
    model = family_of(config).model_class.from_pretrained(
        name_or_path, **{name: value for name, value in kwargs.items() if value is not None}
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        model = model.get_base_model() if quantization_config is not None else model.merge_and_unload()
    return model
