"""Constrained decoding that always ends in a valid label, within the token budget.

A grammar alone restricts which token may come next; it does not bound how long a string
runs, nor keep the tokens needed to close the object. This module adds both, in pieces
that hold no engine state: `label_grammar` is plain EBNF (xgrammar's dialect, which vLLM's
structured outputs also take), and `AnswerCloser` needs only each row's proposed token and
the right to replace it (the batched engine drives them through `ConstrainedRows`).

* `AnswerConfig`: the layout of the answer (the `answer_format` the model was trained
  with) and the longest text each free-text field may hold. Training saves it beside
  `sampling_config.json` (`answer_config.json`), with each limit `TEXT_LIMIT_FACTOR` times
  the longest human answer of that field in the training split; a model without one gets
  `DEFAULT_MAX_CHARS`; `--max_text_chars` overrides both.
* `label_grammar`: the label as an EBNF grammar (xgrammar's dialect). It is written from
  the schema here, not converted from a JSON Schema, because xgrammar's converter can't
  express three things a valid label needs: the exact layout `format_answer` trains (a
  fenced, indented block), length-bounded strings that still allow JSON escapes, and a
  first character that is not blank in required text (`check_label` rejects blank text).
* `ClosingPlan` and `AnswerCloser`: budget-aware closing. Every field is required and
  comes in schema order with no free whitespace, so the shortest way to finish from any
  point is known from the schema: the rest of the value being written, then the
  shortest valid value of each later field. Before a row accepts a token, its closer
  checks that the tokens left after it still cover that completion; a token that would
  leave too few is replaced by the completion, written out token by token. The fields
  it had to fill are reported as cut. Searching the grammar matcher for the shortest
  completion would be general but costs a vocabulary-wide search per step; this check
  is one comparison for a token of free text, a few byte comparisons for others, and
  runs the exact count only near the end.
* `ConstrainedRows`: the host side for the rows of a decode batch, laid out around the
  GPU's step: masks filled by xgrammar's batched, multithreaded fill while the next
  forward pass runs, applied on the device; forced tokens written there; the host made
  to wait only for rows whose budget is nearly spent.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Literal

from avlabel.core.loading import saved_with_model
from avlabel.core.schema import FIELD_NAMES, FIELDS, TEXT_FIELD_NAMES, LabelField

ANSWER_FILE = "answer_config.json"  # in a model folder, beside sampling_config.json
AnswerFormat = Literal["fenced", "plain"]  # the answer layouts (LAYOUTS below); the type of an --answer_format flag
DEFAULT_FORMAT: AnswerFormat = "fenced"  # training's default answer_format
DEFAULT_MAX_CHARS = 2000  # a free-text field of a model that saved no limits
TEXT_LIMIT_FACTOR = 2  # data-derived limit: this many times the longest human answer of the field
MIN_MAX_CHARS = 32  # floor of a data-derived limit (a field whose answers were short or all null)
PLACEHOLDER = "..."  # the text of a required free-text field cut before its first character
CUT_BY_BUDGET = "token budget"
CUT_BY_LENGTH = "length limit"


@dataclass(frozen=True)
class Layout:
    """Where `train.collator.format_answer` puts its punctuation (tests check the two agree)."""

    prefix: str
    field_sep: str
    key_sep: str
    suffix: str
    array_open: str
    array_sep: str
    array_close: str


LAYOUTS: dict[AnswerFormat, Layout] = {
    "plain": Layout("{", ", ", ": ", "}", "[", ", ", "]"),  # json.dumps' default separators
    "fenced": Layout("```json\n{\n  ", ",\n  ", ": ", "\n}\n```", "[\n    ", ",\n    ", "\n  ]"),  # indent=2
}


# ----------------------------------------------------------------------------- the answer's layout and limits


@dataclass(frozen=True)
class AnswerConfig:
    """The layout a model writes its answer in, and the longest text of each free-text field."""

    answer_format: str = DEFAULT_FORMAT
    max_chars: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TEXT_FIELD_NAMES, DEFAULT_MAX_CHARS))
    source: str = f"default ({DEFAULT_MAX_CHARS} characters a field)"

    def __post_init__(self):
        if self.answer_format not in LAYOUTS:
            raise ValueError(f"answer_format: {self.answer_format!r} is not one of {', '.join(LAYOUTS)}")
        if set(self.max_chars) != set(TEXT_FIELD_NAMES):
            raise ValueError(f"max_chars must name exactly the free-text fields {', '.join(TEXT_FIELD_NAMES)}")
        short = {name: n for name, n in self.max_chars.items() if n < len(PLACEHOLDER)}
        if short:
            raise ValueError(f"max_chars: {short} below {len(PLACEHOLDER)}, the length of the placeholder a cut field holds")

    @classmethod
    def from_labels(cls, labels: Iterable[dict[str, Any]], answer_format: str = DEFAULT_FORMAT) -> AnswerConfig:
        """Limits from human labels: `TEXT_LIMIT_FACTOR` x the longest answer of each field."""
        longest, count = dict.fromkeys(TEXT_FIELD_NAMES, 0), 0
        for label in labels:
            count += 1
            for name in TEXT_FIELD_NAMES:
                longest[name] = max(longest[name], len(label.get(name) or ""))
        if not count:
            raise ValueError("no labels to derive text limits from")
        limits = {name: max(MIN_MAX_CHARS, math.ceil(TEXT_LIMIT_FACTOR * n)) for name, n in longest.items()}
        return cls(answer_format, limits, f"{TEXT_LIMIT_FACTOR} x the longest of {count} training answers")

    @classmethod
    def for_model(cls, *sources: str | Path | None, answer_format: str | None = None,
                  max_text_chars: int | None = None) -> AnswerConfig:
        """The config saved with a model (the first of `sources` that has one), else the defaults, then overrides."""
        saved = saved_with_model(sources, ANSWER_FILE, "answer config", cls) or cls()
        if answer_format is not None:
            saved = cls(answer_format, saved.max_chars, saved.source)
        if max_text_chars is not None:
            if max_text_chars < len(PLACEHOLDER):
                from avlabel.core.errors import UsageError

                raise UsageError(f"--max_text_chars {max_text_chars}: give at least {len(PLACEHOLDER)}, the length of "
                                 "the placeholder a cut free-text field holds")
            saved = cls(saved.answer_format, dict.fromkeys(TEXT_FIELD_NAMES, max_text_chars), f"--max_text_chars {max_text_chars}")
        return saved

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / ANSWER_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- grammar


def _closed_values(spec: LabelField) -> list[str]:
    """Every complete JSON text of a single-valued closed field, as `label_to_json` writes it."""
    values = [json.dumps(int(c)) if spec.kind == "difficulty" else json.dumps(c) for c in spec.choices]
    return values + ["null"] if spec.nullable else values


def _ranges(codes: Sequence[int]) -> str:
    """Code points as an EBNF character-class body of ranges."""
    out, start = [], None
    for i, code in enumerate(codes):
        start = code if start is None else start
        if i + 1 == len(codes) or codes[i + 1] != code + 1:
            out.append(f"\\U{start:08x}" if start == code else f"\\U{start:08x}-\\U{code:08x}")
            start = None
    return "".join(out)


@cache
def _blank_beyond_ascii() -> str:
    # check_label's clean_text strips exactly what str.isspace calls space (tests check it)
    return _ranges([c for c in range(0x7F, sys.maxunicode + 1) if chr(c).isspace()])


def _lit(text: str) -> str:
    return json.dumps(text)  # an EBNF string literal: xgrammar reads JSON's escapes


def label_grammar(config: AnswerConfig, bounded: bool = True) -> str:
    """The label in `config`'s layout as an EBNF grammar (root rule `root`).

    `bounded=False` leaves the length of free text open: xgrammar fills a mask for a repeated rule
    (`text_char{0,2000}`) by checking the vocabulary token by token, up to seconds a row inside a
    string, against microseconds for `text_char*`. `ConstrainedRows` then keeps each text within its
    limit itself (`ClosingPlan.text_limit_mask`), which allows exactly the tokens the bounded grammar allows.
    """
    layout = LAYOUTS[config.answer_format]
    rules = [
        # a character of JSON string text: anything but controls, quote, backslash and lone surrogates (which
        # xgrammar would take as bytes and no UTF-8 file can hold), or an escape other than \uXXXX (same reason)
        'text_char ::= [^\\0-\\x1f"\\\\\\ud800-\\udfff] | "\\\\" ["\\\\/bfnrt]',
        f'text_first ::= [^\\0-\\x20"\\\\\\ud800-\\udfff{_blank_beyond_ascii()}] | "\\\\" ["\\\\/]',
    ]
    root = []
    for i, spec in enumerate(FIELDS):
        root += [_lit((layout.prefix if i == 0 else layout.field_sep) + json.dumps(spec.name) + layout.key_sep), f"field_{i}"]
        if spec.kind == "text":
            most = config.max_chars[spec.name]
            chars, rest = (f"{{0,{most}}}", f"{{0,{most - 1}}}") if bounded else ("*", "*")
            body = f'"\\"" text_char{chars} "\\""' if spec.nullable else f'"\\"" text_first text_char{rest} "\\""'
            rule = f'{body} | "null"' if spec.nullable else body
        elif spec.kind == "multi_category":
            rules.append(f"item_{i} ::= " + " | ".join(_lit(json.dumps(c)) for c in spec.choices))
            rule = (f'"[]" | {_lit(layout.array_open)} item_{i} ({_lit(layout.array_sep)} item_{i})* '
                    f"{_lit(layout.array_close)}")
            rule = f'{rule} | "null"' if spec.nullable else rule
        else:
            rule = " | ".join(map(_lit, _closed_values(spec)))
        rules.append(f"field_{i} ::= {rule}")
    return "\n".join(["root ::= " + " ".join(root + [_lit(layout.suffix)]), *rules]) + "\n"


# ----------------------------------------------------------------------------- budget-aware closing


def _continuations(lead: int) -> int:
    """How many continuation bytes follow a UTF-8 lead byte."""
    return 1 if lead < 0xE0 else 2 if lead < 0xF0 else 3


def _continuation(lead: int, first: bool) -> int:
    """A UTF-8 continuation byte that finishes a character started by `lead` as a valid, non-blank one."""
    if first and lead == 0xED:
        return 0x9F  # ED A0..BF would be a surrogate
    if first and lead == 0xF4:
        return 0x8F  # F4 90.. is past U+10FFFF
    return 0xBF  # ...BF ends no blank code point (U+2000..200A, U+3000, ... all end elsewhere)


class _Cursor:
    """Where a row is in the label: segment (field index; len(FIELDS) = the closing suffix; one more: done),
    how much of the segment's head (separator and key) is written, and the state of its value."""

    __slots__ = ("segment", "head", "value", "quoted", "chars", "escape", "pending", "lead", "capped")

    def __init__(self):
        self.segment, self.head, self.value = 0, 0, b""
        self.quoted, self.chars, self.escape, self.pending, self.lead = False, 0, False, 0, 0
        self.capped: tuple[str, ...] = ()  # free-text fields that reached their length limit

    def copy(self) -> _Cursor:
        other = _Cursor.__new__(_Cursor)
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        return other

    def _next_segment(self):
        self.segment, self.head, self.value = self.segment + 1, 0, b""
        self.quoted, self.chars, self.escape, self.pending = False, 0, False, 0

    def feed(self, plan: ClosingPlan, data: bytes) -> None:
        for byte in data:
            if self.segment > len(FIELDS):
                raise ValueError("text after the end of the label (the grammar should have stopped it)")
            head = plan.heads[self.segment]
            if self.head < len(head):
                self.head += 1
                if self.head == len(head) and self.segment == len(FIELDS):
                    self._next_segment()
                continue
            spec = FIELDS[self.segment]
            if self.quoted:  # inside free text: count characters, find the closing quote
                if self.pending:
                    self.pending -= 1
                elif self.escape:
                    self.escape = False
                elif byte == 0x22:  # "
                    if self.chars == plan.config.max_chars[spec.name]:
                        self.capped += (spec.name,)
                    self._next_segment()
                else:
                    self.chars += 1
                    if byte == 0x5C:  # backslash
                        self.escape = True
                    elif byte >= 0xC0:
                        self.lead, self.pending = byte, _continuations(byte)
                continue
            self.value += bytes((byte,))
            if spec.kind == "text" and self.value == b'"':
                self.quoted = True
            elif plan.complete(self.segment, self.value.decode()):
                self._next_segment()

    def finish(self, plan: ClosingPlan) -> tuple[bytes, str]:
        """The shortest end of the current segment: (raw bytes finishing a character, then text)."""
        if self.segment > len(FIELDS):
            return b"", ""
        head = plan.heads[self.segment]
        if self.head < len(head):
            return b"", head[self.head:].decode() + plan.shortest[self.segment]
        spec = FIELDS[self.segment]
        if not self.quoted:
            return b"", plan.rest_of_closed(self.segment, self.value.decode())
        first = self.pending == _continuations(self.lead)
        raw = bytes(_continuation(self.lead, first and i == 0) for i in range(self.pending))
        text = "\\" if self.escape else ""  # a backslash after a backslash: an escaped backslash
        if self.chars == 0 and not spec.nullable:
            text += PLACEHOLDER
        return raw, text + '"'


