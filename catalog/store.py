"""The catalog database: one SQLite file whose tables are written from the label schema.

Why SQLite and not DuckDB: full-text search is the heart of the catalog, and SQLite's FTS5
(with BM25 ranking) is compiled into Python's own `sqlite3`, so it works on any machine with
no download. DuckDB's `fts` extension is fetched from extensions.duckdb.org on first use
(it fails offline: verified here with duckdb 2.0.1), and the extension wheels on PyPI only
cover DuckDB up to 1.4.4. SQLite also gives what a catalog needs beyond search: STRICT
tables whose CHECK constraints hold the schema's category lists, incremental upserts, WAL
for readers beside a writer, and a single file that any tool opens.

Tables (all derived from `avlabel.core.schema.FIELDS`, never a hand-written field list):
  sources       one row per indexed caption run or human-label dataset, with its provenance
  annotations   one row per (source, clip): provenance columns + one typed column per field, and
                the model's confidence (probability of its answer) per closed field and per clip
  <field>__members   one row per element of a multi-category field (membership queries)
  annotations_fts    FTS5 index over the free-text fields (external content, kept by triggers)
  embeddings    sentence vectors keyed by the hash of the text they embed (computed once)
The semantic index over the embeddings (`vectors.py`) is a file beside the catalog.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avlabel.core.schema import CLOSED_FIELD_NAMES, FIELDS, TEXT_FIELD_NAMES, LabelField

# Bump when the layout below changes; a catalog written by another layout is refused.
LAYOUT_VERSION = 2  # 2: the model's confidence per closed field and per clip

MULTI_FIELDS = tuple(f.name for f in FIELDS if f.kind == "multi_category")


def confidence_column(field: str) -> str:
    """The column of the model's probability for its answer to a closed field."""
    return f"{field}__confidence"


CONFIDENCE_COLUMNS = tuple(map(confidence_column, CLOSED_FIELD_NAMES))


@dataclass(kw_only=True)
class Annotation:
    """One clip's row of one source, a model's caption or a human label: what indexing stores and a query returns."""

    clip_id: str
    video: str | None
    model: str | None = None
    adapter: str | None = None
    prompt_sha: str | None = None
    status: str = "ok"
    valid: bool = True
    errors: dict[str, list[str]] = field(default_factory=dict)
    label: dict[str, Any]
    confidence: dict[str, float] = field(default_factory=dict)  # closed field -> the model's probability of its answer
    clip_confidence: float | None = None


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def column_sql(spec: LabelField) -> str:
    """The typed column of one schema field; CHECK constraints hold the closed value sets."""
    name = f'"{spec.name}"'
    if spec.kind == "category":
        return f"{name} TEXT CHECK ({name} IN ({', '.join(map(_quote, spec.choices))}))"
    if spec.kind == "multi_category":  # the list as JSON for display; membership lives in <field>__members
        return f"{name} TEXT CHECK ({name} IS NULL OR json_valid({name}))"
    if spec.kind == "difficulty":
        return f"{name} INTEGER CHECK ({name} IN ({', '.join(spec.choices)}))"
    if spec.kind == "boolean":
        return f"{name} INTEGER CHECK ({name} IN (0, 1))"
    return f"{name} TEXT"


def _probability_sql(column: str) -> str:
    return f'"{column}" REAL CHECK ("{column}" IS NULL OR "{column}" BETWEEN 0 AND 1)'


def members_table(field: str) -> str:
    return f'"{field}__members"'


