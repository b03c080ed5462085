"""The dataset card of a built dataset: README.md with the Hub's YAML header and statistics computed from the rows.

The YAML is written the way `Dataset.push_to_hub` writes it (`DatasetInfosDict` and `MetadataConfigs` fill
the card data), so `load_dataset` reads features and splits from it without warnings. The features also go
into the config itself, which `load_dataset` takes them from; the Parquet metadata files state the same types.
Nothing in the card depends on the time or on local paths, so the same rows give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import pprint
from collections import Counter
from pathlib import Path

import numpy as np

from .build import column_features, write_if_changed
from avlabel.core.charts import png_bytes
from avlabel.core.markdown import markdown_table
from avlabel.core.schema import FIELDS, SUMMARY_FIELDS

CARD_NAME = "README.md"
PLOT_NAME = "statistics.png"
DEFAULT_TITLE = "Dashcam clips with driving-scene labels"
TOP_RESOLUTIONS = 12
PANEL_TITLES = {"interactive_expanded_metaaction": "Manoeuvres"}  # the other charts are titled by their field name


# ----------------------------------------------------------------------------- statistics


def _value_names(spec) -> list[str]:
    names = list(spec.choices)
    return names + ["(none)"] if spec.kind == "multi_category" else names


def _row_values(spec, value) -> list[str]:
    """The category names a row holds for a closed field (booleans and levels as their text)."""
    if spec.kind == "multi_category":
        return list(value) or ["(none)"]
    return [str(value)]


def _duration_edges(durations: list[float]) -> list[float]:
    low, high = min(durations), max(durations)
    if high - low < 0.01:
        return [low, high]
    bins = min(10, len(set(durations)))
    return [float(edge) for edge in np.histogram_bin_edges(durations, bins=bins, range=(low, high))]


def compute_statistics(rows: dict[str, list[dict]]) -> dict:
    """Counts per split: category values of the closed fields, durations, resolutions, frame rates, codecs."""
    splits = list(rows)
    every = [row for split in splits for row in rows[split]]
    stats: dict = {"splits": splits, "clips": {split: len(rows[split]) for split in splits}, "categories": {}}
    for spec in FIELDS:
        if spec.closed:
            table = {name: dict.fromkeys(splits, 0) for name in _value_names(spec)}
            for split in splits:
                for row in rows[split]:
                    for name in _row_values(spec, row[spec.name]):
                        table[name][split] += 1
            stats["categories"][spec.name] = table
    if not every:
        return stats
    durations = [row["duration"] for row in every]
    edges = _duration_edges(durations)
    stats["duration"] = {
        "edges": edges,
        "counts": {
            split: np.histogram([row["duration"] for row in rows[split]], bins=edges)[0].tolist() for split in splits
        },
        "total_s": round(sum(durations), 3),
        "mean_s": round(sum(durations) / len(durations), 3),
    }
    for column, key in (("resolution", lambda r: f"{r['width']}x{r['height']}"), ("fps", lambda r: f"{r['fps']:g}"),
                        ("codec", lambda r: r["codec"])):  # fmt: skip
        counts = {split: Counter(key(row) for row in rows[split]) for split in splits}
        total = Counter(key(row) for row in every)
        stats[column] = {
            value: {split: counts[split][value] for split in splits}
            for value, _ in sorted(total.items(), key=lambda item: (-item[1], item[0]))
        }
    return stats


# ----------------------------------------------------------------------------- markdown


def _count_table(first: str, table: dict[str, dict[str, int]], splits: list[str], limit: int | None = None) -> str:
    items = list(table.items())
    body = [[name, *(counts[s] for s in splits), sum(counts.values())] for name, counts in items[:limit]]
    if limit is not None and len(items) > limit:
        rest = [sum(counts[s] for _, counts in items[limit:]) for s in splits]
        body.append([f"other ({len(items) - limit})", *rest, sum(rest)])
    return markdown_table([first, *splits, "all"], body)


def _duration_table(duration: dict, splits: list[str]) -> str:
    edges = duration["edges"]
    body = []
    for i in range(len(edges) - 1):
        closing = "]" if i == len(edges) - 2 else ")"
        counts = [duration["counts"][s][i] for s in splits]
        body.append([f"[{edges[i]:.2f}, {edges[i + 1]:.2f}{closing}", *counts, sum(counts)])
    return markdown_table(["duration (s)", *splits, "all"], body)


def _hours_minutes(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{seconds / 60:.1f} min"


def _file_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def statistics_markdown(stats: dict) -> str:
    splits = stats["splits"]
    parts = [markdown_table(["split", "clips"], [[s, stats["clips"][s]] for s in splits])]
    if "duration" not in stats:
        return parts[0]
    duration = stats["duration"]
    parts.append(
        f"### Duration\n\n{_hours_minutes(duration['total_s'])} in all, {duration['mean_s']:.2f} s per clip on average.\n\n"
        + _duration_table(duration, splits)
    )
    parts.append(
        "### Resolution (width x height)\n\n" + _count_table("resolution", stats["resolution"], splits, TOP_RESOLUTIONS)
    )
    parts.append(
        "### Frame rate and codec\n\n"
        + _count_table("fps", stats["fps"], splits)
        + "\n\n"
        + _count_table("codec", stats["codec"], splits)
    )
    for spec in FIELDS:
        if spec.closed:
            note = " (a clip can have several)" if spec.kind == "multi_category" else ""
            table = _count_table("value", stats["categories"][spec.name], splits)
            parts.append(f"### `{spec.name}`{note}\n\n{table}")
    parts.append(f"![Statistics]({PLOT_NAME})")
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- plot


def plot_statistics(stats: dict, path: Path) -> None:
    """Histograms of duration and resolution and the main categories, as one PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 8))
    # fixed margins wide enough for the longest category name: constrained layout took a second per plot
    figure.subplots_adjust(left=0.16, right=0.98, top=0.95, bottom=0.07, wspace=0.75, hspace=0.3)
    axes = figure.subplots(2, 3).ravel()
    duration = stats["duration"]
    edges = np.asarray(duration["edges"])
    counts = np.sum([duration["counts"][s] for s in stats["splits"]], axis=0)
    if edges[-1] - edges[0] < 0.01:  # all clips equally long: one narrow bar at that length
        axes[0].bar(edges[:1], counts, width=max(0.1, 0.05 * edges[0]))
    else:
        axes[0].bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="white")
    axes[0].set(title="Duration", xlabel="seconds", ylabel="clips")
    top = list(stats["resolution"].items())[:TOP_RESOLUTIONS]
    axes[1].barh([name for name, _ in top][::-1], [sum(c.values()) for _, c in top][::-1])
    axes[1].set(title="Resolution (width x height)", xlabel="clips")
    for axis, name in zip(axes[2:], SUMMARY_FIELDS):
        table = stats["categories"][name]
        axis.barh(list(table)[::-1], [sum(c.values()) for c in table.values()][::-1])
        axis.set(title=PANEL_TITLES.get(name, name.replace("_", " ").capitalize()), xlabel="clips")
        axis.tick_params(axis="y", labelsize=8)
    write_if_changed(path, png_bytes(figure, dpi=80))


