"""Model families (avlabel/families): each adapter's knowledge checked against its real architecture.

The tiny test models have the real module layout and processors, the bench configs the real
sizes; nothing here is a stand-in for the thing it checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAMILIES

from avlabel.families import FAMILIES as ADAPTERS
from avlabel.families import family_of, load_model

ROOT = Path(__file__).resolve().parents[1]
# bench config -> (family, layers, hidden size, heads, parameters) as published for the checkpoints it stands for
BENCH_CONFIGS = {
    "qwen2_5_vl_7b.json": ("qwen2_5_vl", 28, 3584, 28, 8_292_166_656),  # Cosmos-Reason1-7B
    "qwen3_vl_8b.json": ("qwen3_vl", 36, 4096, 32, 8_767_123_696),  # Cosmos-Reason2-8B
}


@pytest.fixture(scope="module")
def model_of(tiny_model_of):
    from transformers import AutoModelForImageTextToText

    return lambda family: AutoModelForImageTextToText.from_pretrained(tiny_model_of(family))


def test_every_family_has_its_tiny_model_and_its_recipes():
    """A family is one adapter file, a tiny test model and recipes (the registry, tiny_model.TINY, recipes/)."""
    from avlabel.demo.tiny_model import TINY

    assert set(TINY) == set(ADAPTERS)
    trained = {yaml.safe_load(recipe.read_text()).get("model_name_or_path") for recipe in (ROOT / "recipes").glob("*/*.yaml")}
    generation_of = {"qwen2_5_vl": "nvidia/Cosmos-Reason1-", "qwen3_vl": "nvidia/Cosmos-Reason2-"}
    assert all(any(str(model).startswith(generation_of[family]) for model in trained) for family in ADAPTERS)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_found_from_model_config_folder_and_model(tiny_model_of, model_of, family):
    from transformers import AutoConfig

    folder = tiny_model_of(family)
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == family
    assert family_of(config) is family_of(str(folder)) is family_of(model_of(family)) is ADAPTERS[family]
    assert family_of(config).config_class is type(config)


def test_an_unknown_architecture_is_refused_with_what_to_do(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'qwen2' has no family adapter .*qwen2_5_vl, qwen3_vl.*avlabel/families"):
        load_model(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_outputs_are_the_adapters_keys(tiny_model_of, family):
    """Per-token outputs (padded) and per-video outputs (concatenated): together, all the processor gives."""
    import numpy as np
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_of(family))
    adapter = ADAPTERS[family]
    size = 2 * adapter.patch_size * adapter.merge_size
    out = processor(text=["a <|vision_start|><|video_pad|><|vision_end|> b"],
                    videos=[np.zeros((4, size, size, 3), dtype=np.uint8)],
                    video_metadata=[{"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}],
                    videos_kwargs={"do_sample_frames": False, "do_resize": False}, return_tensors="pt")
    assert set(out) == {*adapter.sequence_keys, *adapter.video_keys}
    assert all(out[key].shape == out["input_ids"].shape for key in adapter.sequence_keys)
    # the placeholder the adapter computes is exactly what the processor wrote for the video
    text = processor.tokenizer.decode(out["input_ids"][0])
    placeholder = adapter.video_placeholder(processor, tuple(out["video_grid_thw"][0].tolist()), sample_fps=2.0)
    assert text == f"a <|vision_start|>{placeholder}<|vision_end|> b"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_the_language_model_linear_layers_and_nothing_else(model_of, family):
    from peft import LoraConfig, get_peft_model

    model = model_of(family)
    adapter = ADAPTERS[family]
    language = adapter.language_model(model)
    expected = {f"{name}.{proj}" for name, module in language.named_modules() if name.count(".") == 1  # layers.N
                for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=adapter.lora_target_modules))
    adapted = {name for name, module in adapter.language_model(peft).named_modules() if hasattr(module, "lora_A")}
    assert adapted == expected and len(expected) == 7 * model.config.text_config.num_hidden_layers
    vision = adapter.vision_tower(peft)
    assert not any(hasattr(module, "lora_A") for module in vision.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_freezing_the_vision_tower_keeps_its_projector_training(tiny_model_of, family):
    """freeze_vision_tower freezes the blocks, not the projector (Qwen3-VL: merger and deepstack mergers)."""
    from trl import ModelConfig, SFTConfig

    from avlabel.train.sft import TrainScriptArguments, load_training_model

    model_dir = str(tiny_model_of(family))
    adapter = ADAPTERS[family]
    for freeze_vision_tower, freeze_projector in ((True, False), (False, True)):
        model = load_training_model(
            ModelConfig(model_name_or_path=model_dir, dtype="float32"),
            TrainScriptArguments(freeze_vision_tower=freeze_vision_tower, freeze_projector=freeze_projector),
            SFTConfig(output_dir="unused", report_to=[], use_cpu=True),
        )
        vision = adapter.vision_tower(model)
        parts = {name.split(".")[0] for name, _ in vision.named_parameters()}
        trains = {name.split(".")[0] for name, param in vision.named_parameters() if param.requires_grad}
        projector = {prefix.rstrip(".") for prefix in adapter.projector_prefixes}
        assert projector < parts and "blocks" in parts
        assert trains == (parts - projector if freeze_projector else projector)
        assert all(param.requires_grad for param in adapter.language_model(model).parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_positions_of_a_padded_row_are_its_positions_alone(tiny_model_of, model_of, family):
    import numpy as np
    from transformers import AutoProcessor

    from avlabel.core.prompts import load_prompts
    from avlabel.core.sampling import ClipInfo, SampledClip
    from avlabel.infer.engine import ClipPreparer, chat_text

    model, processor = model_of(family), AutoProcessor.from_pretrained(tiny_model_of(family))
    adapter = ADAPTERS[family]
    size = 2 * adapter.patch_size * adapter.merge_size
    frames = np.zeros((4, size, size, 3), dtype=np.uint8)
    info = ClipInfo(duration=2.0, fps=2.0, width=size, height=size, codec="h264", num_frames=4, rotation=0,
                    has_audio=False)
    item = ClipPreparer(processor, chat_text(processor, load_prompts(short=True)))(
        SampledClip(frames=frames, indices=[0, 1, 2, 3], timestamps=[0, 0.5, 1, 1.5], info=info, sample_fps=2.0))
    alone = adapter.rope_positions(model, item)
    pad = 5
    padded = {key: torch.nn.functional.pad(value, (pad, 0)) if key in adapter.sequence_keys else value
              for key, value in item.items()}
    positions = adapter.rope_positions(model, padded)
    assert positions.shape == (3, 1, alone.shape[2] + pad)
    assert torch.equal(positions[:, :, pad:], alone)
    assert alone[0, 0].max() < alone.shape[2] - 1  # video tokens share positions: 3-D, not 1-D, RoPE


@pytest.mark.parametrize("family", FAMILIES)
def test_default_frames_have_the_recipes_token_budget(family):
    """16:9 clips get 16x9 merged tokens a frame: 252x448 at Qwen2.5-VL's factor 28, 288x512 at Qwen3-VL's 32."""
    from avlabel.core.sampling import SamplingConfig, resized_size

    spec = json.loads((ROOT / "bench" / "configs" / next(n for n, v in BENCH_CONFIGS.items() if v[0] == family)).read_text())
    config = ADAPTERS[family].config_class.from_dict({k: v for k, v in spec.items() if not k.startswith("_")})
    sampling = SamplingConfig.for_model(config)
    height, width = resized_size(720, 1280, sampling)
    assert (height // sampling.factor, width // sampling.factor) == (9, 16)
    assert {"qwen2_5_vl": (252, 448), "qwen3_vl": (288, 512)}[family] == (height, width)


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_video_processor_gets_a_pixel_budget_only_where_it_reads_one_per_frame(tiny_model_of, family):
    """`per_frame_video_size` checked against transformers: a per-frame budget of 16 tokens keeps 8 frames of
    4x4 tokens each; read as one clip's budget, it shrinks them. The export sets it only where it is per frame."""
    import numpy as np
    from transformers import AutoProcessor

    from avlabel.core.sampling import SamplingConfig

    adapter = ADAPTERS[family]
    video = AutoProcessor.from_pretrained(tiny_model_of(family)).video_processor
    factor = adapter.patch_factor()
    sampling = SamplingConfig(fps=1.0, min_frames=2, max_frames=8, min_pixels=factor**2, max_pixels=16 * factor**2,
                              factor=factor)
    adapter.configure_video_processor(video, sampling)
    assert (video.do_sample_frames, video.fps, video.min_frames, video.max_frames) == (True, 1.0, 2, 8)
    budget = {"shortest_edge": sampling.min_pixels, "longest_edge": sampling.max_pixels}
    assert ({k: video.size[k] for k in budget} == budget) == adapter.per_frame_video_size

    video.size = budget
    frames = np.zeros((8, 4 * factor, 4 * factor, 3), np.uint8)
    grid = video(videos=[frames], do_sample_frames=False, return_tensors="pt")["video_grid_thw"][0].tolist()
    assert (grid[1:] == [4 * adapter.merge_size] * 2) == adapter.per_frame_video_size, grid


