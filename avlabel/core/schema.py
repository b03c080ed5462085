"""The label schema: the one place that says which fields a clip label has.

Every other module (the builder, the prompts, training targets, the output parser,
the metrics, the judge and the catalog) reads the fields from here, so adding or
changing a field changes all of them together.

A label is a JSON object with the 15 fields of the Cosmos cookbook's AV captioning
recipe. Booleans are written as the strings "True"/"False", as the recipe's human
labels are; `null` is allowed only where the recipe allows it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FieldKind = Literal["category", "multi_category", "text", "difficulty", "boolean"]


@dataclass(frozen=True)
class LabelField:
    name: str
    kind: FieldKind
    question: str  # what the judge is told the field answers
    guidance: str  # how an annotator (human or model) should fill it in
    choices: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    nullable: bool = False

    @property
    def closed(self) -> bool:
        """True when the answer comes from a fixed set (exact metrics apply)."""
        return self.kind in ("category", "multi_category", "difficulty", "boolean")


DIFFICULTY_LEVELS = {
    1: "very easy: good weather, little traffic, nothing hazardous",
    2: "normal: some traffic or somewhat adverse weather",
    3: "difficult: dense traffic, rain, pedestrians or similar",
    4: "very difficult: poor visibility, rush hour, treacherous road surface",
}
BOOLEAN_VALUES = ("True", "False")

FIELDS: tuple[LabelField, ...] = (
    LabelField(
        "weather",
        "category",
        question="What is the weather in the clip?",
        guidance="The weather as seen from the vehicle. Pick exactly one value.",
        choices=(
            "Clear skies",
            "Overcast",
            "Partly cloudy",
            "Light rain",
            "Heavy rain",
            "Light snow",
            "Dense fog",
            "N/A",
        ),
    ),
    LabelField(
        "lighting",
        "category",
        question="What are the lighting conditions?",
        guidance="The light the scene is seen in. Pick exactly one value.",
        choices=(
            "Daytime (diffused light)",
            "Daytime (low-contrast daylight)",
            "Daytime (direct sunlight)",
            "Night (poorly lit; few/no streetlights)",
            "Night (well-lit by streetlights)",
        ),
    ),
    LabelField(
        "road_conditions",
        "text",
        question="What is the state and surface of the road?",
        guidance="A short phrase naming the surface state (dry, wet, icy, snowy) and the surface itself (asphalt, cobblestones, gravel, dirt).",
        examples=("Dry asphalt", "Wet asphalt, standing water near the curb", "Packed snow over gravel"),
    ),
    LabelField(
        "traffic_light",
        "text",
        question="Which traffic lights are there and how does the ego vehicle respond to them?",
        guidance='The traffic lights that apply to the ego vehicle, their state and changes, and what the ego vehicle does about them; "No traffic light" when there is none.',
        examples=("No traffic light", "Red light; the ego vehicle waits at the stop line.", "Green throughout; the ego vehicle keeps its speed through the junction."),
    ),
    LabelField(
        "traffic_sign",
        "text",
        question="Which traffic signs does the ego vehicle have to take into account?",
        guidance="Every sign relevant to the ego vehicle, one per sentence.",
        examples=("Speed limit 50 km/h.", "A stop sign at a four-way stop.", "No entry sign on the right."),
    ),
    LabelField(
        "additional_traffic_rules",
        "text",
        question="Which special traffic rules apply on this stretch of road?",
        guidance="One or two sentences on rules specific to this stretch (work zones, school zones, crossings), or null when there are none.",
        examples=("A pedestrian crossing is marked ahead.", "Road works: traffic merges into one lane."),
        nullable=True,
    ),
    LabelField(
        "road_type",
        "text",
        question="What kind of road is the ego vehicle driving on?",
        guidance="The class of road, with a few words on what characterises it.",
        examples=("Local residential street, low speed", "Arterial road with several lanes and limited access", "Highway"),
    ),
    LabelField(
        "junction_type",
        "text",
        question="Which junctions does the ego vehicle pass through or stop at?",
        guidance="The junctions or intersections the ego vehicle goes through or stops at, or a straight segment when there are none.",
        examples=("Straight segment without junctions", "Signalised four-way intersection", "Small roundabout"),
    ),
    LabelField(
        "lane_type",
        "text",
        question="How many lanes does the road have, and of what kind?",
        guidance="The number and kinds of lanes on the ego vehicle's road.",
        examples=("One lane in each direction", "Two lanes each way plus a centre turn lane", "One-way street with two lanes"),
    ),
    LabelField(
        "additional_map_rules",
        "text",
        question="Which road markings impose special rules here?",
        guidance="One or two sentences on markings painted on the road that carry rules (crosswalks, bus or bike lanes, turn arrows), or null when there are none.",
        examples=("Zebra crossing markings ahead.", "A bus lane on the right."),
        nullable=True,
    ),
    LabelField(
        "interactive_expanded_metaaction",
        "multi_category",
        question="Which interactive manoeuvres does the ego vehicle perform?",
        guidance="Every listed manoeuvre that describes what the ego vehicle does, as a list; null when none applies.",
        choices=(
            "In-lane nudging",
            "Yield to VRUs",
            "Vehicle following",
            "Out-of-lane nudging",
            "Yield to vehicles",
            "Overtake VRUs",
            "Vehicle cut-in ahead",
            "React to animals",
            "Overtake vehicles",
        ),
        nullable=True,
    ),
    LabelField(
        "safety_analysis",
        "text",
        question="What happens in the clip that matters for driving safety?",
        guidance="A short paragraph: the setting, what the ego vehicle does in order (turns, stops, lane changes), and everything that bears on safety, such as pedestrians, cyclists, parked cars, other drivers' moves and the road conditions.",
    ),
    LabelField(
        "driving_difficulty",
        "difficulty",
        question="How difficult is this clip to drive, from 1 to 4?",
        guidance="An integer from 1 to 4: " + "; ".join(f"{k} = {v}" for k, v in DIFFICULTY_LEVELS.items()) + ".",
        choices=tuple(str(level) for level in DIFFICULTY_LEVELS),
    ),
    LabelField(
        "rule_violation",
        "boolean",
        question="Does anyone in the clip break a traffic law?",
        guidance='"True" when a traffic law is broken in the clip, otherwise "False".',
        choices=BOOLEAN_VALUES,
    ),
    LabelField(
        "interesting_scenario",
        "boolean",
        question="Is this an unusual or interesting scenario worth training on?",
        guidance='"True" when the clip shows something unusual that makes it valuable training data, "False" for routine driving.',
        choices=BOOLEAN_VALUES,
    ),
)

FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
CLOSED_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS if f.closed)  # the fields with a fixed answer set
TEXT_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS if f.kind == "text")  # the free-text fields
# The closed fields that sum a clip up at a glance: the catalog's one line per hit, the dataset card's charts.
SUMMARY_FIELDS: tuple[str, ...] = ("weather", "lighting", "driving_difficulty", "interactive_expanded_metaaction")
WHOLE_LABEL = "<label>"  # where problems of the label as a whole (not one field) are reported
FIELDS_BY_NAME: dict[str, LabelField] = {f.name: f for f in FIELDS}


# --------------------------------------------------------------------------- normalization

# Real labels are typed by people and models: non-breaking and typographic hyphens,
# curly quotes, stray whitespace, different capitalisation. These are folded away
# before comparing with the closed category lists.
_HYPHENS = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u00ad"), "-")
_QUOTES = {ord("\u2018"): "'", ord("\u2019"): "'", ord("\u201c"): '"', ord("\u201d"): '"'}


def clean_text(value: str) -> str:
    """Unicode-normalise a string: ASCII hyphens and quotes, no padding, no trailing newline."""
    value = unicodedata.normalize("NFKC", value).translate(_HYPHENS).translate(_QUOTES)
    value = value.replace("\u00a0", " ")
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in value.strip().splitlines()]
    return "\n".join(lines)


def _fold(value: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", clean_text(value).lower()).strip()


_CHOICE_LOOKUP: dict[str, dict[str, str]] = {
    f.name: {_fold(choice): choice for choice in f.choices} for f in FIELDS if f.choices
}
_NULL_STRINGS = {"", "null", "none"}


class LabelError(ValueError):
    """A label that can't be used; `problems` maps each field to what is wrong with it."""

    def __init__(self, problems: dict[str, list[str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        detail = "; ".join(f"{name}: {', '.join(msgs)}" for name, msgs in problems.items())
        super().__init__(f"{where}invalid label ({detail})")


def _normalize_value(spec: LabelField, value: Any) -> Any:
    """Return the canonical value for one field, or raise ValueError saying why not."""
    if isinstance(value, str) and spec.kind != "text" and _fold(value) in _NULL_STRINGS:
        value = None
    if value is None or (spec.kind == "text" and isinstance(value, str) and not clean_text(value)):
        if spec.nullable:
            return None
        raise ValueError(f"is {'null' if value is None else 'empty'} but the field is required")

    if spec.kind == "text":
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        text = clean_text(value)
        return None if spec.nullable and text.lower() in _NULL_STRINGS else text

    if spec.kind == "category":
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        match = _CHOICE_LOOKUP[spec.name].get(_fold(value))
        if match is None:
            raise ValueError(f"unknown category {value!r} (expected one of: {', '.join(spec.choices)})")
        return match

    if spec.kind == "multi_category":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(f"must be a list of strings or null, got {type(value).__name__}")
        out: list[str] = []
        for item in items:
            match = _CHOICE_LOOKUP[spec.name].get(_fold(item)) if isinstance(item, str) else None
            if match is None:
                raise ValueError(f"unknown category {item!r} (expected any of: {', '.join(spec.choices)})")
            if match not in out:
                out.append(match)
        return out or None  # the recipe writes "no manoeuvre" as null, so [] becomes null

    if spec.kind == "difficulty":
        if isinstance(value, bool):
            raise ValueError("must be an integer from 1 to 4, got a boolean")
        try:
            number = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be an integer from 1 to 4, got {value!r}") from None
        if not number.is_integer() or int(number) not in DIFFICULTY_LEVELS:  # not int(): inf overflows
            raise ValueError(f"must be an integer from 1 to 4, got {value!r}")
        return int(number)

    if spec.kind == "boolean":
        if isinstance(value, bool):
            return str(value)
        folded = _fold(value) if isinstance(value, str) else None
        if folded in ("true", "yes"):
            return "True"
        if folded in ("false", "no"):
            return "False"
        raise ValueError(f'must be "True" or "False", got {value!r}')

    raise AssertionError(f"unhandled field kind {spec.kind}")


def check_label(raw: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Normalise a label and list every problem per field.

    Returns (label, problems). `label` holds the canonical value of every field that
    could be read (a field with a problem is absent from it); `problems` is empty
    for a valid label. Unknown keys are reported under their own name.
    """
    if not isinstance(raw, dict):
        return {}, {WHOLE_LABEL: [f"must be a JSON object, got {type(raw).__name__}"]}
    label: dict[str, Any] = {}
    problems: dict[str, list[str]] = {}
    for spec in FIELDS:
        if spec.name not in raw:
            problems.setdefault(spec.name, []).append("is missing")
            continue
        try:
            label[spec.name] = _normalize_value(spec, raw[spec.name])
        except ValueError as err:
            problems.setdefault(spec.name, []).append(str(err))
    for key in raw:
        if key not in FIELDS_BY_NAME:
            problems.setdefault(key, []).append("is not a field of the schema")
    return label, problems


def normalize_label(raw: Any, source: str | None = None) -> dict[str, Any]:
    """The canonical form of a valid label; raises LabelError naming every problem."""
    label, problems = check_label(raw)
    if problems:
        raise LabelError(problems, source)
    return label


def split_extra(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema's fields, the keys beyond them): real annotation exports carry more, e.g. object lists."""
    return ({k: v for k, v in raw.items() if k in FIELDS_BY_NAME}, {k: v for k, v in raw.items() if k not in FIELDS_BY_NAME})


def json_limit_reason(err: ValueError | RecursionError) -> str:
    """What stopped Python's JSON reader on text that json.loads did not refuse as malformed: nesting past its
    recursion limit, or an integer of over 4,300 digits (the first clause of its message: the rest advises a
    Python setting, not a fix of the file)."""
    return "nests arrays or objects too deeply" if isinstance(err, RecursionError) else str(err).split(":")[0]


def json_error_reason(err: json.JSONDecodeError, one_line: bool = False) -> str:
    """Why and where json.loads refused text: "Expecting value at line 3 column 9" ("... at column 9" for
    `one_line`, a manifest's line, say). Some of its messages end in "at", ready for the position
    ("Unterminated string starting at"): that one is not said twice."""
    where = f"column {err.colno}" if one_line else f"line {err.lineno} column {err.colno}"
    return f"{err.msg.removesuffix(' at')} at {where}"


class _ConflictingKey(ValueError):
    """A JSON object that gives one key two different values."""


def _refuse_conflicting_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of a repeated key without a word; in a hand-edited label the two values are two
    annotators' or two edits' answers, and which one is right is the user's call (a repeat of one value is harmless)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj and obj[key] != value:
            raise _ConflictingKey(f"gives {key!r} twice, as {obj[key]!r} and as {value!r}: keep the right one")
        obj[key] = value
    return obj


def read_label(source: str | Path | dict, strict: bool = False) -> tuple[dict[str, Any] | None, dict[str, Any], str | None]:
    """A human label as exports write it: (label, extra keys, None), or (None, {}, why it can't be used).

    `source` is a label file, its JSON text, or the object. A UTF-8 byte-order mark (Windows tools
    write one) is stripped. Keys beyond the schema are returned apart, never a reason to refuse the
    label, unless `strict`. The reasons are the builder's report lines (the README lists them).
    """
    raw = source
    try:
        if isinstance(raw, Path):
            raw = raw.read_bytes().decode("utf-8")
        if isinstance(raw, str):
            if not raw.strip():
                return None, {}, "empty file (0 bytes)" if not raw else "holds only white space, no JSON"
            raw = json.loads(raw.removeprefix("\ufeff"), object_pairs_hook=_refuse_conflicting_keys)
    except OSError as err:
        return None, {}, f"can't be read ({err.strerror})"
    except UnicodeDecodeError:
        return None, {}, "is not UTF-8 text"
    except json.JSONDecodeError as err:
        return None, {}, f"is not valid JSON ({json_error_reason(err)})"
    except RecursionError:
        return None, {}, "nests arrays or objects deeper than Python's JSON reader goes: re-export the label"
    except _ConflictingKey as err:
        return None, {}, str(err)
    except ValueError as err:  # valid JSON past one of Python's limits, such as an integer of over 4,300 digits
        return None, {}, f"can't be read as JSON ({json_limit_reason(err)}): re-export the label"
    if not isinstance(raw, dict):
        return None, {}, f"is not a JSON object (got {type(raw).__name__})"
    fields, extra = split_extra(raw)
    if strict and extra:
        return None, {}, f"has keys beyond the schema: {', '.join(extra)} (refused by --strict)"
    label, problems = check_label(fields)
    if problems:
        return None, {}, "; ".join(f"{name} {', '.join(msgs)}" for name, msgs in problems.items())
    return label, extra, None


def label_to_json(label: dict[str, Any], indent: int | None = None) -> str:
    """Serialise a label with the fields in schema order (the order the prompt asks for)."""
    return json.dumps({name: label.get(name) for name in FIELD_NAMES}, ensure_ascii=False, indent=indent)


# --------------------------------------------------------------------------- typed storage


def dataset_features() -> dict:
    """`datasets` feature types of the label columns (imported lazily: datasets is heavy)."""
    from datasets import List, Value

    types = {
        "category": Value("string"),
        "text": Value("string"),
        "multi_category": List(Value("string")),
        "difficulty": Value("int8"),
        "boolean": Value("bool"),
    }
    return {f.name: types[f.kind] for f in FIELDS}


def label_to_row(label: dict[str, Any]) -> dict[str, Any]:
    """A normalised label as typed dataset columns (booleans become real bools)."""
    row = dict(label)
    for f in FIELDS:
        if f.kind == "boolean":
            row[f.name] = label[f.name] == "True"
        elif f.kind == "multi_category":
            row[f.name] = label[f.name] or []
    return row


def row_to_label(row: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `label_to_row`: a dataset row back to the recipe's JSON label."""
    label = {}
    for f in FIELDS:
        value = row[f.name]
        if f.kind == "boolean":
            value = "True" if value else "False"
        elif f.kind == "multi_category":
            value = list(value) or None
        elif f.kind == "difficulty":
            value = int(value)
        label[f.name] = value
    return label

