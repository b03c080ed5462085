"""Constrained greedy decoding without a model, two ways: as `CaptionEngine` did it before `ConstrainedRows`,
one row at a time, and with `ConstrainedRows` as the engine drives it now.

`per_row_decode`: the grammar with the text limits in it; each row's matcher fills its own mask row; then,
row by row, the closing rule (a token that would leave fewer tokens than the shortest completion then needs
starts that completion instead; far from the end, `plan.slack` says no check is needed) and the matcher
accepts the token. `batched_decode` must write exactly the same tokens (tests/test_constrained.py), and
bench/constrained_host.py times the two against each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from avlabel.core.schema import FIELD_NAMES
from avlabel.infer import constrained


def per_row_decode(plan: constrained.ClosingPlan, grammar, vocab_size: int, budget: int, rows: int, scores_at: Callable,
                   steps: int | None = None):
    """Greedy decoding of `rows` rows under the grammar (bounded: `compile_grammar`'s default) within `budget`
    tokens, stopped after `steps` if given; `scores_at(step)`: the model's scores, (rows, vocab_size) on the CPU.
    Returns each row's tokens (up to its stop token), each row's cut fields, and the host's seconds per step:
    filling the masks, and the closers with the matchers."""
    import xgrammar as xgr

    matchers = [xgr.GrammarMatcher(grammar) for _ in range(rows)]
    cursors = [constrained._Cursor() for _ in range(rows)]
    forced, cut, written = [[] for _ in range(rows)], [() for _ in range(rows)], [[] for _ in range(rows)]
    bitmask = xgr.allocate_token_bitmask(rows, vocab_size)
    seconds = {"fill": [], "closers_and_accept": []}
    for step in range(budget if steps is None else min(steps, budget)):
        start = time.perf_counter()
        live = [not matcher.is_terminated() for matcher in matchers]
        if not any(live):
            break
        for row, matcher in enumerate(matchers):
            if live[row]:
                matcher.fill_next_token_bitmask(bitmask, row)
            else:  # a finished row: its token is padding
                bitmask[row] = -1
        filled = time.perf_counter()
        scores = scores_at(step)
        xgr.apply_token_bitmask_inplace(scores, bitmask)
        proposed = scores.argmax(dim=-1).tolist()
        chosen = time.perf_counter()
        left = budget - step - 1  # tokens left after this one
        for row in range(rows):
            if not live[row]:
                continue
            token, cursor = proposed[row], cursors[row]
            if not forced[row] and token not in plan.stop_ids:
                if left >= plan.slack[cursor.segment]:
                    cursor.feed(plan, plan.token_bytes[token])
                else:
                    trial = cursor.copy()
                    trial.feed(plan, plan.token_bytes[token])
                    if plan.need(trial) <= left:
                        cursors[row] = trial
                    else:
                        forced[row], cut[row] = plan.completion(cursor), FIELD_NAMES[cursor.segment:]
            if forced[row]:
                token = forced[row].pop(0)
                cursors[row].feed(plan, plan.token_bytes[token])
            if not matchers[row].accept_token(token):
                raise RuntimeError(f"the label grammar rejected token {token} chosen for row {row}")
            written[row].append(token)
        seconds["fill"].append(filled - start)
        seconds["closers_and_accept"].append(time.perf_counter() - chosen)
    ends = [next((i + 1 for i, t in enumerate(tokens) if t in plan.stop_ids), len(tokens)) for tokens in written]
    cut_fields = [{**dict.fromkeys(cursor.capped, constrained.CUT_BY_LENGTH),
                   **dict.fromkeys(names, constrained.CUT_BY_BUDGET)} for cursor, names in zip(cursors, cut)]
    return [tokens[:end] for tokens, end in zip(written, ends)], cut_fields, seconds


def batched_decode(plan: constrained.ClosingPlan, grammar, vocab_size: int, budget: int, rows: int, scores_at: Callable):
    """The same with `ConstrainedRows`, driven as `CaptionEngine._generate_rows` drives it (`grammar`: the engine's,
    without text limits). Returns the tokens and cut fields, the host's seconds per step (what the GPU waits for,
    and what runs beside its forward pass) and the seconds to the first mask."""
    import torch

    seconds = {"settle (GPU waits)": [], "advance (beside the forward pass)": []}
    start = time.perf_counter()
    batch = constrained.ConstrainedRows(grammar, plan, budget, rows, vocab_size, "cpu")
    first_mask = time.perf_counter() - start
    stops = torch.tensor(sorted(plan.stop_ids))
    finished = torch.zeros(rows, dtype=torch.bool)
    steps = []
    for step in range(budget):
        scores = scores_at(step)
        batch.mask_logits(scores)
        proposed = torch.where(finished, min(plan.stop_ids), scores.argmax(dim=-1))  # padding: a stop token
        start = time.perf_counter()
        tokens = batch.settle(proposed)
        settled = time.perf_counter()
        steps.append(tokens)
        finished |= torch.isin(tokens, stops)
        last = step == budget - 1 or bool(finished.all())
        batch.advance(fill=not last)
        seconds["settle (GPU waits)"].append(settled - start)
        seconds["advance (beside the forward pass)"].append(time.perf_counter() - settled)
        if last:
            break
    written = torch.stack(steps, dim=1).tolist()
    ends = [next((i + 1 for i, t in enumerate(row) if t in plan.stop_ids), len(row)) for row in written]
    return [row[:end] for row, end in zip(written, ends)], [c.cut_fields for c in batch.closers], seconds, first_mask