def _text_units(piece: bytes, start: int = 0) -> int:
    """Characters of JSON string text in `piece[start:]` before its first unescaped quote, counted as `_Cursor.feed`
    counts them (an escape is one, a character is counted at its first byte)."""
    units = pending = 0
    escape = False
    for byte in piece[start:]:
        if pending:
            pending -= 1
        elif escape:
            escape = False
        elif byte == 0x22:  # "
            break
        else:
            units += 1
            if byte == 0x5C:  # backslash
                escape = True
            elif byte >= 0xC0:
                pending = _continuations(byte)
    return units


def _packed(allowed) -> Any:
    """A boolean row over the vocabulary as a row of xgrammar's bitmask (int32 words, token 32w + j at bit j)."""
    import numpy as np

    allowed = np.pad(allowed, (0, -len(allowed) % 32), constant_values=True)
    return np.packbits(allowed, bitorder="little").view("<i4")


def _plain_chars(piece: bytes) -> int:
    """How many characters `piece` adds to JSON string text (what `_Cursor.feed` counts byte by byte),
    or -1 unless it is whole UTF-8 characters without a quote or a backslash."""
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return -1
    return len(text) if text and '"' not in text and "\\" not in text else -1


class ClosingPlan:
    """What closing needs for one tokenizer and answer config: the shortest value of each field,
    the tokens that finish the label from each field on, and the fewest tokens a label takes.

    `encode` turns text into token ids (no special tokens); `token_bytes[id]` is the bytes a
    token writes (`token_bytes(tokenizer_info(...))`; only the closers need it).
    """

    def __init__(self, config: AnswerConfig, encode: Callable[[str], list[int]],
                 token_bytes: Sequence[bytes] | None = None, stop_ids: Iterable[int] = ()):
        self.config, self.encode, self.token_bytes, self.stop_ids = config, encode, token_bytes, frozenset(stop_ids)
        self.layout = layout = LAYOUTS[config.answer_format]
        self.heads = [((layout.prefix if i == 0 else layout.field_sep) + json.dumps(spec.name) + layout.key_sep).encode()
                      for i, spec in enumerate(FIELDS)] + [layout.suffix.encode()]
        self._length = cache(lambda text: len(encode(text)))
        self.values = {i: _closed_values(spec) for i, spec in enumerate(FIELDS) if spec.kind != "text"}
        self.items = {i: [json.dumps(c) for c in spec.choices] for i, spec in enumerate(FIELDS)}
        self.shortest = [self._fewest_tokens(self._candidates(spec)) for spec in FIELDS] + [""]
        # tail_texts[i]: segments i.. written with their shortest values (empty once past the suffix);
        # a cursor in segment i finishes it, then writes tails[i + 1]
        self.tail_texts = ["".join(self.heads[j].decode() + self.shortest[j] for j in range(i, len(FIELDS) + 1))
                           for i in range(len(FIELDS) + 3)]
        self.tails = [encode(text) if text else [] for text in self.tail_texts]
        self.byte_tokens: dict[int, int] = {}  # byte -> the id of a token writing just that byte
        for i, piece in enumerate(token_bytes or ()):
            if len(piece) == 1:
                self.byte_tokens.setdefault(piece[0], i)
        self.min_budget = self.need(_Cursor())
        # inside free text, a token of whole characters with no quote or backslash leaves the shortest completion
        # as it was (the closing quote, then the tail): closers take such tokens with one comparison
        self.plain_chars = [_plain_chars(piece) for piece in token_bytes or ()]
        self._inside: dict[int, Any] = {}  # text_limit_mask's tables, made when first needed
        self._opening: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.string_need = [self._length('"') + len(self.tails[i + 1]) for i in range(len(FIELDS))]
        # a bound on `need` from any point of segment i on (tokens never outnumber the bytes they write):
        # while more tokens than this are left, no check is needed
        most = [max(len(self.tails[i]), len(head) + self._longest_value(spec) + len(self.tails[i + 1]))
                for i, (head, spec) in enumerate(zip(self.heads, FIELDS))] + [len(self.tails[len(FIELDS)])]
        self.slack = [max(most[i:]) for i in range(len(most))] + [0]

    def _candidates(self, spec: LabelField) -> list[str]:
        if spec.kind == "text":
            return ["null", '""'] if spec.nullable else [json.dumps(PLACEHOLDER)]
        if spec.kind == "multi_category":
            return ["[]", "null"] if spec.nullable else ["[]"]
        return _closed_values(spec)

    def _fewest_tokens(self, texts: Iterable[str]) -> str:
        return min(texts, key=lambda text: (self._length(text), len(text)))

    def _longest_value(self, spec: LabelField) -> int:
        layout = self.layout
        if spec.kind == "text":
            return 4 + 1 + len(json.dumps(PLACEHOLDER)) + 4  # a character's last bytes, an escape, placeholder, "null"
        if spec.kind == "multi_category":
            item = max(map(len, self.items[FIELDS.index(spec)]))
            return len(layout.array_open) + len(layout.array_sep) + 2 * item + len(layout.array_close) + 4
        return max(map(len, _closed_values(spec)))

    # -- values of closed-set fields (and null) -----------------------------------

    def complete(self, segment: int, value: str) -> bool:
        """Whether `value` is a whole value of a closed-set field (or a whole null)."""
        if value == "null":
            return True
        if FIELDS[segment].kind == "multi_category":
            layout = self.layout
            return value == "[]" or (len(value) > len(layout.array_open) and value.startswith(layout.array_open)
                                     and value.endswith(layout.array_close))  # no item holds the closing text
        return value in self.values.get(segment, ())

    def rest_of_closed(self, segment: int, value: str) -> str:
        """The shortest text that completes `value`, the start of a closed-set value (or of null)."""
        spec = FIELDS[segment]
        if not value:
            return self.shortest[segment]
        if value.startswith("n"):
            return "null"[len(value):]
        if spec.kind != "multi_category":
            return self._fewest_tokens([v for v in self.values[segment] if v.startswith(value)])[len(value):]
        layout, items = self.layout, self.items[segment]
        smallest = self._fewest_tokens(items)
        if "[]".startswith(value):
            return "]"
        if not value.startswith(layout.array_open):
            return layout.array_open[len(value):] + smallest + layout.array_close
        rest = value[len(layout.array_open):]
        while True:
            item = next((s for s in items if rest.startswith(s)), None)
            if item is None:  # inside an item
                return self._fewest_tokens([s for s in items if s.startswith(rest)])[len(rest):] + layout.array_close
            rest = rest[len(item):]
            if rest.startswith(layout.array_sep):
                rest = rest[len(layout.array_sep):]
                continue
            if layout.array_close.startswith(rest):
                return layout.array_close[len(rest):]
            return layout.array_sep[len(rest):] + smallest + layout.array_close

    # -- free-text limits, for the grammar without them (ConstrainedRows) ---------

    @cached_property
    def limits_text(self) -> bool:
        """Whether `text_limit_mask` is exact for this tokenizer. It is when no token holds the whole head of a
        free-text field: then a token can write into one string only, the one open or the one it opens."""
        joined = b"\0".join(self.token_bytes)  # no head holds a zero byte: a match lies within one token
        return not any(self.heads[i] in joined for i, spec in enumerate(FIELDS) if spec.kind == "text")

    def text_limit_mask(self, cursor: _Cursor):
        """The tokens that keep the free text open at `cursor` (or opened by the next token) within its limit, as
        a row of xgrammar's bitmask; None where no token can overrun it. With `label_grammar(bounded=False)`,
        this allows exactly what the bounded grammar allows."""
        import numpy as np

        segment = cursor.segment
        if segment >= len(FIELDS) or FIELDS[segment].kind != "text" or (cursor.value and not cursor.quoted):
            return None  # no free text here, or a null being written
        most = self.config.max_chars[FIELDS[segment].name]
        if cursor.quoted:
            units, longest = self._units_inside(1 if cursor.escape else cursor.pending)
            left = most - cursor.chars
            return None if left >= longest else _packed(units <= left)
        if most >= self._longest_quoted:
            return None  # no token writes that many characters after a quote
        over = [token for token, units in self._units_opening(segment, cursor.head) if units > most]
        if not over:
            return None
        allowed = np.ones(len(self.token_bytes), dtype=bool)
        allowed[over] = False
        return _packed(allowed)

    def _units_inside(self, skip: int):
        """Each token's characters in an open string whose next `skip` bytes end an escape or a character; the most."""
        import numpy as np

        if skip not in self._inside:
            units = np.array([n if n >= 0 and not skip else _text_units(piece, skip)
                              for n, piece in zip(self.plain_chars, self.token_bytes)])
            self._inside[skip] = units, int(units.max())
        return self._inside[skip]

    @cached_property
    def _quoted(self) -> list[tuple[int, bytes]]:
        return [(token, piece) for token, piece in enumerate(self.token_bytes) if b'"' in piece]

    @cached_property
    def _longest_quoted(self) -> int:
        return max((len(piece) for _, piece in self._quoted), default=0)

    def _units_opening(self, segment: int, head: int) -> list[tuple[int, int]]:
        """(token, characters it writes into the string) of each token opening field `segment`'s string from
        `head` bytes into its head."""
        if (segment, head) not in self._opening:
            prefix = self.heads[segment][head:] + b'"'
            self._opening[segment, head] = [(token, _text_units(piece, len(prefix))) for token, piece in self._quoted
                                            if piece.startswith(prefix)]
        return self._opening[segment, head]

    # -- budget --------------------------------------------------------------------

    def need(self, cursor: _Cursor) -> int:
        """Tokens of the shortest completion from `cursor` (what `completion` would write)."""
        if cursor.head == 0:  # between fields: the rest of the label in one piece
            return len(self.tails[cursor.segment])
        raw, text = cursor.finish(self)
        return len(raw) + (self._length(text) if text else 0) + len(self.tails[cursor.segment + 1])

    def completion(self, cursor: _Cursor) -> list[int]:
        if cursor.head == 0:
            return list(self.tails[cursor.segment])
        raw, text = cursor.finish(self)
        missing = [byte for byte in raw if byte not in self.byte_tokens]
        if missing:
            raise ValueError(f"the tokenizer has no token for the byte {missing[0]:#x}, needed to finish a character")
        return [self.byte_tokens[byte] for byte in raw] + (self.encode(text) if text else []) + self.tails[cursor.segment + 1]

    def closer(self, budget: int) -> AnswerCloser:
        if budget < self.min_budget:
            raise ValueError(budget_error(budget, self.min_budget, self.config))
        return AnswerCloser(self, budget)