@pytest.mark.parametrize("name", list(BENCH_CONFIGS))
def test_bench_configs_are_the_published_architectures(name):
    """The benchmark configs build, with random weights, the architectures of the checkpoints they stand for."""
    family, layers, hidden, heads, parameters = BENCH_CONFIGS[name]
    spec = json.loads((ROOT / "bench" / "configs" / name).read_text())
    adapter = ADAPTERS[spec["model_type"]]
    config = adapter.config_class.from_dict({k: v for k, v in spec.items() if not k.startswith("_")})
    text = config.get_text_config()
    assert (adapter.model_type, text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (
        family, layers, hidden, heads)
    with torch.device("meta"):
        model = adapter.model_class._from_config(config)
    assert sum(param.numel() for param in model.parameters()) == parameters


def _recipes():
    for path in sorted((ROOT / "recipes").glob("*/*.yaml")):
        if path.parent.name not in ("accelerate", "tiny"):
            yield pytest.param(path, id=f"{path.parent.name}/{path.name}")


@pytest.mark.parametrize("recipe", list(_recipes()))
def test_recipes_parse_with_their_command(recipe, tmp_path):
    """Every Cosmos recipe is read by its command's own parser (build, train or caption) without a stray key."""
    config = yaml.safe_load(recipe.read_text())
    if recipe.parent.name == "infer":
        from avlabel.infer.caption import make_parser

        config["input"] = str(tmp_path)
        args, settings = make_parser().parse_dict(config)
        assert args.model.startswith("nvidia/Cosmos-Reason") or recipe.stem == "tiny"
    elif recipe.name == "build.yaml":
        from avlabel.data_builder.build import make_parser

        (args,) = make_parser().parse_dict({**config, "input": str(tmp_path), "output_dir": str(tmp_path)})
        family = ADAPTERS["qwen3_vl" if "reason2" in recipe.parent.name else "qwen2_5_vl"]
        assert args.factor == family.patch_size * family.merge_size
    else:
        from avlabel.train.sft import make_parser

        script_args, training_args, model_args = make_parser().parse_dict({**config, "use_cpu": True})
        size = recipe.parent.name.rsplit("_", 1)[1].upper()  # cosmos_reason2_8b -> 8B
        generation = recipe.parent.name.split("_")[1][-1]  # reason2 -> 2
        assert model_args.model_name_or_path == f"nvidia/Cosmos-Reason{generation}-{size}"
        assert training_args.output_dir.endswith(f"{recipe.parent.name}-{recipe.stem}")


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")), ids=lambda path: path.name)
@pytest.mark.parametrize("family", FAMILIES)
def test_accelerate_configs_shard_each_decoder_layer_and_vision_block_of_every_family(family, config, model_of,
                                                                                         monkeypatch):
    """The FSDP configs the recipes launch with, as `accelerate launch` hands them to the training process (its
    environment), and accelerate's own FSDP2 auto-wrap policy on the model: one shard unit per decoder layer and
    vision block. A class list naming one family's layers fails on the other ('Could not find the transformer
    layer class'); without one, accelerate wraps the model's _no_split_modules."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "train.py"]))
    for name in [name for name in os.environ if name.startswith(("FSDP_", "ACCELERATE_"))]:  # a launcher's, not these
        monkeypatch.delenv(name)
    for name, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(name, value)
    model = model_of(family)
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), model)
    wrapped = [module for module in model.modules() if policy(module)]
    expected = [*model.model.language_model.layers, *model.model.visual.blocks]
    assert len(expected) >= 4 and {id(module) for module in wrapped} == {id(module) for module in expected}
