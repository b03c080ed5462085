"""Training throughput and memory of a Cosmos Reason architecture on one GPU.

Builds the real architecture of `--config` (default Qwen2.5-VL-7B, Cosmos-Reason1-7B's,
bench/configs/qwen2_5_vl_7b.json; bench/configs/qwen3_vl_8b.json is Cosmos-Reason2-8B's)
with random weights on the GPU and trains it on recipe-shaped samples: 20 frames (1,440
video tokens: 252x448 for Qwen2.5-VL, 288x512 for Qwen3-VL, whose prompt also carries a
timestamp before each pair of frames), a 1,400-token prompt and a 400-token answer, the
loss on the answer only. Runs, in one process so every number comes from the same card:

  baseline  the plain path: PEFT LoRA r16 on all linear layers (vision too), gradient
            checkpointing, SDPA, the model's own loss over full fp32 logits, batch 1;
  lora      our training path (train/sft.py): LoRA r16 on the language model (the family adapter's targets), the vision
            tower frozen, TRL's fused LM head (log-probabilities of the answer tokens only,
            in chunks, no full logits), at several batch sizes with and without checkpointing;
  qlora     the same on NF4 weights with double quantization and bf16 compute, without
            the fp32 copies of k-bit preparation;
  full      every weight trained, bf16 weights and AdamW state, checkpointing, fused head.

Every mode trains under bf16 autocast, in train mode (transformers skips gradient
checkpointing in eval mode, which is what `from_pretrained` returns). Throughput counts
all tokens of a sample (video + prompt + answer); MFU is 6 x parameters x tokens/s over
the H100's 989 dense bf16 TFLOP/s. `peak_gib` is the most memory allocated during the
training steps (weights, optimizer state, activations), after the model is built.

    python bench/train_7b.py                       # on a GPU: writes bench/results/train_7b.json
    python bench/train_7b.py --config bench/configs/qwen3_vl_8b.json --out bench/results/train_qwen3vl_8b.json
    python bench/train_7b.py --tiny --out /tmp/x.json   # CPU dry run of every code path
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # the repository: the bench uses train/sft.py's own helpers
from avlabel.families import FAMILIES  # noqa: E402 - after the repository is on the path

H100_BF16_DENSE_FLOPS = 989e12
CONFIG = ROOT / "configs" / "qwen2_5_vl_7b.json"  # Cosmos-Reason1-7B's architecture

# Recipe shape: 10 s at 2 fps = 20 frames at 252x448 -> grid (10, 18, 32) patches -> 1,440 tokens
SHAPE = {"grid": (10, 18, 32), "prompt_tokens": 1400, "answer_tokens": 400}
TINY_SHAPE = {"grid": (2, 4, 4), "prompt_tokens": 40, "answer_tokens": 16}


def model_config(path: str | Path, tiny: bool):
    from bench.infer_7b import read_config

    config = read_config(path)
    if tiny:  # the family's tiny test-model sizes and the real vocabulary: only for checking the code paths on a CPU
        from avlabel.demo.tiny_model import tiny_sizes

        for sub_config, values in zip((config.text_config, config.vision_config), tiny_sizes(config.model_type)):
            for key, value in values.items():
                setattr(sub_config, key, value)
    return config


@functools.cache
def video_ids(family, grid: tuple[int, int, int]) -> torch.Tensor:
    """The tokens the family's processor writes in a video's place (real vocabulary, frames at 2 fps)."""
    from avlabel.demo.tiny_model import CHAT_TEMPLATE, build_tokenizer

    processor = family.make_processor(build_tokenizer(family.model_type, "qwen"), CHAT_TEMPLATE)
    text = family.video_placeholder(processor, grid, sample_fps=2.0)
    return torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def make_batch(config, shape: dict, batch: int, device, accepts_mm_types: bool) -> dict:
    """`batch` identical-shape samples with random text and pixels; labels on the answer only."""
    family = FAMILIES[config.model_type]
    t, h, w = shape["grid"]
    video = video_ids(family, shape["grid"])
    vocab = 150000  # ordinary tokens, below the special ones
    generator = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for _ in range(batch):
        prompt = torch.randint(0, vocab, (shape["prompt_tokens"],), generator=generator)
        answer = torch.randint(0, vocab, (shape["answer_tokens"],), generator=generator)
        ids = torch.cat([
            prompt[:20],
            torch.tensor([config.vision_start_token_id]),
            video,
            torch.tensor([config.vision_end_token_id]),
            prompt[20:],
            answer,
        ])
        rows.append(ids)
        label = torch.full_like(ids, -100)
        label[-shape["answer_tokens"]:] = answer
        labels.append(label)
    input_ids = torch.stack(rows)
    patch_dim = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.stack(labels),
        "pixel_values_videos": torch.randn(batch * t * h * w, patch_dim, generator=generator),
        "video_grid_thw": torch.tensor([[t, h, w]] * batch),
    }
    if "second_per_grid_ts" in family.video_keys:
        inputs["second_per_grid_ts"] = torch.tensor([1.0] * batch)  # 2 frames per grid at 2 fps
    if accepts_mm_types:
        inputs["mm_token_type_ids"] = (input_ids == config.video_token_id).long() * 2  # 2 = video
    return {k: v.to(device) for k, v in inputs.items()}


def build_model(config, device, dtype=torch.bfloat16):
    with torch.device(device):
        model = FAMILIES[config.model_type].model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def quantize_nf4(model, compute_dtype=torch.bfloat16) -> int:
    """Every linear layer but the LM head to NF4 with double quantization, as `load_in_4bit` loads them.

    Done in place on the GPU (bitsandbytes quantizes a Params4bit when it is moved to the
    device), one layer at a time, instead of saving 16 GB and reloading it.
    """
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            weight = child.weight.data
            layer.weight = bnb.nn.Params4bit(weight.to("cpu") if weight.device.type == "cpu" else weight,
                                             requires_grad=False, compress_statistics=True, quant_type="nf4")
            layer.weight = layer.weight.to(weight.device)  # quantizes here
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, layer)
            del child, weight
            count += 1
    model.is_loaded_in_4bit = True
    return count


def fused_loss(model, inputs) -> torch.Tensor:
    """Loss through TRL's fused LM head: the mean NLL of the answer tokens, no full logits."""
    outputs = model(**inputs, fused_lm_head=True)
    return -outputs.log_probs.sum() / outputs.label_mask.sum().clamp(min=1)


