"""Confidence of each answer, from the log-probabilities decoding already computes.

Every written token's log-probability under the model (before any repetition penalty,
grammar mask or temperature) comes with the generation. A field's value is the JSON text
after its key; its tokens are those whose bytes overlap that text.

* Closed-set fields: the probability of the answer chosen, the product of its tokens'
  probabilities (the punctuation around it costs a trained model nothing).
* Free text: the mean token log-probability, labelled as such. The probability of a whole
  sentence shrinks with its length and says little; the mean says how sure each word was.
* The clip: the lowest answer probability of its closed-set fields (avlabel.core.records.clip_confidence).

A model folder's `calibration.json` (avlabel/core/calibration.py) then maps these probabilities to calibrated ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from avlabel.core.records import clip_confidence, short_probability
from avlabel.core.schema import FIELDS_BY_NAME

_SPACE = b" \t\r\n"


def _string_end(text: bytes, start: int) -> int | None:
    """Index after the JSON string opening at `start`, or None when it is not closed."""
    i = start + 1
    while i < len(text):
        if text[i] == 0x5C:  # backslash
            i += 2
        elif text[i] == 0x22:  # "
            return i + 1
        else:
            i += 1
    return None


def _value_end(text: bytes, start: int) -> int | None:
    """Index after the JSON value starting at `start`, or None when the text stops inside it."""
    if start >= len(text):
        return None
    if text[start] == 0x22:
        return _string_end(text, start)
    if text[start] in b"[{":
        depth, i = 0, start
        while i < len(text):
            if text[i] == 0x22:
                end = _string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            depth += text[i] in b"[{"
            depth -= text[i] in b"]}"
            i += 1
            if depth == 0:
                return i
        return None
    i = start
    while i < len(text) and text[i] not in b",}]" and text[i] not in _SPACE:
        i += 1
    return i if i < len(text) else None


def value_spans(text: bytes) -> dict[str, tuple[int, int]]:
    """Byte spans of the top-level values of the first JSON object in `text` (after any reasoning block)."""
    think = text.rfind(b"</think>")
    i = text.find(b"{", think + len(b"</think>") if think >= 0 else 0)
    if i < 0:
        return {}

    def skip(i: int) -> int:
        while i < len(text) and text[i] in _SPACE:
            i += 1
        return i

    spans: dict[str, tuple[int, int]] = {}
    i = skip(i + 1)
    while i < len(text) and text[i] == 0x22:
        key_end = _string_end(text, i)
        if key_end is None:
            break
        colon = skip(key_end)
        if colon >= len(text) or text[colon] != 0x3A:  # :
            break
        start = skip(colon + 1)
        end = _value_end(text, start)
        if end is None:
            break
        try:
            spans[json.loads(text[i:key_end])] = (start, end)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        i = skip(end)
        if i >= len(text) or text[i] != 0x2C:  # ,
            break
        i = skip(i + 1)
    return spans


def answer_confidence(pieces: Sequence[bytes], logprobs: Sequence[float], fields: Iterable[str]) -> dict[str, Any]:
    """Confidence of `fields` in an answer written as tokens with these bytes (`pieces`) and log-probabilities,
    as a caption record holds it: `confidence` ({closed-set field: p}), `text_mean_logprob` ({free-text field:
    mean log-probability}) and `clip_confidence`."""
    spans = value_spans(b"".join(pieces))
    ends = [0]
    for piece in pieces:
        ends.append(ends[-1] + len(piece))
    probability, text_mean = {}, {}
    for name in fields:
        if name not in spans or name not in FIELDS_BY_NAME:
            continue
        start, end = spans[name]
        values = [lp for lp, a, b in zip(logprobs, ends, ends[1:]) if a < end and b > start]
        if FIELDS_BY_NAME[name].closed:
            probability[name] = short_probability(math.exp(sum(values)))
        else:
            text_mean[name] = short_probability(sum(values) / len(values))
    return {"confidence": probability, "text_mean_logprob": text_mean, "clip_confidence": clip_confidence(probability)}
