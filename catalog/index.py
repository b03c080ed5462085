"""Putting captions and human labels into the catalog, incrementally.

A caption run (`captions.jsonl` from `avlabel caption`) or a builder dataset becomes one
*source*. Re-indexing a source compares each clip's record with what is stored, by a hash
(of the JSON line for captions, so unchanged lines are not even parsed; of the stored values
for human labels): new clips are added, changed ones replaced, clips gone from the input
removed, and the rest left alone, so indexing the same input twice changes nothing.
Each source is indexed in one transaction: an interrupted run leaves the previous state.
Embeddings are a separate, resumable step (`embed_pending`), because on a CPU they are
the slow part; they are committed batch by batch.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from avlabel.core import records, schema
from avlabel.core.schema import CLOSED_FIELD_NAMES, FIELDS, TEXT_FIELD_NAMES

from . import embeddings, vectors
from .store import (
    Annotation,
    CONFIDENCE_COLUMNS,
    MULTI_FIELDS,
    CatalogError,
    connect,
    members_table,
    to_column,
)

# Column order of an annotations insert (id first, then provenance, then the label fields).
_COLUMNS = (
    "id", "source", "kind", "clip_id", "video", "split", "model", "adapter", "prompt_sha",
    "status", "valid", "errors", "record_sha", "text_sha", *schema.FIELD_NAMES, "clip_confidence", *CONFIDENCE_COLUMNS,
)
_QUOTED_COLUMNS = ", ".join('"%s"' % column for column in _COLUMNS)
_INSERT = f"INSERT INTO annotations ({_QUOTED_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMNS))})"


@dataclass
class IndexReport:
    """What indexing one source did; `problems` are input lines set aside or corrected, with why."""

    source: str
    kind: str
    records: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)

    def summary(self) -> str:
        return (
            f"{self.source} ({self.kind}): {self.records} records, {self.added} added, {self.updated} updated, "
            f"{self.unchanged} unchanged, {self.removed} removed, {len(self.problems)} problems, {self.seconds:.1f}s"
        )


@dataclass(kw_only=True)
class _Entry(Annotation):
    """One clip of a source, ready to store."""

    split: str | None = None
    sha: str | None = None  # the record's hash; by default, of every stored value

    def stored(self) -> tuple[str, tuple]:
        """(record_sha, the stored values after `id, source, kind`)."""
        text = embeddings.embedding_text(self.label)
        fields = tuple(to_column(spec, self.label.get(spec.name)) for spec in FIELDS)
        confidences = (self.clip_confidence, *(self.confidence.get(name) for name in CLOSED_FIELD_NAMES))
        head = (self.clip_id, self.video, self.split, self.model, self.adapter, self.prompt_sha,
                self.status, int(self.valid), json.dumps(self.errors, sort_keys=True, ensure_ascii=False))
        sha = self.sha or hashlib.sha256(json.dumps([head, fields, confidences], ensure_ascii=False).encode()).hexdigest()
        return sha, (*head, sha, embeddings.text_sha(text), *fields, *confidences)


def _probability(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    return None


def _caption_confidence(record: dict, label: dict, where: str, report: IndexReport) -> tuple[dict[str, float], float | None]:
    """The model's probability per closed field it answered, and for the clip, where the record carries them.

    `avlabel caption` writes `confidence` as {field: p} with `clip_confidence` beside it. Free-text
    signals (`text_mean_logprob`) are not probabilities of an answer and are not stored. Records
    without confidence are stored without it.
    """
    per_field, clip = record.get("confidence"), record.get("clip_confidence")
    if not isinstance(per_field, dict):
        return {}, None
    confidence = {}
    for name, value in per_field.items():
        if name not in CLOSED_FIELD_NAMES or name not in label:
            continue  # free text, not a field, or an answer set aside: nothing to be confident about
        if _probability(value) is None:
            report.problems.append(f"{where}: clip {record['clip_id']}: confidence of {name} is {value!r}, "
                                   "not a probability from 0 to 1; stored without it")
            continue
        confidence[name] = _probability(value)
    if clip is not None and _probability(clip) is None:
        report.problems.append(f"{where}: clip {record['clip_id']}: clip confidence {clip!r} is not a probability "
                               "from 0 to 1; stored without it")
    return confidence, _probability(clip)


_CHOICES = {spec.name: frozenset(spec.choices) for spec in FIELDS if spec.kind in ("category", "multi_category")}


def _canonical_value(spec: schema.LabelField, value: Any) -> bool:
    """Whether `value` is already what the schema's normalisation makes of it (free text: any text)."""
    if value is None:
        return spec.nullable
    if spec.kind == "text":
        return isinstance(value, str) and value != "" and value == value.strip() and value.lower() not in ("null", "none")
    if spec.kind == "category":
        return isinstance(value, str) and value in _CHOICES[spec.name]
    if spec.kind == "multi_category":  # a non-empty list of distinct known values ([] is written null)
        return (isinstance(value, list) and value != [] and len(set(value)) == len(value)
                and all(isinstance(item, str) and item in _CHOICES[spec.name] for item in value))
    if spec.kind == "difficulty":
        return type(value) is int and value in schema.DIFFICULTY_LEVELS
    return value in ("True", "False")  # boolean


