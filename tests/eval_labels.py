"""Labels for the tests and the judge benchmark: label files read as the commands read them, and random but
valid labels (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from avlabel.core import schema

WORDS = ("ego", "vehicle", "slows", "pedestrian", "crossing", "left", "lane", "parked", "car", "signal",
         "wet", "road", "cyclist", "turns", "stops", "merges", "truck", "junction", "yields", "ahead")


def random_value(spec: schema.LabelField, rng: np.random.Generator):
    if spec.nullable and rng.random() < 0.3:
        return None
    if spec.kind == "category":
        return str(rng.choice(spec.choices))
    if spec.kind == "multi_category":
        picked = [c for c in spec.choices if rng.random() < 0.2]
        return picked or None
    if spec.kind == "difficulty":
        return int(rng.integers(1, 5))
    if spec.kind == "boolean":
        return "True" if rng.random() < 0.25 else "False"
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))).capitalize() + "."


def load_label_file(path: str | Path) -> dict:
    """A label file read as the builder and the evaluation read one (`schema.read_label`); a refused one fails the test."""
    label, _, reason = schema.read_label(Path(path))
    assert reason is None, f"{path}: {reason}"
    return label


def random_label(rng: np.random.Generator) -> dict:
    return schema.normalize_label({spec.name: random_value(spec, rng) for spec in schema.FIELDS})


def perturbed(label: dict, rng: np.random.Generator, rate: float) -> dict:
    """A copy where each field is replaced by a random value with probability `rate`."""
    return {spec.name: random_value(spec, rng) if rng.random() < rate else label[spec.name] for spec in schema.FIELDS}


def write_labels(folder: Path, labels: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for clip_id, label in labels.items():
        (folder / f"{clip_id}.label.json").write_text(json.dumps(label), encoding="utf-8")
    return folder
