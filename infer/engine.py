"""Batched caption generation for Qwen-VL models (Cosmos Reason 1 and 2).

`transformers`' `generate` runs a whole batch's prefill at once (batch 128 of ~2.5k-token
clips runs out of memory on an H100) and its decode steps are launch- and copy-bound.
This engine keeps the model and its attention code from `transformers` and changes how
they are driven (BENCHMARKS.md: 17,472 clips/hour on one H100 against 245 for the
one-clip `generate` loop):

* prefill in micro-batches of `prefill_batch_size` clips, each writing its rows of one
  preallocated KV cache, then decode all rows together (`batch_size`);
* left padding, with each row's multimodal RoPE positions from the model's own
  `get_rope_index` (through its family adapter, avlabel/families), so a clip's tokens get
  the same positions batched or alone;
* a decode step whose attention reads only the filled part of the cache (in blocks of
  `KV_BLOCK` tokens) and, on CUDA, is replayed as a CUDA graph per block count;
* the vision tower's window attention in one call per layer, not one per window
  (avlabel/families/base.py `padded_windows_attention`, which training uses too);
* sampling with the recipe's settings (repetition penalty, temperature, top-p), and
  optional constrained decoding (infer/constrained.py: the label grammar through xgrammar,
  closed within the token budget; its host work, `ConstrainedRows`, runs beside the GPU's
  forward pass);
* each written token's log-probability under the model, for per-field confidence.

Greedy output equals one-clip-at-a-time `generate` (tests/test_infer.py checks it).
Frames come only from `avlabel.core.sampling.sample_frames`, decoded and run through
the processor by DataLoader worker processes ahead of the GPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from avlabel.core.prompts import Prompts
from avlabel.core.sampling import SampledClip, SamplingConfig, sample_frames

from . import constrained
from .inputs import ClipRef
from .settings import GenerationSettings

logger = logging.getLogger(__name__)

KV_BLOCK = 256  # decode attention reads the cache in blocks of this many tokens


@dataclass
class Generation:
    tokens: list[int]  # generated ids, end-of-text included when the model wrote it
    text: str
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)  # of each token under the model (no penalty, grammar or temperature)
    cut_fields: dict[str, str] = field(default_factory=dict)  # constrained: fields not written in full, and why


# ----------------------------------------------------------------------------- inputs


def chat_text(processor, prompts: Prompts) -> str:
    """The prompt as the chat template writes it, from the conversation training uses."""
    from avlabel.core.prompts import build_conversation

    return processor.apply_chat_template(build_conversation(prompts), tokenize=False, add_generation_prompt=True)


@dataclass
class ClipPreparer:
    """Frames -> model inputs. Runs in DataLoader workers, so it holds the processor, never the model."""

    processor: Any
    text: str
    pixel_dtype: torch.dtype = torch.float32

    def __call__(self, sampled: SampledClip) -> dict[str, torch.Tensor]:
        inputs = self.processor(
            text=[self.text],
            videos=[sampled.frames],
            video_metadata=[sampled.processor_metadata()],
            videos_kwargs={"do_sample_frames": False, "do_resize": False},  # sample_frames already did both
            return_tensors="pt",
        )
        out = dict(inputs)
        # the vision tower casts to its dtype anyway; casting here halves what workers ship
        out["pixel_values_videos"] = out["pixel_values_videos"].to(self.pixel_dtype)
        return out


class _Clips(torch.utils.data.Dataset):
    """Decodes and prepares one clip per item; a failure is returned, not raised, so the run goes on."""

    def __init__(self, clips: list[ClipRef], load_frames: Callable, sampling: SamplingConfig, prepare: ClipPreparer):
        self.clips, self.load_frames, self.sampling, self.prepare = clips, load_frames, sampling, prepare

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int):
        clip = self.clips[index]
        try:
            return clip, self.prepare(self.load_frames(clip.path, self.sampling)), None
        except Exception as err:  # noqa: BLE001 - any clip-level failure is recorded with its reason
            return clip, None, f"{type(err).__name__}: {err}"


def _one_item(batch):
    return batch


def _worker_init(_):
    torch.set_num_threads(1)  # many decoding workers: one thread each, not one per core each


def prepared_clips(clips: list[ClipRef], prepare: ClipPreparer, sampling: SamplingConfig, batch_size: int,
                   num_workers: int = 4, load_frames: Callable = sample_frames) -> Iterator:
    """(clip, model inputs or None, error or None) for each clip, in order, from `num_workers` processes.

    The workers start decoding at once, so a caller that makes this before loading the model
    (infer/caption.py) has frames ready when the model is.
    """
    loader = torch.utils.data.DataLoader(
        _Clips(clips, load_frames, sampling, prepare),
        batch_size=None,
        collate_fn=_one_item,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        # enough clips in flight to fill the next grouping window while the model runs
        prefetch_factor=max(2, math.ceil(2 * batch_size / num_workers)) if num_workers else None,
        persistent_workers=False,
    )
    return iter(loader)


# ----------------------------------------------------------------------------- KV cache and attention


class SlotCache:
    """A preallocated KV cache for one decode batch: [rows, kv_heads, capacity, head_dim] per layer.

    Hand-written because `transformers`' StaticCache writes every row at once: here
    prefill micro-batches each fill their own rows, then decode steps write one column
    for all rows at `position` (a tensor, so a captured CUDA graph sees each new value).
    The model only calls `update`, as it does on any cache.
    """

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (rows, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.prefill_rows: slice | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.prefill_rows is not None:
            length = key_states.shape[2]
            self.keys[layer_idx][self.prefill_rows, :, :length] = key_states
            self.values[layer_idx][self.prefill_rows, :, :length] = value_states
            return key_states, value_states  # a prefill attends to its own prompt only
        self.keys[layer_idx].index_copy_(2, self.position, key_states)
        self.values[layer_idx].index_copy_(2, self.position, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


def _filled_part_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA over the part of the cache the mask covers: a decode step skips the empty tail."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and key.shape[2] > attention_mask.shape[-1]:
        key = key[:, :, : attention_mask.shape[-1]]
        value = value[:, :, : attention_mask.shape[-1]]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_engine_attention(model, family, padded_vision_windows: bool = True) -> None:
    """Route the model's attention through the engine's functions (registered with `transformers`).

    `transformers` passes a 4D mask through unchanged and builds none for an attention
    function it has no mask function for, so the engine's own masks (or, for an unpadded
    prefill, none: causal SDPA) are exactly what the language model's attention sees.
    """
    from avlabel.families.base import padded_windows_attention

    family.set_attention(model, _filled_part_attention, padded_windows_attention if padded_vision_windows else None)


class _DecodeStep:
    """One decode step for all rows; on CUDA captured once per cache-block count and replayed."""

    def __init__(self, model, cache: SlotCache, rows: int, capacity: int, use_graphs: bool):
        device = cache.position.device
        self.model, self.cache = model, cache
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=device)
        self.use_graphs = use_graphs and device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_error: str | None = None

    def _forward(self, kv_length: int) -> torch.Tensor:
        mask = self.mask[..., :kv_length]
        out = self.model(
            input_ids=self.ids,
            position_ids=self.positions.view(1, -1, 1).expand(3, -1, -1),
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _capture(self, kv_length: int):
        # warm up on a side stream (same inputs: rewrites the same cache column), then capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(kv_length)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(kv_length)
        return graph, logits

    def __call__(self, kv_length: int) -> torch.Tensor:
        if not self.use_graphs:
            return self._forward(kv_length).float()
        if kv_length not in self.graphs:
            try:
                self.graphs[kv_length] = self._capture(kv_length)
            except Exception as err:  # noqa: BLE001 - a model whose step can't be captured still runs, eagerly
                logger.warning("decode step can't be captured as a CUDA graph, running eagerly: %s", err)
                self.capture_error = f"{type(err).__name__}: {err}"
                self.use_graphs = False
                return self._forward(kv_length).float()
        graph, logits = self.graphs[kv_length]
        graph.replay()
        return logits.float()


# ----------------------------------------------------------------------------- engine


class CaptionEngine:
    def __init__(
        self,
        model,
        processor,
        prompts: Prompts,
        settings: GenerationSettings,
        batch_size: int = 64,
        prefill_batch_size: int = 8,
        cuda_graphs: bool = True,
        padded_vision_windows: bool = True,
        sampling: SamplingConfig | None = None,
        answer: constrained.AnswerConfig | None = None,
        record_logprobs: bool = True,
    ):
        from avlabel.families import family_of

        self.model, self.processor, self.prompts, self.settings = model, processor, prompts, settings
        self.family = family_of(model.config)
        self.batch_size, self.prefill_batch_size, self.cuda_graphs = batch_size, prefill_batch_size, cuda_graphs
        self.record_logprobs = record_logprobs  # for confidence; off only for bench/infer_7b.py's baseline
        self.device = next(model.parameters()).device
        self.dtype = model.dtype  # of activations and so of the KV cache (4-bit weights still compute in it)
        self.text_config = model.config.get_text_config()
        config = self.text_config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.sampling = sampling or settings.sampling(model.config)  # caption.py resolves it with the model's folder
        self.prepare = ClipPreparer(processor, chat_text(processor, prompts), self.dtype)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted(set(eos) | ({self.text_config.eos_token_id} - {None}))
        pad = model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        vocabulary = constrained.tokenizer_info(processor.tokenizer, self.vocab_size, self.eos_ids)
        self.token_bytes = constrained.token_bytes(vocabulary)  # what each token writes: per-field confidence
        # constrained decoding (infer/constrained.py): the label grammar and the rule that closes it within budget
        self.answer = answer or settings.answer()  # caption.py resolves it with the model's folder
        self.grammar = self.closing = None
        if settings.constrained:
            self.closing = constrained.closing_plan(processor.tokenizer, self.answer, self.token_bytes, self.eos_ids)
            # text limits in the grammar make xgrammar's masks slow: ConstrainedRows keeps them where it can
            self.grammar = constrained.compile_grammar(vocabulary, self.answer, bounded=not self.closing.limits_text)
            if settings.max_new_tokens < self.closing.min_budget:
                raise ValueError(constrained.budget_error(settings.max_new_tokens, self.closing.min_budget, self.answer))
            if self.device.type == "cuda":  # compile xgrammar's mask kernel (Triton) now, not in the first batch's time
                import xgrammar as xgr

                xgr.apply_token_bitmask_inplace(torch.zeros(batch_size, self.vocab_size, device=self.device),
                                                xgr.allocate_token_bitmask(batch_size, self.vocab_size).to(self.device))
        self.timings: list[dict] = []  # per decode batch: where the time went (prefill, decode)
        use_engine_attention(model, self.family, padded_vision_windows)

    # -- settings -----------------------------------------------------------------

    def _rows_that_fit(self, requested: int, capacity: int) -> int:
        """Decode rows whose KV cache fits in free GPU memory, keeping room for a prefill micro-batch."""
        if self.device.type != "cuda":
            return requested
        config = self.text_config
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * self.head_dim * self.dtype.itemsize
        per_row = capacity * per_token + self.vocab_size * 8  # + logits and sampling buffers
        prefill = self.prefill_batch_size * capacity * (3 * config.intermediate_size + 6 * config.hidden_size) * 2
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, min(requested, int((free - prefill - 2 * 2**30) // per_row)))

    # -- one batch ----------------------------------------------------------------

    def _collate(self, items: list[dict[str, torch.Tensor]], length: int) -> dict[str, torch.Tensor]:
        """Left-pad the per-token tensors to `length`; concatenate the rest (pixels, grids)."""
        batch = {}
        for key in items[0]:
            if key in self.family.sequence_keys:
                fill = self.pad_id if key == "input_ids" else 0
                rows = [torch.nn.functional.pad(item[key], (length - item[key].shape[1], 0), value=fill) for item in items]
                batch[key] = torch.cat(rows)
            else:
                batch[key] = torch.cat([item[key] for item in items])
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def _prefill(self, cache: SlotCache, rows: slice, items, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._collate(items, length)
        positions = self.family.rope_positions(self.model, batch)
        valid = batch.pop("attention_mask").bool()
        mask = None
        if not bool(valid.all()):
            causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
            mask = causal[None, None] & valid[:, None, None, :]
            # a padding query sees itself, so no softmax row is empty (an empty row would be NaN)
            mask |= torch.eye(length, dtype=torch.bool, device=self.device)[None, None]
        cache.prefill_rows = rows
        try:
            out = self.model(
                **batch,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            cache.prefill_rows = None
        next_positions = positions.amax(dim=(0, 2)) + 1
        return out.logits[:, -1].float(), next_positions

    def _choose(self, logits: torch.Tensor, seen: torch.Tensor | None, step: int,
                constraint: constrained.ConstrainedRows | None) -> torch.Tensor:
        """Next token per row, with the processors `generate` applies, in its order."""
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        settings = self.settings
        if seen is not None:
            # `generate`'s repetition penalty gathers over input_ids, which would also
            # penalise the padding token of shorter rows; a per-row seen-token mask doesn't
            penalized = torch.where(logits > 0, logits / settings.repetition_penalty, logits * settings.repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if step < settings.min_new_tokens:
            logits[:, self.eos_ids] = -math.inf
        if constraint is not None:
            constraint.mask_logits(logits)
        if settings.temperature <= 0:
            return logits.argmax(dim=-1)
        logits = TemperatureLogitsWarper(settings.temperature)(None, logits)
        logits = TopPLogitsWarper(settings.top_p)(None, logits)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator).squeeze(1)

    @torch.inference_mode()
    def generate(self, items: list[dict[str, torch.Tensor]]) -> list[Generation]:
        """Generate for prepared clips (processor outputs), splitting them if memory requires."""
        length = max(item["input_ids"].shape[1] for item in items)
        capacity = math.ceil((length + self.settings.max_new_tokens) / KV_BLOCK) * KV_BLOCK
        rows = self._rows_that_fit(len(items), capacity)
        results = []
        for start in range(0, len(items), rows):
            results += self._generate_rows(items[start : start + rows], length, capacity)
        return results

    def _generate_rows(self, items, length: int, capacity: int) -> list[Generation]:
        settings, rows = self.settings, len(items)
        config = self.text_config
        cache = SlotCache(
            config.num_hidden_layers, rows, config.num_key_value_heads, self.head_dim, capacity, self.dtype, self.device
        )
        step_fn = _DecodeStep(self.model, cache, rows, capacity, self.cuda_graphs)
        logits = torch.empty(rows, self.vocab_size, device=self.device)
        started = time.perf_counter()
        for start in range(0, rows, self.prefill_batch_size):
            chunk = slice(start, min(rows, start + self.prefill_batch_size))
            logits[chunk], step_fn.positions[chunk] = self._prefill(cache, chunk, items[chunk], length)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prefilled = time.perf_counter()
        prompt_ids = torch.cat(
            [torch.nn.functional.pad(item["input_ids"], (length - item["input_ids"].shape[1], 0), value=-1) for item in items]
        ).to(self.device)
        step_fn.mask[:, 0, 0, :length] = prompt_ids >= 0
        seen = None
        if settings.repetition_penalty != 1.0:
            seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=self.device)
            seen.scatter_(1, prompt_ids.clamp(min=0), prompt_ids >= 0)
        constraint = None
        if self.grammar is not None:
            constraint = constrained.ConstrainedRows(self.grammar, self.closing, settings.max_new_tokens, rows,
                                                     self.vocab_size, self.device)

        eos = torch.tensor(self.eos_ids, device=self.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=self.device)
        generated, logprobs = [], []
        for step in range(settings.max_new_tokens):
            # the model's own distribution, before _choose penalises or masks anything (for confidence)
            normalizer = torch.logsumexp(logits, dim=-1) if self.record_logprobs else None
            tokens = self._choose(logits, seen, step, constraint)
            tokens = torch.where(finished, self.pad_id, tokens)
            if constraint is not None:  # forced tokens, and the closers of rows whose budget is nearly spent
                tokens = constraint.settle(tokens)
            generated.append(tokens)
            # _choose only ever sets disallowed tokens to -inf, so a written token's logit is still the model's
            if self.record_logprobs:
                logprobs.append(logits.gather(1, tokens[:, None]).squeeze(1) - normalizer)
            finished |= torch.isin(tokens, eos)
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            # checking for the end costs a device sync: do it every few steps
            last = step == settings.max_new_tokens - 1 or (step % 8 == 7 and bool(finished.all()))
            if not last:
                column = length + step  # where this token's keys and values go
                step_fn.mask[:, 0, 0, column] = True
                cache.position.fill_(column)
                step_fn.ids.copy_(tokens[:, None])
                if step:
                    step_fn.positions += 1
                logits = step_fn(math.ceil((column + 1) / KV_BLOCK) * KV_BLOCK)
            if constraint is not None:  # the host's grammar work, while the GPU runs the forward pass just launched
                constraint.advance(fill=not last)
            if last:
                break
        tokens = torch.stack(generated, dim=1).tolist()  # waits for the device
        token_logprobs = torch.stack(logprobs, dim=1).tolist() if logprobs else [[] for _ in range(rows)]
        decoded = time.perf_counter()
        if step_fn.capture_error:
            self.cuda_graphs = False  # don't try again for every batch
        self.timings.append(
            {"rows": rows, "prompt_length": length, "prefill_seconds": prefilled - started,
             "decode_steps": len(generated), "decode_seconds": decoded - prefilled,
             "cuda_graphs": step_fn.use_graphs, "capture_error": step_fn.capture_error,
             "grammar_host_seconds": constraint.seconds if constraint else None}
        )
        return self._results(items, tokens, token_logprobs, constraint.closers if constraint else None)

    def _results(self, items, generated: list[list[int]], logprobs: list[list[float]], closers) -> list[Generation]:
        results = []
        for row, (item, tokens) in enumerate(zip(items, generated)):
            end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            kept = tokens if end is None else tokens[: end + 1]
            text = self.processor.tokenizer.decode(kept, skip_special_tokens=True)
            prompt = int(item["attention_mask"].sum())
            cut = closers[row].cut_fields if closers else {}
            results.append(Generation(kept, text, prompt, logprobs[row][: len(kept)], cut))
        return results

    # -- many clips -----------------------------------------------------------------

    def run(
        self, clips: list[ClipRef], num_workers: int = 4, load_frames: Callable = sample_frames,
        prepared: Iterator | None = None,
    ) -> Iterator[list[tuple[ClipRef, Generation | None, str | None, float]]]:
        """Caption clips batch by batch: yields [(clip, generation or None, error or None, seconds)].

        Worker processes decode and prepare clips ahead of the model (`prepared_clips`, or
        `prepared` when the caller started them); clips are grouped by prompt length (a window
        of two batches) so batches carry little padding.
        """
        if prepared is None:
            prepared = prepared_clips(clips, self.prepare, self.sampling, self.batch_size, num_workers, load_frames)
        pending: list = []
        for clip, prepared_inputs, error in prepared:
            if error is not None:
                yield [(clip, None, error, 0.0)]
                continue
            pending.append((clip, prepared_inputs))
            if len(pending) >= 2 * self.batch_size:
                pending.sort(key=lambda pair: pair[1]["input_ids"].shape[1])
                batch, pending = pending[: self.batch_size], pending[self.batch_size :]
                yield self._run_batch(batch)
        pending.sort(key=lambda pair: pair[1]["input_ids"].shape[1])
        for start in range(0, len(pending), self.batch_size):
            yield self._run_batch(pending[start : start + self.batch_size])

    def _run_batch(self, batch) -> list[tuple[ClipRef, Generation | None, str | None, float]]:
        start = time.perf_counter()
        try:
            generations = self.generate([prepared for _, prepared in batch])
        except Exception as err:
            logger.exception("generation failed for a batch of %d clips", len(batch))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return [(clip, None, f"generation failed: {type(err).__name__}: {err}", 0.0) for clip, _ in batch]
        seconds = (time.perf_counter() - start) / len(batch)
        return [(clip, generation, None, seconds) for (clip, _), generation in zip(batch, generations)]

