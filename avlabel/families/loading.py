"""The one model loader: training, captioning, export and the benchmarks load a checkpoint here."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin")
WHOLE_FILE_BYTES = 64 * 2**20  # an adapter, a tiny model: read whole
SAMPLED_BLOCKS, BLOCK_BYTES = 64, 4096


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


def weights_fingerprint(name_or_path: str | Path | None) -> str | None:
    """A digest of a local model or adapter folder's weight files that changes when they are trained again, so a
    caption run resumes only with the weights it began with (a retrain keeps the folder's name). A file over
    64 MiB is read in 64 blocks spread over it: reading 16 GB whole would take a minute at every start, and
    training changes nearly every block of a checkpoint. None for a Hub id (its name says which weights)."""
    if name_or_path is None or not Path(name_or_path).is_dir():
        return None
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in Path(name_or_path).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as handle:
            if size <= WHOLE_FILE_BYTES:
                digest.update(handle.read())
                continue
            for block in range(SAMPLED_BLOCKS):
                handle.seek(block * (size - BLOCK_BYTES) // (SAMPLED_BLOCKS - 1))
                digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()


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