def _canonical(label: dict) -> bool:
    return all(name in schema.FIELDS_BY_NAME and _canonical_value(schema.FIELDS_BY_NAME[name], value)
               for name, value in label.items())


def _caption_entry(record: dict, where: str, report: IndexReport) -> _Entry:
    clip_id = record["clip_id"]
    status = record.get("status") or "ok"
    if status not in ("ok", "failed"):
        report.problems.append(f"{where}: unknown status {status!r}; stored as failed")
        status = "failed"
    errors = {k: list(v) for k, v in (record.get("errors") or {}).items()}
    if record.get("error"):
        errors.setdefault("<caption>", []).append(str(record["error"]))
    raw_label = record.get("label") or {}
    if not isinstance(raw_label, dict):
        report.problems.append(f"{where}: label is not an object; stored without fields")
        raw_label = {}
    # `avlabel caption` stores canonical labels, taken as they are; any other label goes through the
    # schema's normalisation, which keeps a hand-edited or older file from putting an unknown value
    # into a typed column and says what is wrong (run on every record it is most of indexing's time)
    label, problems = (raw_label, {}) if _canonical(raw_label) else schema.check_label(raw_label)
    bad = False
    for name, msgs in problems.items():
        if name not in raw_label:
            continue
        if name not in schema.FIELDS_BY_NAME:
            report.problems.append(f"{where}: clip {clip_id}: {name!r} is not a field of the schema; ignored")
            continue
        bad = True
        report.problems.append(f"{where}: clip {clip_id}: {name} {'; '.join(msgs)}; stored as missing")
        errors.setdefault(name, []).extend(msgs)
    # a field is answered exactly when `errors` doesn't name it: null ("none apply") stays
    # distinguishable from no answer, which a NULL column alone can't tell
    for name in schema.FIELD_NAMES:
        if name not in label and name not in errors:
            errors[name] = ["is missing"]
    confidence, clip_confidence = _caption_confidence(record, label, where, report)
    return _Entry(clip_id=clip_id, video=record.get("video"), model=record.get("model"), adapter=record.get("adapter"),
                  prompt_sha=record.get("prompt_sha"), status=status,
                  valid=bool(record.get("valid")) and status == "ok" and not bad, errors=errors, label=label,
                  confidence=confidence, clip_confidence=clip_confidence)


def _read_captions(files: list[Path], stored: dict[str, tuple[str, str]], report: IndexReport
                   ) -> tuple[dict[str, _Entry], set[str]]:
    """(entries to write, clips whose stored record is still current): one record per clip, chosen as
    captioning and evaluation choose it (avlabel.core.records.keeps_earlier), over the run's merged file
    and the shards of an unfinished multi-process run.

    A record's hash is the hash of its line, so a line already in the catalog (`stored`: line hash
    -> (clip id, status)) is recognised without parsing it: re-indexing a grown or partly rewritten run
    only parses the lines that are new.
    """
    chosen: dict[str, tuple[bool, _Entry | None]] = {}  # clip -> (succeeded, entry to write or None: the stored one stands)
    for path in files:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                sha = hashlib.sha256(line.rstrip(b"\r\n")).hexdigest()
                if sha in stored:
                    clip_id, status = stored[sha]
                    entry = None
                else:
                    try:
                        record = json.loads(line)
                        clip_id = record["clip_id"]
                        if not isinstance(clip_id, str) or not clip_id:
                            raise ValueError(f"clip_id must be a non-empty string, got {clip_id!r}")
                    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                        report.problems.append(f"{where}: not a caption record ({err}); set aside")
                        continue
                    entry = _caption_entry(record, where, report)
                    entry.sha, status = sha, entry.status
                current = chosen.get(clip_id)
                keep_earlier = current is not None and records.keeps_earlier(current[0], status == "ok")
                if current is not None:
                    report.problems.append(f"{where}: {records.repeat_problem(clip_id, keep_earlier)}")
                if not keep_earlier:
                    chosen[clip_id] = (status == "ok", entry)
    entries = {clip: entry for clip, (_, entry) in chosen.items() if entry is not None}
    return entries, {clip for clip, (_, entry) in chosen.items() if entry is None}