def budget_error(budget: int, minimum: int, config: AnswerConfig) -> str:
    return (f"--max_new_tokens {budget} is below {minimum}, the fewest tokens a valid label takes with this "
            f"tokenizer ({config.answer_format} answers); give --max_new_tokens {minimum} or more")


class AnswerCloser:
    """One row's closing rule: `next_token(proposed)` returns the token to write, the proposed one or,
    once the budget is only just enough, the next token of the shortest completion."""

    def __init__(self, plan: ClosingPlan, budget: int):
        self.plan, self.left = plan, budget
        self.cursor = _Cursor()
        self.forced: list[int] = []  # the rest of the completion being written, last token first
        self.cut: tuple[str, ...] = ()  # fields the budget cut (their values are placeholders or truncated)

    def needs_check(self) -> bool:
        """Whether `next_token` may replace the next proposed token (else it returns it, or the forced one)."""
        return not self.forced and self.left - 1 < self.plan.slack[self.cursor.segment]

    def next_token(self, proposed: int) -> int:
        plan, cursor = self.plan, self.cursor
        self.left -= 1  # the tokens left after this one
        if not self.forced:
            if proposed in plan.stop_ids:
                return proposed
            chars = plan.plain_chars[proposed]
            if chars > 0 and cursor.quoted and not cursor.pending and not cursor.escape:
                # more free text: the shortest completion is still the closing quote and the tail
                if self.left >= plan.string_need[cursor.segment]:
                    cursor.chars += chars
                    return proposed
            elif self.left >= plan.slack[cursor.segment]:
                cursor.feed(plan, plan.token_bytes[proposed])
                return proposed
            else:
                trial = cursor.copy()
                trial.feed(plan, plan.token_bytes[proposed])
                if plan.need(trial) <= self.left:
                    self.cursor = trial
                    return proposed
            self.forced = plan.completion(self.cursor)[::-1]
            self.cut = FIELD_NAMES[self.cursor.segment:]
        token = self.forced.pop()
        self.cursor.feed(plan, plan.token_bytes[token])
        return token

    @property
    def cut_fields(self) -> dict[str, str]:
        """Fields whose value is not the model's whole answer, and why."""
        reasons = {name: CUT_BY_LENGTH for name in self.cursor.capped}
        return {**reasons, **{name: CUT_BY_BUDGET for name in self.cut}}


