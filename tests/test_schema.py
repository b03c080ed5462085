"""The label schema and the prompts generated from it."""

import json
import re
from pathlib import Path

import pytest

from avlabel.core import prompts, schema
from eval_labels import load_label_file

REFERENCE = Path(__file__).parent / "fixtures" / "reference.label.json"  # a label in the recipe's format


def test_reference_label_validates_and_normalizes():
    label = load_label_file(REFERENCE)
    assert list(label) == list(schema.FIELD_NAMES)
    # the reference writes "low\u2011contrast" with a non-breaking hyphen
    assert label["lighting"] == "Daytime (low-contrast daylight)"
    assert label["traffic_sign"].endswith("A no parking sign.")  # trailing newline dropped
    assert label["additional_traffic_rules"] is None
    assert label["interactive_expanded_metaaction"] == ["Yield to VRUs", "Vehicle following"]
    assert label["driving_difficulty"] == 3
    assert (label["rule_violation"], label["interesting_scenario"]) == ("False", "True")


def test_schema_has_the_recipe_fields_and_categories():
    assert len(schema.FIELDS) == 15
    by_name = schema.FIELDS_BY_NAME
    assert len(by_name["weather"].choices) == 8
    assert len(by_name["lighting"].choices) == 5
    assert len(by_name["interactive_expanded_metaaction"].choices) == 9
    assert by_name["driving_difficulty"].choices == ("1", "2", "3", "4")
    nullable = {f.name for f in schema.FIELDS if f.nullable}
    assert nullable == {"additional_traffic_rules", "additional_map_rules", "interactive_expanded_metaaction"}
    assert all(f.question.endswith("?") for f in schema.FIELDS)
    # every field is free text or closed; the summary (catalog lines, card charts) counts closed values
    assert set(schema.TEXT_FIELD_NAMES) | set(schema.CLOSED_FIELD_NAMES) == set(schema.FIELD_NAMES)
    assert not set(schema.TEXT_FIELD_NAMES) & set(schema.CLOSED_FIELD_NAMES)
    assert set(schema.SUMMARY_FIELDS) <= set(schema.CLOSED_FIELD_NAMES)


@pytest.mark.parametrize(
    "field, raw, expected",
    [
        ("weather", "  light RAIN ", "Light rain"),
        ("lighting", "night (well lit by streetlights)", "Night (well-lit by streetlights)"),
        ("rule_violation", True, "True"),
        ("rule_violation", "true", "True"),
        ("interesting_scenario", "FALSE", "False"),
        ("driving_difficulty", "3", 3),
        ("driving_difficulty", 2.0, 2),
        ("interactive_expanded_metaaction", [], None),
        ("interactive_expanded_metaaction", "yield to vrus", ["Yield to VRUs"]),
        ("interactive_expanded_metaaction", ["Vehicle following", "vehicle following"], ["Vehicle following"]),
        ("additional_map_rules", "   ", None),
        ("additional_map_rules", "null", None),
        ("traffic_sign", "A stop sign.\n\n", "A stop sign."),
        ("safety_analysis", "Ego  vehicle\u00a0stops.", "Ego vehicle stops."),
    ],
)
def test_normalization(field, raw, expected):
    label = json.loads(REFERENCE.read_text())
    label[field] = raw
    assert schema.normalize_label(label)[field] == expected


def test_every_problem_is_reported_per_field():
    label = json.loads(REFERENCE.read_text())
    label["weather"] = "Sunny"
    label["driving_difficulty"] = 7
    label["rule_violation"] = "maybe"
    label["safety_analysis"] = None
    del label["lane_type"]
    label["mood"] = "calm"
    normalized, problems = schema.check_label(label)
    assert set(problems) == {"weather", "driving_difficulty", "rule_violation", "safety_analysis", "lane_type", "mood"}
    assert "unknown category 'Sunny'" in problems["weather"][0]
    assert "is missing" in problems["lane_type"][0]
    assert problems["safety_analysis"] == ["is null but the field is required"]
    assert schema.check_label({**label, "safety_analysis": "  "})[1]["safety_analysis"] == ["is empty but the field is required"]
    assert normalized["road_type"]  # the valid fields are still read
    with pytest.raises(schema.LabelError, match="clip.json: invalid label"):
        schema.normalize_label(label, source="clip.json")


def test_a_refused_label_file_says_why(tmp_path):
    bad = tmp_path / "x.label.json"
    bad.write_text("{not json")
    label, extra, reason = schema.read_label(bad)
    assert label is None and extra == {} and reason.startswith("is not valid JSON (")
    bad.write_text('["a list"]')
    assert schema.read_label(bad)[2] == "is not a JSON object (got list)"
    bad.write_text("")
    assert schema.read_label(bad)[2] == "empty file (0 bytes)"
    bad.write_text(" \n")
    assert schema.read_label(bad)[2] == "holds only white space, no JSON"


def test_a_label_giving_a_field_two_values_is_refused(tmp_path):
    """json.loads would keep the last value without a word; a repeat of the same value is harmless."""
    text = REFERENCE.read_text()
    path = tmp_path / "x.label.json"
    path.write_text(text.replace('"weather": ', '"weather": "Heavy rain", "weather": ', 1))
    label, _, reason = schema.read_label(path)
    assert label is None
    assert reason.startswith("gives 'weather' twice, as 'Heavy rain' and as ") and reason.endswith(": keep the right one")
    same = json.loads(text)["weather"]
    path.write_text(text.replace('"weather": ', f'"weather": {json.dumps(same)}, "weather": ', 1))
    assert schema.read_label(path)[0] == load_label_file(REFERENCE)


def test_rows_round_trip_and_json_keeps_schema_order():
    label = load_label_file(REFERENCE)
    row = schema.label_to_row(label)
    assert row["rule_violation"] is False and row["interesting_scenario"] is True
    assert schema.row_to_label(row) == label
    assert list(json.loads(schema.label_to_json(label))) == list(schema.FIELD_NAMES)
    features = schema.dataset_features()
    assert set(features) == set(schema.FIELD_NAMES)
    assert features["driving_difficulty"].dtype == "int8"


def test_rubric_is_generated_from_the_schema(tmp_path):
    rubric = prompts.rubric_prompt()
    for f in schema.FIELDS:
        assert f'"{f.name}"' in rubric
        for choice in f.choices if f.kind in ("category", "multi_category") else ():
            assert f'"{choice}"' in rubric
    assert rubric.index('"weather"') < rubric.index('"interesting_scenario"')
    default = prompts.load_prompts()
    own = tmp_path / "user.txt"
    own.write_text("Describe the clip as JSON.\n")
    custom = prompts.load_prompts(user_file=own)
    assert custom.user == "Describe the clip as JSON." and custom.system == default.system
    assert custom.sha != default.sha and len(default.sha) == 12


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_a_difficulty_that_is_no_finite_number_is_refused(tmp_path, number):
    """Python's json reads these (spreadsheets and NumPy write them); one such label must not stop a build."""
    text = REFERENCE.read_text()
    path = tmp_path / "x.label.json"
    path.write_text(re.sub(r'"driving_difficulty": *\d', f'"driving_difficulty": {number}', text))
    assert path.read_text() != text
    label, _, reason = schema.read_label(path)
    assert label is None and reason.startswith("driving_difficulty must be an integer from 1 to 4, got ")
