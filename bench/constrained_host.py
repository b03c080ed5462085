"""Host-side cost of constrained decoding per decode step: 128 rows, the real Qwen vocabulary, no model.

A decode step of the 7B at batch 128 takes about 20 ms on an H200 (BENCHMARKS.md); `--constrained`
adds grammar work on the host each step: filling every row's token mask, the closers' budget checks
and the matchers accepting the tokens. This times that work alone, with random scores standing in
for the model's (what a model with random weights writes under the grammar: any text the grammar
allows, closed by the budget), two ways in one run over the same scores:

* per_row: the engine's loop before `ConstrainedRows` (tests/constrained_reference.py): the grammar with
  the text limits in it, whose masks xgrammar fills in up to seconds a row inside free text; each matcher
  fills its row, then each row's closer and matcher run in turn, all before the next forward pass can
  start. Too slow to run whole: `--per_row_rows` rows over the first `--per_row_steps` steps, scaled
  to `--rows` (its cost is per row), and compared with the batched path over the same steps;
* batched: `infer.constrained.ConstrainedRows` as `CaptionEngine` drives it, with the grammar without
  text limits (kept on the host instead): `settle`, the part the GPU waits for (forced tokens, and the
  closers of rows whose budget is nearly spent), and `advance`, which runs while the GPU computes the
  next forward pass (the other closers, one batched accept, xgrammar's multithreaded mask fill on
  half the cores, the text limits).

Both must write the same tokens where both ran (checked). Applying the masks to the scores is device work in the
engine and is not counted here. Writes bench/results/constrained_host.json (or `--out`).

    python bench/constrained_host.py [--rows 128] [--budget 400] [--max_text_chars 2000]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from avlabel.core.schema import TEXT_FIELD_NAMES  # noqa: E402
from avlabel.demo.tiny_model import build_tokenizer  # noqa: E402
from avlabel.infer import constrained  # noqa: E402
from constrained_reference import batched_decode, per_row_decode  # noqa: E402

CONFIG = REPO / "bench" / "configs" / "qwen2_5_vl_7b.json"  # its vocab_size: the rows of the model's scores
EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>, as bench/infer_7b.py


def ms_per_step(seconds: dict[str, list[float]], steps: int, scale: float = 1.0) -> dict[str, float]:
    """Mean milliseconds per step over the first `steps` steps, each part and in all, times `scale`."""
    parts = {name: 1000 * scale * sum(values[:steps]) / min(steps, len(values)) for name, values in seconds.items()}
    return {name: round(value, 3) for name, value in {**parts, "total": sum(parts.values())}.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="decode batch size")
    parser.add_argument("--budget", type=int, default=400, help="max_new_tokens (bench/infer_7b.py's --tokens)")
    parser.add_argument("--answer_format", default="fenced", choices=sorted(constrained.LAYOUTS))
    parser.add_argument("--max_text_chars", type=int, default=constrained.DEFAULT_MAX_CHARS,
                        help="longest free text (default: a model that saved no limits, as in bench/infer_7b.py)")
    parser.add_argument("--per_row_rows", type=int, default=2,
                        help="rows the per-row path decodes (its cost is per row: scaled to --rows)")
    parser.add_argument("--per_row_steps", type=int, default=80,
                        help="steps the per-row path decodes (its masks take seconds a row inside free text)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "constrained_host.json"))
    args = parser.parse_args()

    vocab_size = json.loads(CONFIG.read_text())["vocab_size"]
    tokenizer = build_tokenizer("qwen2_5_vl", "qwen")
    config = constrained.AnswerConfig(args.answer_format, dict.fromkeys(TEXT_FIELD_NAMES, args.max_text_chars))
    info = constrained.tokenizer_info(tokenizer, vocab_size, EOS_IDS)
    plan = constrained.closing_plan(tokenizer, config, constrained.token_bytes(info), EOS_IDS)
    bounded = constrained.compile_grammar(info, config)  # the engine's grammar before
    unbounded = constrained.compile_grammar(info, config, bounded=not plan.limits_text)  # CaptionEngine's now
    # a few score tables used in turn: drawing 128 x 152k normal numbers every step would dominate the run
    generator = torch.Generator().manual_seed(args.seed)
    pool = [torch.randn(args.rows, vocab_size, generator=generator) * 4 for _ in range(4)]

    def scores_at(step: int) -> torch.Tensor:
        return pool[step % len(pool)].roll(step, dims=0)  # a copy: masking writes into it

    print(f"{args.rows} rows, budget {args.budget}, {config.answer_format}, text limit {args.max_text_chars}, "
          f"vocabulary {vocab_size}, {os.cpu_count()} CPUs", flush=True)
    written, cut, batched, first_mask = batched_decode(plan, unbounded, vocab_size, args.budget, args.rows, scores_at)
    steps = len(batched["settle (GPU waits)"])
    print(f"batched: {steps} steps, {ms_per_step(batched, steps)} ms per step", flush=True)
    few, short = args.per_row_rows, min(args.per_row_steps, steps)
    reference, reference_cut, per_row = per_row_decode(
        plan, bounded, vocab_size, args.budget, few, lambda step: scores_at(step)[:few], steps=short)
    if reference != [tokens[:short] for tokens in written[:few]] or (short == steps and reference_cut != cut[:few]):
        raise SystemExit("the batched path wrote other tokens than the per-row path: a bug, not a benchmark result")

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "xgrammar": importlib.metadata.version("xgrammar"), "torch": torch.__version__},
        "rows": args.rows, "budget": args.budget, "answer_format": args.answer_format,
        "max_text_chars": args.max_text_chars, "vocab_size": vocab_size, "min_budget": plan.min_budget,
        "steps": steps, "tokens_per_row": round(sum(map(len, written)) / args.rows, 1),
        "rows_cut_by_budget": sum(constrained.CUT_BY_BUDGET in c.values() for c in cut),
        "batched_first_mask_ms": round(1000 * first_mask, 3),
        "batched_ms_per_step": ms_per_step(batched, steps),
        f"batched_ms_per_step_first_{short}": ms_per_step(batched, short),
        f"per_row_ms_per_step_first_{short}": {
            **ms_per_step(per_row, short, args.rows / few),
            "measured": f"{few} rows x {short} steps, scaled to {args.rows} rows (the per-row loop's cost is per row)"},
        "same_tokens": f"checked on the {few} rows and {short} steps both paths decoded",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