# ----------------------------------------------------------------------------- xgrammar


def tokenizer_info(tokenizer, vocab_size: int | None = None, stop_ids: Sequence[int] | None = None):
    """xgrammar's view of a Hugging Face tokenizer, every special token writing nothing.

    `decode(skip_special_tokens=True)` drops special tokens from the text; a grammar that took
    them as their spelling (`<|box_start|>`) could let one stand for a required answer that
    then decodes to nothing. Tokens that write nothing are never allowed by xgrammar.
    """
    import xgrammar as xgr

    stop = list(stop_ids) if stop_ids else None
    found = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop)
    pieces = list(found.decoded_vocab) + [b""] * max(0, found.vocab_size - len(found.decoded_vocab))
    for special in {*found.special_token_ids, *tokenizer.all_special_ids}:
        if special < len(pieces):
            pieces[special] = b""
    return xgr.TokenizerInfo(pieces, xgr.VocabType.RAW, vocab_size=found.vocab_size, stop_token_ids=found.stop_token_ids)


def token_bytes(info) -> list[bytes]:
    """The bytes each token id writes into the text (`tokenizer_info`'s: special tokens none)."""
    return list(info.decoded_vocab) + [b""] * max(0, info.vocab_size - len(info.decoded_vocab))


def compile_grammar(info, config: AnswerConfig, bounded: bool = True):
    """The label grammar compiled by xgrammar for this tokenizer (`tokenizer_info`); `bounded`: see `label_grammar`."""
    import xgrammar as xgr

    return xgr.GrammarCompiler(info).compile_grammar(xgr.Grammar.from_ebnf(label_grammar(config, bounded)))