def _read_dataset(dataset: str, splits: Iterable[str] | None, report: IndexReport) -> dict[str, _Entry]:
    """Human labels of a builder dataset (a folder or Hub id), every split unless told."""
    import datasets

    from avlabel.core.loading import load_clip_dataset

    loaded = load_clip_dataset(dataset)
    entries: dict[str, _Entry] = {}
    for split in splits or list(loaded):
        if split not in loaded:
            raise CatalogError(f"{dataset}: no split {split!r} (splits: {', '.join(loaded)})")
        # decode=False gives the file path; decoding every clip just to index it would be slow
        rows = loaded[split].cast_column("video", datasets.Video(decode=False))
        rows = rows.select_columns(["video", "clip_id", *schema.FIELD_NAMES])
        for index, row in enumerate(rows):
            where = f"{dataset}[{split}][{index}]"
            try:
                label = schema.normalize_label(schema.row_to_label(row), where)
            except (schema.LabelError, KeyError, TypeError, ValueError) as err:
                report.problems.append(f"{err}; set aside")
                continue
            clip_id = row["clip_id"]
            if clip_id in entries:
                report.problems.append(f"{where}: clip {clip_id} is also in split {entries[clip_id].split}; set aside")
                continue
            entries[clip_id] = _Entry(clip_id=clip_id, video=(row["video"] or {}).get("path"), split=split, label=label)
    return entries


def _store(con: sqlite3.Connection, name: str, kind: str, path: str, content_sha: str,
           read, report: IndexReport) -> None:
    """Make the stored rows of `name` equal what `read(stored)` returns, touching only what differs.

    `read` gets {record_sha: (clip_id, status)} of the stored rows and returns (entries, kept): the records
    to write and the clips whose stored record is current as it is.
    """
    with con:  # one transaction: an interrupted run leaves the previous state
        known = con.execute("SELECT kind, records FROM sources WHERE name = ?", (name,)).fetchone()
        if known and known[0] != kind:
            raise CatalogError(f"source name {name!r} is already used by a {known[0]} source; choose another name")
        rows = con.execute("SELECT id, clip_id, record_sha, status FROM annotations WHERE source = ?", (name,)).fetchall()
        stored = {clip: (row_id, sha) for row_id, clip, sha, _ in rows}
        entries, kept = read({sha: (clip, status) for _, clip, sha, status in rows})
        report.records = len(entries) + len(kept)
        report.unchanged = len(kept)
        next_id = (con.execute("SELECT max(id) FROM annotations").fetchone()[0] or 0) + 1
        inserts, members, stale = [], {f: [] for f in MULTI_FIELDS}, []
        for clip_id in kept:
            stored.pop(clip_id)
        for clip_id, entry in entries.items():
            sha, values = entry.stored()
            old = stored.pop(clip_id, None)
            if old and old[1] == sha:
                report.unchanged += 1
                continue
            if old:
                stale.append(old[0])
                report.updated += 1
            else:
                report.added += 1
            inserts.append((next_id, name, kind, *values))
            for f in MULTI_FIELDS:
                members[f].extend((value, next_id) for value in entry.label.get(f) or ())
            next_id += 1
        stale.extend(row_id for row_id, _ in stored.values())
        report.removed = len(stored)
        if stale:
            ids = [(row_id,) for row_id in stale]
            for f in MULTI_FIELDS:
                con.executemany(f"DELETE FROM {members_table(f)} WHERE annotation_id = ?", ids)
            con.executemany("DELETE FROM annotations WHERE id = ?", ids)
        con.executemany(_INSERT, inserts)
        for f in MULTI_FIELDS:
            con.executemany(f"INSERT INTO {members_table(f)} VALUES (?, ?)", members[f])
        if report.changed or not known or known[1] != report.records:
            provenance = {
                attr: json.dumps([row[0] for row in con.execute(
                    f"SELECT DISTINCT {attr} FROM annotations WHERE source = ? AND {attr} IS NOT NULL ORDER BY 1", (name,))])
                for attr in ("model", "adapter", "prompt_sha")
            }
            con.execute(
                "INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, kind, path, content_sha, provenance["model"], provenance["adapter"], provenance["prompt_sha"],
                 report.records, datetime.now(timezone.utc).isoformat(timespec="seconds")),
            )
        elif known:  # same rows, another file (e.g. re-ordered): remember it, so the next run can skip it
            con.execute("UPDATE sources SET content_sha = ?, path = ? WHERE name = ?", (content_sha, path, name))