# ----------------------------------------------------------------------------- card


def _size_category(count: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if count < bound:
            return name
    return "1M<n<10M"


def _split_rule(test_size: float, clips: dict[str, int]) -> str:
    held_out = clips.get("test", 0)
    if test_size <= 0 and not held_out:
        return "All clips are in `train`; nothing is held out."
    if test_size <= 0:
        rule = "none: every new clip goes to `train`"
    elif test_size < 1:
        rule = (f"those whose hash falls below {test_size:g} (a fraction {test_size:g} of them on average), or the "
                "one with the smallest hash when none did and `test` would be empty")
    else:
        rule = f"those with the smallest hashes, up to {int(test_size)} clips in `test`"
    return (
        f"`test` holds {held_out} clip(s), `train` the rest. A clip's split is chosen when it first enters the "
        "dataset, by the SHA-256 hash of its id read as a number in [0, 1); of the clips new to this version, "
        f"`test` took {rule}. Every clip keeps its split from one version to the next, so no test clip of one "
        "version is trained on by the next."
    )


def _storage(presampled: dict | None, stored_bytes: int, source_bytes: int, remuxed: int) -> str:
    if presampled is None:
        text = f"The clips are the original files, unchanged ({_file_size(stored_bytes)})."
        if remuxed:
            text += (f" {remuxed} of them came in a container that datasets' videofolder does not list (such as WebM "
                     "or MPEG-TS) and are stored in Matroska (`.mkv`) instead: the video stream copied packet for "
                     "packet, the frames untouched.")
        return text
    return (
        f"The clips are **presampled**: the frames a model sees were taken at {presampled['fps']:g} frames per second, "
        f"resized so that the sides are multiples of {presampled['factor']} and a frame holds "
        f"{presampled['min_pixels']:,} to {presampled['max_pixels']:,} pixels, and re-encoded as H.264 (CRF "
        f"{presampled['crf']}, yuv420p): {_file_size(stored_bytes)} instead of {_file_size(source_bytes)} of "
        "source video. The original full-resolution clips are not included. Sampling a stored clip again at the "
        "same frame rate returns all of its frames, unresized."
    )


def _label_snippet() -> str:
    """Lines that turn a row into the recipe's JSON label without avlabel installed (what schema.row_to_label does;
    tests/test_builder.py checks that the two agree), written from the schema."""
    names = [spec.name for spec in FIELDS]
    booleans = [spec.name for spec in FIELDS if spec.kind == "boolean"]
    lists = [spec.name for spec in FIELDS if spec.kind == "multi_category"]
    return "\n".join([
        "# the row's label as the recipe's JSON object: its booleans are the strings \"True\" and \"False\", an empty",
        "# list is null",
        "FIELDS = " + pprint.pformat(names, width=110, compact=True).replace("\n", "\n" + " " * len("FIELDS = ")),
        "label = {name: row[name] for name in FIELDS}",
        f"label |= {{name: str(row[name]) for name in {booleans!r}}}",
        f"label |= {{name: row[name] or None for name in {lists!r}}}",
    ])


def _columns() -> str:
    body = [
        ["`video`", "Video", "the clip (decoded with torchcodec when read)"],
        ["`clip_id`", "string", "the clip's id in the source data"],
    ]
    kinds = {
        "category": "string",
        "text": "string",
        "multi_category": "list of strings",
        "difficulty": "int8 (1-4)",
        "boolean": "bool",
    }
    for spec in FIELDS:
        kind = kinds[spec.kind] + (", may be null" if spec.nullable and spec.kind == "text" else "")
        body.append([f"`{spec.name}`", kind, spec.question])
    body += [
        ["`extra`", "string", "keys of the source label beyond the schema, as a JSON object (null when none)"],
        ["`duration`", "float64", "seconds, from the first frame to the end of the last"],
        ["`fps`", "float64", "frames per second of the stored clip"],
        ["`width`, `height`", "int32", "frame size as displayed (after rotation metadata)"],
        ["`codec`", "string", "video codec of the stored clip"],
    ]
    return markdown_table(["column", "type", "meaning"], body)


def _quarantine(problems) -> str:
    if not problems:
        return "Nothing was set aside: every clip had a readable video and a valid label."
    by_stage = Counter(p.stage for p in problems)
    stages = {"scan": "reading the layout, pairing clips with labels", "label": "label validation",
              "probe": "reading the video", "pack": "storing the clip",
              "partner": "its clip or label was set aside"}  # fmt: skip
    table = markdown_table(["stage", "problems"], [[f"{s} ({stages.get(s, s)})", n] for s, n in sorted(by_stage.items())])
    files = len({p.path for p in problems})
    return (
        f"{files} input file(s) were kept out of the dataset. `quarantine.jsonl` lists each one "
        f"(`path`, `stage`, `reason`, and `partner` for a file set aside because its clip or label was).\n\n{table}"
    )


def _reviewed(rows: dict[str, list[dict]]) -> str:
    """How many labels a person checked through `avlabel review` (their label file's `review` key, kept in `extra`)."""
    from avlabel.hub.labelstudio import REVIEW_KEY

    marks = [json.loads(row["extra"]).get(REVIEW_KEY) for split_rows in rows.values() for row in split_rows
             if row.get("extra")]
    marks = [mark for mark in marks if isinstance(mark, dict)]
    if not marks:
        return "No label came from review."
    corrected = sum(len(mark.get("corrected") or ()) for mark in marks)
    return (f"{len(marks)} label(s) came from review: a person checked the model's answer in Label Studio "
            f"(`avlabel review`) and corrected {corrected} field(s); the `{REVIEW_KEY}` key of `extra` says which.")


def rows_fingerprint(rows: dict[str, list[dict]]) -> str:
    """A digest of every row of every split, written into the card's config.

    `load_dataset` of a local folder keys its cache by the folder's name and the card's YAML alone,
    neither the files nor their times: without it, a rebuild with a corrected label, or another
    dataset built into a folder of the same name, loads the table prepared before, labels and
    video paths included.
    """
    ordered = {split: sorted(split_rows, key=lambda row: row["clip_id"]) for split, split_rows in sorted(rows.items())}
    return "sha256:" + hashlib.sha256(json.dumps(ordered, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_card(
    out: Path,
    rows: dict[str, list[dict]],
    problems,
    *,
    layout: str,
    test_size: float,
    license: str,
    pretty_name: str | None,
    presampled: dict | None,
    source_bytes: int,
    remuxed: int = 0,
) -> Path:
    """Write README.md (and statistics.png) for the dataset in `out`; returns the card's path."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    features = column_features()
    total = sum(len(split_rows) for split_rows in rows.values())
    data = DatasetCardData(
        license=license,
        pretty_name=pretty_name or DEFAULT_TITLE,
        language=["en"],
        task_categories=["video-text-to-text"],
        tags=["video", "autonomous-driving", "dashcam", "driving-scene-labels"],
        size_categories=[_size_category(total)],
    )
    split_dict = SplitDict()
    for split, split_rows in rows.items():
        split_dict.add(SplitInfo(split, num_examples=len(split_rows)))
    DatasetInfosDict({"default": DatasetInfo(features=features, splits=split_dict)}).to_dataset_card_data(data)
    config = {"data_files": [{"split": split, "path": f"{split}/**"} for split in rows],
              "description": f"avlabel build, rows {rows_fingerprint(rows)}"}
    MetadataConfigs({"default": {**config, "features": features._to_yaml_list()}}).to_dataset_card_data(data)

    stats = compute_statistics(rows)
    stored_bytes = sum((out / split / row["file_name"]).stat().st_size for split in rows for row in rows[split])
    if total:
        plot_statistics(stats, out / PLOT_NAME)
    else:
        (out / PLOT_NAME).unlink(missing_ok=True)
    body = f"""
# {pretty_name or DEFAULT_TITLE}

Dashcam clips, each with a driving-scene label of {len(FIELDS)} fields: the label schema of the Cosmos Reason
autonomous-vehicle captioning recipe (weather, lighting, road, signals and signs, manoeuvres, a safety analysis,
difficulty and two flags). Built by `avlabel build` from the {layout} input layout: every clip was probed,
every label validated; {total} clip(s) are in the dataset. {_reviewed(rows)}

## How to load

```python
from datasets import load_dataset

dataset = load_dataset("path/to/this/folder")  # or the Hub repo id; add streaming=True to stream
row = dataset["train"][0]
row["video"]  # a torchcodec VideoDecoder

{_label_snippet()}
```

## Columns

{_columns()}

## Splits

{_split_rule(test_size, stats["clips"])}

## Storage

{_storage(presampled, stored_bytes, source_bytes, remuxed)}

## Statistics

{statistics_markdown(stats)}

## Set aside

{_quarantine(problems)}

## License

`{license}`
"""
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = out / CARD_NAME
    write_if_changed(path, str(card))
    return path