def plain_loss(model, inputs) -> torch.Tensor:
    return model(**inputs).loss


def time_steps(model, params, loss_fn, inputs, steps: int, warmup: int, device) -> dict:
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = loss_fn(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    del optimizer
    return {"seconds_per_step": statistics.median(times), "peak_gib": peak, "loss": float(loss)}


def result(timing: dict, batch: int, tokens_per_sample: int, n_params: int, **extra) -> dict:
    tokens_per_s = batch * tokens_per_sample / timing["seconds_per_step"]
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "seconds_per_step": round(timing["seconds_per_step"], 4),
        "peak_gib": round(timing["peak_gib"], 2),
        "mfu": round(6 * n_params * tokens_per_s / H100_BF16_DENSE_FLOPS, 4),
        "batch": batch,
        "tokens_per_sample": tokens_per_sample,
        "final_loss": round(timing["loss"], 3),
        **extra,
    }


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return text


# ----------------------------------------------------------------------------- modes


def run_baseline(config, shape, device, n_params, steps, warmup, mm) -> dict:
    from peft import LoraConfig, get_peft_model

    model = build_model(config, device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()
    inputs = make_batch(config, shape, 1, device, mm)
    params = [p for p in model.parameters() if p.requires_grad]
    timing = time_steps(model, params, plain_loss, inputs, steps, warmup, device)
    out = result(timing, 1, inputs["input_ids"].shape[1], n_params, gradient_checkpointing=True,
                 lora="r16 all-linear (vision too)", loss="model loss over full fp32 logits")
    del model, inputs, params
    free()
    return out


def peft_language_lora(model, bf16_adapters: bool):
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    targets = FAMILIES[model.config.model_type].lora_target_modules
    add_fused_lm_head(model)  # before PEFT, as SFTTrainer does
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))
    if bf16_adapters:  # SFTTrainer keeps QLoRA adapters in bf16
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model


def set_checkpointing(model, enabled: bool):
    """Checkpointing as the Trainer sets it up, then our training path's frozen-vision fix."""
    from avlabel.train.sft import keep_frozen_vision_out_of_backward

    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        keep_frozen_vision_out_of_backward(model)
    else:
        model.gradient_checkpointing_disable()
    model.train()


def run_variants(model, config, shape, device, n_params, steps, warmup, mm, variants, **extra) -> list[dict]:
    outcomes = []
    params = [p for p in model.parameters() if p.requires_grad]
    for batch, checkpointing in variants:
        set_checkpointing(model, checkpointing)
        try:
            inputs = make_batch(config, shape, batch, device, mm)
            timing = time_steps(model, params, fused_loss, inputs, steps, warmup, device)
            outcomes.append(result(timing, batch, inputs["input_ids"].shape[1], n_params,
                                   gradient_checkpointing=checkpointing, **extra))
        except torch.OutOfMemoryError as err:
            outcomes.append({"batch": batch, "gradient_checkpointing": checkpointing, "error": oom_error(err)})
        inputs = None
        free()
        print(json.dumps(outcomes[-1]), flush=True)
    return outcomes


