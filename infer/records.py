"""Caption records on disk: append as they finish, resume, merge shards, summarise.

Layout of an output folder:
    captions.jsonl               one record per clip (a one-process run appends here directly)
    captions.rank-<r>.jsonl      what process r of a multi-process run appends, merged at the end
    labels/<clip_id>.label.json  the label of each valid record, in the recipe's layout
    summary.json                 counts and the schema-valid rate per field

Reading and the rule that picks a clip's record live in `avlabel.core.records`.
Records are appended and fsynced batch by batch, so a killed run loses at most the batch
in flight; a line cut off by the kill is dropped (and the file trimmed back to its last
full line) when the folder is next read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from avlabel.core.errors import UsageError
from avlabel.core.layouts import LABEL_SUFFIX

# reading records and picking a clip's record are the core's (evaluation and the catalog read them too);
# the caption command finds them here beside the writing side
from avlabel.core.records import (  # noqa: F401
    CAPTIONS, latest_per_clip, read_all, read_located, read_records, record_files, shard_path, succeeded,
)
from avlabel.core.schema import FIELD_NAMES, label_to_json

SUMMARY = "summary.json"
LABELS = "labels"
# what must match for an earlier record to count as done by this run
RUN_KEYS = ("model", "adapter", "weights_sha", "prompt_sha", "generation", "calibration")


def _trim_partial_line(path: Path) -> None:
    """Cut a last line left unfinished by a killed run, so appends start on a new line."""
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def _same(key: str, earlier: Any, now: Any) -> bool:
    """One setting of an earlier record and of this run agree; a model or adapter folder may be named
    another way (`runs/merged`, `./runs/merged`, its absolute path) by the command that resumes."""
    if earlier == now or (key == "weights_sha" and earlier is None):  # records from before weights were fingerprinted
        return True
    local = key in ("model", "adapter") and isinstance(earlier, str) and isinstance(now, str)
    return local and Path(earlier).exists() and Path(earlier).resolve() == Path(now).resolve()


def check_same_run(records: Iterable[dict[str, Any]], identity: dict[str, Any], out_dir: Path) -> None:
    """Refuse to mix captions made with other settings into one folder."""
    for record in records:
        differing = [key for key in RUN_KEYS if not _same(key, record.get(key), identity[key])]
        if differing:
            raise UsageError(
                f"{out_dir} already holds captions made with a different {', '.join(differing)} "
                f"(clip {record.get('clip_id')!r}); use another --output_dir, or --overwrite to start over"
            )


def done_clip_ids(records: Iterable[dict[str, Any]]) -> set[str]:
    """Clips with a successful record: a rerun skips these and retries failed ones."""
    return {record["clip_id"] for record in records if succeeded(record)}


class RecordWriter:
    """Appends records to one shard, flushed and fsynced after every batch."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _trim_partial_line(path)
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run, closed by close()

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def merge(out_dir: Path, clip_order: list[str]) -> list[dict[str, Any]]:
    """Fold shards and earlier records into captions.jsonl, one record per clip, in input order.

    The new file is written beside the old one and renamed over it, so a crash here
    leaves either the old or the new file, never half of one.
    """
    files = record_files(out_dir)
    chosen = latest_per_clip(located for path in files for located in read_located(path))
    position = {clip_id: index for index, clip_id in enumerate(clip_order)}
    ordered = sorted(chosen.values(), key=lambda r: (position.get(r["clip_id"], len(position)), r["clip_id"]))
    tmp = out_dir / (CAPTIONS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in ordered)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out_dir / CAPTIONS)
    for path in files:
        if path.name != CAPTIONS:
            path.unlink()
    return ordered


def write_labels(out_dir: Path, records: list[dict[str, Any]]) -> dict[str, str]:
    """`labels/<clip_id>.label.json` for every valid record (the recipe's label files); returns {file: why} for
    those the file system refused (a name past its 255 bytes), whose labels stay in captions.jsonl alone."""
    folder = out_dir / LABELS
    folder.mkdir(parents=True, exist_ok=True)
    refused = {}
    for record in records:
        target = folder / f"{record['clip_id']}{LABEL_SUFFIX}"
        try:
            if succeeded(record) and record.get("valid"):
                target.write_text(label_to_json(record["label"], indent=2) + "\n", encoding="utf-8")
            elif target.exists():  # an older run's label for a clip that is no longer valid
                target.unlink()
        except OSError as err:
            refused[str(target)] = err.strerror or str(err)
    return refused


def summarize(records: list[dict[str, Any]], inputs: int, this_run: dict[str, int], identity: dict[str, Any]) -> dict:
    """Counts, token totals and the schema-valid rate per field over the successful records."""
    ok = [r for r in records if succeeded(r)]
    failed = [r for r in records if not succeeded(r)]
    rate = (lambda n: round(n / len(ok), 4)) if ok else (lambda n: None)
    valid = sum(bool(r.get("valid")) for r in ok)
    return {
        **identity,
        "inputs": inputs,
        "captioned": len(ok),
        "failed": len(failed),
        "missing": inputs - len(ok) - len(failed),
        "this_run": this_run,
        "valid": valid,
        "valid_rate": rate(valid),
        "field_valid_rate": {name: rate(sum(name in (r.get("label") or {}) for r in ok)) for name in FIELD_NAMES},
        "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in ok),
        "completion_tokens": sum(r.get("completion_tokens") or 0 for r in ok),
        "failures": {r["clip_id"]: r.get("error") for r in failed},
    }