def _files_sha(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.name).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def index_run(db: str | Path, captions: str | Path, run: str | None = None) -> IndexReport:
    """Index one caption run; `run` names it (default: the output folder's name)."""
    started = time.perf_counter()
    files = records.run_files(Path(captions))  # with the shards of an unfinished multi-process run
    name = run or files[0].resolve().parent.name
    report = IndexReport(name, "model")
    con = connect(db)
    try:
        content_sha = _files_sha(files)
        row = con.execute("SELECT content_sha, records FROM sources WHERE name = ?", (name,)).fetchone()
        if row and row[0] == content_sha:  # the very same files: nothing to compare
            report.records = report.unchanged = row[1]
        else:
            _store(con, name, "model", str(Path(captions).resolve()), content_sha,
                   lambda stored: _read_captions(files, stored, report), report)
    finally:
        con.close()
    report.seconds = time.perf_counter() - started
    return report


def index_dataset(db: str | Path, dataset: str | Path, name: str | None = None,
                  splits: Iterable[str] | None = None) -> IndexReport:
    """Index the human labels of a builder dataset (every split unless `splits` says)."""
    started = time.perf_counter()
    name = name or Path(str(dataset)).resolve().name
    report = IndexReport(name, "human")
    entries = _read_dataset(str(dataset), splits, report)
    for entry in entries.values():
        entry.sha = entry.stored()[0]
    content_sha = hashlib.sha256(json.dumps([e.sha for e in entries.values()]).encode()).hexdigest()
    con = connect(db)
    try:
        _store(con, name, "human", str(dataset), content_sha, lambda stored: (entries, set()), report)
    finally:
        con.close()
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class EmbedReport:
    texts: int  # texts embedded now
    seconds: float
    pending: int  # texts still without a vector (after `limit`)
    vectors_indexed: int = 0  # vectors added to the vector index
    index_seconds: float = 0.0

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        indexed = f"; {self.vectors_indexed} vectors indexed in {self.index_seconds:.1f}s" if self.vectors_indexed else ""
        return (f"embedded {self.texts} texts in {self.seconds:.1f}s ({self.texts_per_s:.1f} texts/s, "
                f"{embeddings.MODEL_ID}); {self.pending} pending{indexed}")


def embed_pending(db: str | Path, batch_size: int = 64, limit: int | None = None, progress: bool = False) -> EmbedReport:
    """Embed every indexed text that has no vector yet, then add the new vectors to the vector
    index; resumable (commits per chunk)."""
    con = connect(db, create=False)
    try:
        text_columns = ", ".join(f'"{name}"' for name in TEXT_FIELD_NAMES)
        last_annotation = con.execute("SELECT max(id) FROM annotations").fetchone()[0] or 0
        pending = {}
        for row in con.execute(
            f"SELECT a.text_sha, {text_columns} FROM annotations a LEFT JOIN embeddings e USING (text_sha) "
            "WHERE a.text_sha IS NOT NULL AND e.text_sha IS NULL ORDER BY a.id"
        ):
            pending.setdefault(row[0], embeddings.embedding_text(dict(zip(TEXT_FIELD_NAMES, row[1:]))))
        todo = list(pending.items())[:limit]
        if todo:
            embeddings.load_model()  # loading (seconds) is not part of the throughput
        started = time.perf_counter()
        chunk = batch_size * 8
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="embedding", unit="text")
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            encoded = embeddings.encode([text for _, text in part], batch_size=batch_size)
            with con:
                con.executemany("INSERT OR IGNORE INTO embeddings VALUES (?, ?)",
                                [(sha, embeddings.to_blob(vector)) for (sha, _), vector in zip(part, encoded)])
            if bar:
                bar.update(len(part))
        if bar:
            bar.close()
        if len(todo) == len(pending):  # every annotation up to here has its vector (search reads this)
            with con:
                con.execute("INSERT OR REPLACE INTO meta VALUES ('embedded_through', ?)", (str(last_annotation),))
        seconds = time.perf_counter() - started
        indexing = time.perf_counter()
        added = vectors.update(con, progress=progress)
        return EmbedReport(len(todo), seconds, len(pending) - len(todo), added, time.perf_counter() - indexing)
    finally:
        con.close()