def run_lora(config, shape, device, n_params, steps, warmup, mm, variants) -> list[dict]:
    model = peft_language_lora(build_model(config, device), bf16_adapters=False)
    outcomes = run_variants(model, config, shape, device, n_params, steps, warmup, mm, variants,
                            lora="r16 language model", loss="TRL fused LM head")
    del model
    free()
    return outcomes


def run_qlora(config, shape, device, n_params, steps, warmup, mm, variants) -> list[dict]:
    model = build_model(config, device)
    quantized = quantize_nf4(model)
    model.requires_grad_(False)  # k-bit preparation without the fp32 upcast (train/sft.py prepare_kbit)
    model = peft_language_lora(model, bf16_adapters=True)
    free()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    outcomes = run_variants(model, config, shape, device, n_params, steps, warmup, mm, variants,
                            lora="r16 language model", loss="TRL fused LM head", quantized_layers=quantized,
                            weights_gib=round(weights_gib, 2), quantization="nf4, double quant, bf16 compute")
    del model
    free()
    return outcomes


def run_full(config, shape, device, n_params, steps, warmup, mm, variants) -> list[dict]:
    from trl.trainer.utils import add_fused_lm_head

    model = build_model(config, device)
    add_fused_lm_head(model)
    outcomes = run_variants(model, config, shape, device, n_params, steps, warmup, mm, variants,
                            weights="bf16 weights and AdamW state (no fp32 master copy)", loss="TRL fused LM head")
    del model
    free()
    return outcomes


def best(outcomes: list[dict]) -> dict:
    ran = [o for o in outcomes if "error" not in o]
    if not ran:
        return {"batch": outcomes[0]["batch"], "error": outcomes[0]["error"]}
    return max(ran, key=lambda o: o["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG), help="the architecture: a file of bench/configs")
    parser.add_argument("--out", default=str(ROOT / "results" / "train_7b.json"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: checks the code paths only")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", default="baseline,lora,qlora,full")
    args = parser.parse_args()

    import inspect

    import transformers

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    config = model_config(args.config, args.tiny)
    family = FAMILIES[config.model_type]
    shape = TINY_SHAPE if args.tiny else SHAPE
    with torch.device("meta"):
        n_params = sum(p.numel() for p in family.model_class._from_config(config).parameters())
    mm = "mm_token_type_ids" in inspect.signature(family.model_class.forward).parameters
    steps, warmup = (1, 1) if args.tiny else (args.steps, args.warmup)
    torch.manual_seed(0)

    report: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (tiny dry run)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": f"{Path(args.config).stem} architecture, {family.title}, random weights",
        "parameters": n_params,
        "shape": {"video_tokens": shape["grid"][0] * shape["grid"][1] * shape["grid"][2] // 4, **shape},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "mfu_basis": "6 x parameters x tokens/s / 989 TFLOP/s (H100 dense bf16)",
        "timing": f"median of {steps} steps after {warmup} warm-up steps",
    }
    for package in ("peft", "trl", "bitsandbytes"):
        try:
            report["versions"][package] = __import__(package).__version__
        except Exception as err:  # a missing package only disables the modes that need it
            report["versions"][package] = f"missing ({err})"

    modes = args.modes.split(",")
    runners = {
        "baseline": lambda: run_baseline(config, shape, device, n_params, steps, warmup, mm),
        "lora": lambda: run_lora(config, shape, device, n_params, steps, warmup, mm,
                                 [(1, False), (2, False), (4, True)]),
        "qlora": lambda: run_qlora(config, shape, device, n_params, steps, warmup, mm, [(1, True), (2, True)]),
        "full": lambda: run_full(config, shape, device, n_params, steps, warmup, mm, [(1, True), (2, True)]),
    }
    for mode in modes:
        start = time.perf_counter()
        try:
            outcome = runners[mode]()
        except Exception as err:  # keep the other modes' numbers when one fails
            traceback.print_exc()
            outcome = {"batch": 1, "error": oom_error(err)}
        free()
        if isinstance(outcome, list):
            report[mode] = best(outcome)
            report[f"{mode}_variants"] = outcome
        else:
            report[mode] = outcome
        report[mode]["wall_s"] = round(time.perf_counter() - start, 1)
        print(f"== {mode}: {json.dumps(report[mode])}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"\n{'run':10} {'batch':>5} {'tokens/s':>9} {'s/step':>7} {'peak GiB':>8} {'MFU':>6}")
    for mode in modes:
        row = report[mode]
        if "error" in row:
            print(f"{mode:10} {row.get('batch', ''):>5} error: {row['error'][:80]}")
        else:
            print(f"{mode:10} {row['batch']:>5} {row['tokens_per_s']:>9.0f} {row['seconds_per_step']:>7.2f} "
                  f"{row['peak_gib']:>8.1f} {row['mfu']:>6.1%}")


if __name__ == "__main__":
    main()