def closing_plan(tokenizer, config: AnswerConfig, pieces: Sequence[bytes], stop_ids: Iterable[int] = ()) -> ClosingPlan:
    """The closing plan of a Hugging Face tokenizer; `pieces` from `token_bytes`."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    plan = ClosingPlan(config, encode, pieces, stop_ids)
    for text, tail in zip(plan.tail_texts, plan.tails):  # forced tokens must write exactly the completion's bytes
        if b"".join(pieces[t] for t in tail) != text.encode():
            raise ValueError(f"{type(tokenizer).__name__} does not write its tokens' text byte for byte; "
                             "constrained decoding can't close labels with it")
    return plan


class ConstrainedRows:
    """The host side of constrained decoding for the rows of one decode batch, arranged so the GPU waits little.

    A decode step of a 7B model at batch 128 takes about 20 ms on a GPU; the grammar work for 128 rows
    has to fit beside it. So, each step, the engine calls:

    * `mask_logits`: the grammar mask of every row, filled on the host during the previous forward
      pass, goes to the device (from pinned memory, without waiting) and is applied there;
    * `settle` with the chosen tokens: rows writing a forced completion get their token in place on the
      device; only rows whose budget is nearly spent need the host to see their token before the next
      forward pass (their closer may replace it), and the GPU waits for those few checks alone;
    * then it launches the next forward pass, and calls `advance`, which runs while the GPU computes:
      every other row's closer, one batched accept by the matchers, and the next mask, filled by
      xgrammar's multithreaded batch fill for the rows that need one (not finished, not forced).

    Every row gets the same tokens as when each matcher fills its row and each closer runs in turn.
    """

    def __init__(self, grammar, plan: ClosingPlan, budget: int, rows: int, vocab_size: int, device):
        """`grammar`: compiled from `label_grammar`, bounded or not (the limits are kept here either way)."""
        import torch
        import xgrammar as xgr

        self.plan, self.device = plan, torch.device(device)
        self.matchers = [xgr.GrammarMatcher(grammar) for _ in range(rows)]
        self.closers = [plan.closer(budget) for _ in range(rows)]
        self.filler = xgr.BatchGrammarMatcher()  # "auto": threads for half the cores
        pinned = self.device.type == "cuda"  # host buffers the device copies from or to without waiting
        self.bitmask = xgr.allocate_token_bitmask(rows, vocab_size)
        self.bitmask = self.bitmask.pin_memory() if pinned else self.bitmask
        self._bitmask_words = self.bitmask.numpy()  # the same memory
        self._device_bitmask = self.bitmask.to(self.device)  # the host bitmask itself on a CPU
        self._forced_host = torch.full((rows,), -1, dtype=torch.long, pin_memory=pinned)  # -1: not forced
        self._forced = self._forced_host.to(self.device)
        self._tokens_host = torch.zeros(rows, dtype=torch.long, pin_memory=pinned)
        self._copied = torch.cuda.Event() if pinned else None  # the chosen tokens have reached the host
        self.live = list(range(rows))  # rows whose label is not finished (matcher not terminated)
        self._check: list[int] = []  # rows whose closer may replace the next token: the host decides it
        self._settled: set[int] = set()  # rows whose closer ran in `settle` this step
        self._any_forced = False
        self._idle: set[int] = set()  # rows whose mask allows every token
        self.seconds = 0.0  # the host's time in settle and advance, waits for the device left out
        self._next_step()
        self._fill()

    def _fill(self) -> None:
        forced = self._forced_host.numpy()
        masked = [row for row in self.live if forced[row] < 0]
        idle = set(range(len(self.matchers))).difference(masked)
        if idle - self._idle:  # newly finished or forced: any token (padding or the forced token replaces it)
            self._bitmask_words[sorted(idle - self._idle)] = -1
        self._idle = idle
        if masked:
            self.filler.batch_fill_next_token_bitmask([self.matchers[row] for row in masked], self.bitmask, masked)
        for row in masked:  # the free-text limits the grammar leaves to the host (label_grammar's `bounded`)
            allowed = self.plan.text_limit_mask(self.closers[row].cursor)
            if allowed is not None:
                self._bitmask_words[row] &= allowed

    def mask_logits(self, logits) -> None:
        """Keep only the tokens each row's grammar allows next (in place)."""
        import xgrammar as xgr

        mask = self._device_bitmask
        if mask is not self.bitmask:
            mask.copy_(self.bitmask, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask)

    def settle(self, tokens):
        """The tokens to write this step: forced tokens in place, and the closers' choice where the budget is close."""
        import torch

        start = time.perf_counter()
        if self._any_forced:
            self._forced.copy_(self._forced_host, non_blocking=True)
            tokens = torch.where(self._forced >= 0, self._forced, tokens)
        self._tokens_host.copy_(tokens, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self._settled = set(self._check)
        if not self._check:
            self.seconds += time.perf_counter() - start
            return tokens
        chosen = self._host_tokens()
        replaced = False
        for row in self._check:
            token = self.closers[row].next_token(chosen[row])
            replaced |= token != chosen[row]
            chosen[row] = token
        if replaced:
            tokens = torch.tensor(chosen)
            self._tokens_host.copy_(tokens)
            tokens = tokens.to(self.device)
        self.seconds += time.perf_counter() - start
        return tokens

    def _host_tokens(self) -> list[int]:
        if self._copied is not None:
            start = time.perf_counter()
            self._copied.synchronize()  # waits for this step's tokens only, not for a forward pass launched since
            self.seconds -= time.perf_counter() - start  # the device's time, not the host's
        return self._tokens_host.tolist()

    def advance(self, fill: bool = True) -> None:
        """After `settle`'s tokens: every other closer, the matchers accept the tokens, and (`fill`) the next mask."""
        import xgrammar as xgr

        start = time.perf_counter()
        tokens = self._host_tokens()
        for row in self.live:
            if row not in self._settled and self.closers[row].next_token(tokens[row]) != tokens[row]:
                raise RuntimeError(f"row {row}: its closer replaced a token the host did not check")
        accepted = xgr.BatchGrammarMatcher.batch_accept_token([self.matchers[row] for row in self.live],
                                                              [tokens[row] for row in self.live])
        if not all(accepted):
            row = self.live[accepted.index(False)]
            raise RuntimeError(f"the label grammar rejected token {tokens[row]} chosen for row {row}")
        self.live = [row for row in self.live if not self.matchers[row].is_terminated()]
        self._next_step()
        if fill:
            self._fill()
        self.seconds += time.perf_counter() - start

    def _next_step(self) -> None:
        """Which rows the next step forces a token on, and which the host must check."""
        forced = self._forced_host.numpy()
        forced[:] = -1
        self._check, self._any_forced = [], False
        for row in self.live:
            closer = self.closers[row]
            if closer.forced:
                forced[row] = closer.forced[-1]
                self._any_forced = True
            elif closer.needs_check():
                self._check.append(row)


def minimum_budget(tokenizer, config: AnswerConfig) -> int:
    """The fewest new tokens a valid label takes with this tokenizer (no xgrammar needed)."""
    return ClosingPlan(config, lambda text: tokenizer.encode(text, add_special_tokens=False)).min_budget