def _layout_sql() -> list[str]:
    fields = ",\n  ".join(column_sql(spec) for spec in FIELDS)
    # the model's probability of its answer: per closed field, and one for the clip (captions that record it)
    confidences = ",\n  ".join(_probability_sql(column) for column in ("clip_confidence", *CONFIDENCE_COLUMNS))
    text_columns = ", ".join(f'"{name}"' for name in TEXT_FIELD_NAMES)
    new_values = ", ".join(f'new."{name}"' for name in TEXT_FIELD_NAMES)
    old_values = ", ".join(f'old."{name}"' for name in TEXT_FIELD_NAMES)
    statements = [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT) STRICT",
        """CREATE TABLE sources (
  name TEXT PRIMARY KEY,
  kind TEXT NOT NULL CHECK (kind IN ('model', 'human')),
  path TEXT NOT NULL,
  content_sha TEXT NOT NULL,
  models TEXT NOT NULL,
  adapters TEXT NOT NULL,
  prompt_shas TEXT NOT NULL,
  records INTEGER NOT NULL,
  indexed_at TEXT NOT NULL) STRICT""",
        f"""CREATE TABLE annotations (
  id INTEGER PRIMARY KEY,
  source TEXT NOT NULL REFERENCES sources(name),
  kind TEXT NOT NULL CHECK (kind IN ('model', 'human')),
  clip_id TEXT NOT NULL,
  video TEXT,
  split TEXT,
  model TEXT,
  adapter TEXT,
  prompt_sha TEXT,
  status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
  valid INTEGER NOT NULL CHECK (valid IN (0, 1)),
  errors TEXT NOT NULL,
  record_sha TEXT NOT NULL,
  text_sha TEXT,
  {fields},
  {confidences},
  UNIQUE (source, clip_id)) STRICT""",
        "CREATE INDEX annotations_clip ON annotations (clip_id, kind)",
        "CREATE INDEX annotations_text_sha ON annotations (text_sha)",
        "CREATE INDEX annotations_clip_confidence ON annotations (clip_confidence)",
        *(f'CREATE INDEX "annotations_{name}" ON annotations ("{name}")' for name in CLOSED_FIELD_NAMES if name not in MULTI_FIELDS),
        f"""CREATE VIRTUAL TABLE annotations_fts USING fts5({text_columns},
  content='annotations', content_rowid='id', tokenize='porter unicode61')""",
        # external-content FTS: the triggers keep the index in step with the table
        f"""CREATE TRIGGER annotations_ai AFTER INSERT ON annotations BEGIN
  INSERT INTO annotations_fts(rowid, {text_columns}) VALUES (new.id, {new_values}); END""",
        f"""CREATE TRIGGER annotations_ad AFTER DELETE ON annotations BEGIN
  INSERT INTO annotations_fts(annotations_fts, rowid, {text_columns}) VALUES ('delete', old.id, {old_values}); END""",
        "CREATE TABLE embeddings (text_sha TEXT PRIMARY KEY, vector BLOB NOT NULL) STRICT",
    ]
    for spec in FIELDS:
        if spec.kind == "multi_category":
            statements.append(
                f"""CREATE TABLE {members_table(spec.name)} (
  value TEXT NOT NULL CHECK (value IN ({', '.join(map(_quote, spec.choices))})),
  annotation_id INTEGER NOT NULL REFERENCES annotations(id),
  PRIMARY KEY (value, annotation_id)) STRICT, WITHOUT ROWID"""
            )
            statements.append(
                f'CREATE INDEX "{spec.name}__members_by_annotation" ON {members_table(spec.name)} (annotation_id)'
            )
    return statements


def _fields_signature() -> str:
    """What the stored columns were derived from: a catalog of another schema is refused."""
    return json.dumps([[f.name, f.kind, list(f.choices), f.nullable] for f in FIELDS])


class CatalogError(ValueError):
    """A catalog file that can't be used as it is; the message names the file and what to do."""


def connect(path: str | Path, create: bool = True) -> sqlite3.Connection:
    """Open (and, if new, create) a catalog. Refuses a file written for another schema."""
    path = Path(path)
    if not create and not path.exists():
        raise CatalogError(f"{path}: no catalog here (index captions or a dataset into it first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(path)
        con.execute("PRAGMA journal_mode=WAL")
        existing = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise CatalogError(f"{path}: not a catalog database ({err})") from None
    con.execute("PRAGMA synchronous=NORMAL")
    # a million annotations make ~10 secondary indexes of tens of MB each: inserting into them
    # with SQLite's default 2 MB page cache goes back to the file for most pages
    con.execute("PRAGMA cache_size=-262144")  # KiB: 256 MB
    if "meta" not in existing:
        if existing:
            raise CatalogError(f"{path}: an SQLite file, but not a catalog (tables: {', '.join(sorted(existing))})")
        with con:
            for statement in _layout_sql():
                con.execute(statement)
            con.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("layout_version", str(LAYOUT_VERSION)), ("fields", _fields_signature())],
            )
        return con
    meta = dict(con.execute("SELECT key, value FROM meta"))
    if meta.get("layout_version") != str(LAYOUT_VERSION) or meta.get("fields") != _fields_signature():
        con.close()
        raise CatalogError(
            f"{path}: written for another version of the label schema or catalog layout; "
            "index into a new catalog file (the captions and datasets it was built from are unchanged)"
        )
    return con


def to_column(spec: LabelField, value: Any) -> Any:
    """A normalised label value as stored: booleans 0/1, metaaction lists as JSON."""
    if value is None:
        return None
    if spec.kind == "boolean":
        return int(value == "True")
    if spec.kind == "multi_category":
        return json.dumps(value, ensure_ascii=False)
    return value


def from_column(spec: LabelField, value: Any) -> Any:
    """The inverse of `to_column`: back to the recipe's JSON label value."""
    if value is None:
        return None
    if spec.kind == "boolean":
        return "True" if value else "False"
    if spec.kind == "multi_category":
        return json.loads(value)
    return value


def row_label(row: sqlite3.Row | dict) -> dict[str, Any]:
    """The label fields of an annotations row, as a recipe label (absent fields are None)."""
    return {spec.name: from_column(spec, row[spec.name]) for spec in FIELDS}


def row_confidence(row: sqlite3.Row | dict) -> dict[str, float]:
    """The recorded confidence per closed field of an annotations row (fields without one left out)."""
    return {name: row[column] for name, column in zip(CLOSED_FIELD_NAMES, CONFIDENCE_COLUMNS) if row[column] is not None}
