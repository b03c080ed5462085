"""Turn what a model wrote into a label, saying per field what could not be read.

Models wrap their answer in ways a plain `json.loads` rejects: reasoning in
`<think>...</think>` before it, a ```json fence around it, prose after it, raw newlines
inside strings, trailing commas or single quotes, or an object cut off by the token
limit. `parse_output` takes the first JSON object in the text, repairs common syntax
faults with `json-repair`, and checks every field with `schema.check_label`, so a record
says exactly which fields are usable and why the others are not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from avlabel.core.schema import FIELDS_BY_NAME, WHOLE_LABEL, check_label, json_limit_reason


_THINK_END = re.compile(r"</think\s*>", re.IGNORECASE)
_THINK_START = re.compile(r"<think\s*>", re.IGNORECASE)
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


@dataclass
class ParsedOutput:
    label: dict[str, Any]  # normalized values of the fields that could be read
    errors: dict[str, list[str]] = field(default_factory=dict)  # field (or "<label>") -> reasons

    @property
    def valid(self) -> bool:
        return not self.errors


def _answer_part(raw: str) -> tuple[str, str | None]:
    """The text after any reasoning block, or an error when the reasoning never ends."""
    ends = list(_THINK_END.finditer(raw))
    if ends:
        return raw[ends[-1].end():], None
    start = _THINK_START.search(raw)
    if start:
        return raw[start.end():], "the <think> block is never closed (output cut off during reasoning?)"
    return raw, None


def _closes(text: str) -> bool:
    """True when the first JSON object in `text` is closed (brace depth returns to zero)."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return True
    return False


def _first_object(text: str) -> tuple[Any, bool] | None:
    """(object, cut_off) for the first JSON object in `text`, or None when there is none.

    A strict decode of each `{` in turn comes first (it ignores prose after the object);
    `strict=False` lets raw control characters such as newlines sit inside strings. Only
    when no `{` starts a well-formed object does json-repair fix the first one.
    """
    starts = [m.start() for m in re.finditer(r"\{", text)]
    if not starts:
        return None
    decoder = json.JSONDecoder(strict=False)
    for start in starts:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and (not value or any(key in FIELDS_BY_NAME for key in value)):
            return value, False
    import json_repair

    candidate = text[starts[0]:]
    value = json_repair.loads(candidate)
    if not isinstance(value, dict):
        return None
    return value, not _closes(candidate)


def parse_output(raw: str) -> ParsedOutput:
    """Read a model's raw text as a label; never raises."""
    problems: dict[str, list[str]] = {}
    text, think_problem = _answer_part(raw)
    fenced = _FENCE.search(text)
    if fenced and "{" in fenced.group(1):
        text = fenced.group(1)
    try:
        found = _first_object(text)
    except (ValueError, RecursionError) as err:  # JSON past a limit of Python's reader: nesting, or a huge integer
        return ParsedOutput(label={}, errors={WHOLE_LABEL: [f"the JSON object can't be read ({json_limit_reason(err)})"]})
    if found is None:
        reason = think_problem or "no JSON object in the output"
        return ParsedOutput(label={}, errors={WHOLE_LABEL: [reason]})
    value, cut_off = found
    label, field_problems = check_label(value)
    problems.update(field_problems)
    if cut_off:
        problems.setdefault(WHOLE_LABEL, []).append("the JSON object is not closed (output cut off by the token limit?)")
        # the value being written when the text stopped may be incomplete: don't trust it
        last = next((key for key in reversed(list(value)) if key in label), None)
        if last is not None:
            del label[last]
            problems.setdefault(last, []).append("may be incomplete: the output stopped inside or right after it")
    return ParsedOutput(label=label, errors=problems)
