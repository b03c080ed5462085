"""Using search results: a new dataset through the builder, and the eval metrics per slice.

Export hands the matching clips to `data_builder.build` as a JSONL manifest (video path +
label), so the new dataset is made exactly like any other: probed, validated, split by clip
id, with the same dataset card and the same `Video` feature, and anything unusable in the
quarantine report. The manifest stays in the dataset folder as `.export_manifest.jsonl`, hidden
like the builder's cache, so publishing the folder leaves it out (it names local paths). Slices run `eval.metrics` (the same deterministic per-field metrics as
`avlabel metrics`) on the clips of a run that match each slice's filters, against their
human labels, so a user sees where a model is weak (night against day, rain against dry).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from .query import Hit, QueryError, search

LabelChoice = Literal["prefer_human", "human", "caption"]
MANIFEST_NAME = ".export_manifest.jsonl"


@dataclass
class ExportResult:
    build: Any  # data_builder.build.BuildResult
    manifest: Path
    clips: int
    human_labels: int
    caption_labels: int
    skipped: list[str]  # clips left out before the build, with why (e.g. no human label)


def _pick_label(hit: Hit, labels: LabelChoice) -> tuple[dict | None, str]:
    if hit.kind == "human":
        return hit.label, "human"
    if labels != "caption" and hit.human is not None:
        return hit.human, "human"
    if labels == "human":
        return None, "human"
    return hit.answered, "caption"


def export_dataset(hits: Sequence[Hit], output_dir: str | Path, labels: LabelChoice = "prefer_human",
                   test_size: float = 0.1, pretty_name: str | None = None, license: str = "unknown") -> ExportResult:
    """Build a dataset of the hits' clips (one row per clip; the best-ranked hit of a clip counts).

    `labels`: "prefer_human" (the human label where the catalog has one, else the caption),
    "human" (only clips with a human label), "caption" (the captions, e.g. as pseudo-labels).
    A caption with missing or invalid fields is handed over as it is and lands in the builder's
    quarantine report with the reason, like any bad label.
    """
    from avlabel.data_builder.build import BuildArguments, build

    out = Path(output_dir)
    records, skipped, seen = [], [], set()
    counts = {"human": 0, "caption": 0}
    for hit in hits:
        if hit.clip_id in seen:
            continue
        seen.add(hit.clip_id)
        label, origin = _pick_label(hit, labels)
        if label is None:
            skipped.append(f"{hit.clip_id}: no human label in the catalog (labels={labels})")
            continue
        counts[origin] += 1
        video = str(Path(hit.video).resolve()) if hit.video else ""
        records.append({"clip_id": hit.clip_id, "video": video, "label": json.dumps(label, ensure_ascii=False)})
    if not records:
        why = f"none of the {len(seen)} matching clip(s) has a usable label ({'; '.join(skipped[:3])})" if seen else (
            "no clip matches")
        raise QueryError(f"nothing to export: {why}")
    # written to a temporary folder, and moved in once the builder has taken the output folder: one it refuses
    # (not its own) stays untouched
    with tempfile.TemporaryDirectory(prefix="avlabel-export-") as staging:
        manifest = Path(staging) / MANIFEST_NAME
        manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        result = build(BuildArguments(input=str(manifest), output_dir=str(out), layout="manifest", test_size=test_size,
                                      pretty_name=pretty_name, license=license))
        shutil.move(manifest, out / MANIFEST_NAME)
    return ExportResult(result, out / MANIFEST_NAME, len(records), counts["human"], counts["caption"], skipped)


def parse_slice(text: str) -> tuple[str, list[str]]:
    """`"night: human.lighting=Night*"` -> ("night", [filters]); conditions joined by " && "."""
    name, colon, rest = text.partition(":")
    if not colon or "=" in name or "~" in name:  # no name given: the filters name the slice
        name, rest = text, text
    filters = [part.strip() for part in rest.split("&&") if part.strip()]
    if not filters:
        raise QueryError(f"slice {text!r} has no filters: write NAME: field=value && field=value")
    return name.strip(), filters


def slice_metrics(db: str | Path | sqlite3.Connection, slices: dict[str, Sequence[str]], run: str,
                  where: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """eval.metrics for the clips of `run` in each slice that have a human label.

    Slice on the human label (`human.lighting=Night*`) to slice by what is true; slicing on the
    caption's own answer selects by what the model believed, which flatters it.
    """
    from avlabel.eval.data import Prediction
    from avlabel.eval.metrics import evaluate_predictions

    results: dict[str, dict[str, Any]] = {}
    for name, filters in slices.items():
        found = search(db, where=[*where, *filters], runs=[run], limit=None)
        hits = [hit for hit in found.hits if hit.human is not None]
        entry: dict[str, Any] = {"filters": list(filters), "matching": found.total, "without_human_label": found.total - len(hits)}
        if hits:
            predictions = [Prediction(hit.clip_id, hit.answered, hit.valid, hit.errors) for hit in hits]
            entry |= evaluate_predictions(f"{run}: {name}", [hit.human for hit in hits], predictions).to_dict()
        else:
            entry |= {"n": 0, "fields": {}}
        results[name] = entry
    return results


def print_slices(results: dict[str, dict[str, Any]], run: str, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{run}: headline metric per field and slice (n = clips with a human label)", title_justify="left")
    table.add_column("field")
    table.add_column("metric")
    for name, entry in results.items():
        table.add_column(f"{name}\nn={entry['n']}", justify="right")
    fields = next((entry["fields"] for entry in results.values() if entry["fields"]), {})
    for field, first in fields.items():
        cells = []
        for entry in results.values():
            value = entry["fields"].get(field, {}).get("value")
            cells.append("n/a" if value is None else f"{value:.3f}")
        table.add_row(field, first["metric"], *cells)
    Console(file=file or sys.stdout, highlight=False).print(table)
