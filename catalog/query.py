"""Searching the catalog: structured filters, full text and meaning, in one query.

Filters are short readable expressions, one per condition, all of which must hold:

    weather=Heavy rain                      a category (case and hyphens folded, as the schema does)
    lighting=Night*                         a glob over the category's values (must match one)
    weather=Light rain|Heavy rain           any of
    metaaction=Yield to VRUs                the list contains it (any field name part that is unique works)
    metaaction=Yield to VRUs&Vehicle following   contains all of them
    metaaction!=React to animals            contains none of them;  metaaction=null: no manoeuvre
    driving_difficulty>=3, difficulty=2..3  integer comparisons and ranges
    interesting_scenario=true               booleans (true/false/yes/no)
    road_type~collector                     words in one free-text field (full-text, stemmed)
    run=sft, model=..., adapter=..., clip_id=..., split=..., valid=true   provenance
    human.lighting=Night*                   the same, on the human label of the clip (ground truth)
    confidence<0.5, lighting.confidence<0.6 the model's probability of its answer: the clip's, a field's
                                            (captions that record it; see `avlabel caption`)

Every value goes through the schema's normalisation, so a value the schema does not know
fails with the list of values it does know. `text` is a full-text query over the free-text
fields (BM25 through SQLite FTS5, porter-stemmed; "quoted phrases", OR, NOT, prefix*, and
field:word work); `semantic` ranks by cosine similarity of sentence embeddings and keeps the
`neighbours` annotations nearest in meaning among those that pass the rest of the query,
found through the catalog's vector index (`vectors.py`) once it holds enough vectors. When
text and meaning are both given, the ranks are fused (reciprocal rank fusion, k=60), so
neither score scale dominates. `sort` orders the hits by a confidence instead (least
confident first; "-confidence" for the most confident). Counts per category are over the
whole matching set, not just the hits shown.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sqlite3
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from avlabel.core import schema
from avlabel.core.schema import CLOSED_FIELD_NAMES, FIELDS, FIELDS_BY_NAME, TEXT_FIELD_NAMES, LabelField

from . import embeddings, vectors
from .store import (
    Annotation,
    MULTI_FIELDS,
    confidence_column,
    connect,
    members_table,
    row_confidence,
    row_label,
)

RRF_K = 60  # the usual constant of reciprocal rank fusion (Cormack et al., 2009)
PROVENANCE = {"run": "source", "source": "source", "model": "model", "adapter": "adapter",
              "prompt_sha": "prompt_sha", "clip_id": "clip_id", "split": "split", "status": "status", "valid": "valid"}
# every boolean field normalises true/yes/false/no alike; `valid` borrows that reading
_BOOLEAN = next(f for f in FIELDS if f.kind == "boolean")
_OPERATOR = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(!=|>=|<=|=|>|<|~)\s*(.*?)\s*$")
CLIP_CONFIDENCE = "clip_confidence"
# the index is asked for this many times `neighbours` at first, growing 4x a round while a filter
# leaves too few; past ANN_ROUNDS the matching rows are few enough to scan instead
ANN_OVERFETCH, ANN_ROUNDS = 2, 3


class QueryError(ValueError):
    """A query the catalog can't run; the message says what is wrong and what would be valid."""

    exit_code = 2  # a query is the command line: change an argument


@dataclass(frozen=True)
class Filter:
    """One parsed condition: `field op values` (values already canonical)."""

    field: str  # a schema field name or a provenance column
    op: str
    values: tuple
    on_human: bool = False  # evaluated on the human label of the same clip
    text: str = ""  # as the user wrote it

    def __str__(self) -> str:
        return self.text


# --------------------------------------------------------------------------- parsing


def resolve_field(name: str) -> str:
    """A schema field or provenance name from what the user typed (exact, or a unique part)."""
    if name in FIELDS_BY_NAME or name in PROVENANCE:
        return name
    candidates = [f for f in schema.FIELD_NAMES if name.lower() in f]
    if len(candidates) == 1:
        return candidates[0]
    known = ", ".join([*schema.FIELD_NAMES, *PROVENANCE])
    if candidates:
        raise QueryError(f"field {name!r} is ambiguous: it could be {', '.join(candidates)}")
    raise QueryError(f"unknown field {name!r}; fields are: {known}")


def _canonical(spec: LabelField, value: Any) -> Any:
    """The schema's canonical form of one field value, or a QueryError with the schema's reason."""
    label, problems = schema.check_label({spec.name: value})
    if spec.name in problems:
        raise QueryError(f"{spec.name}: {'; '.join(problems[spec.name])}")
    return label[spec.name]


def _category_values(spec: LabelField, text: str) -> tuple[str, ...]:
    """`a|b|glob*` to canonical category values; a glob must match at least one value."""
    values: list[str] = []
    for part in (p.strip() for p in text.split("|")):
        if any(ch in part for ch in "*?["):
            matched = [c for c in spec.choices if fnmatch.fnmatch(c.lower(), part.lower())]
            if not matched:
                raise QueryError(f"{spec.name}: {part!r} matches none of: {', '.join(spec.choices)}")
            values += matched
        elif spec.kind == "multi_category":
            values += _canonical(spec, [part]) or []
        else:
            values.append(_canonical(spec, part))
    return tuple(dict.fromkeys(values))


def parse_filter(expression: str) -> Filter:
    """Parse one `field op value` expression (see the module docstring); QueryError if invalid."""
    match = _OPERATOR.match(expression)
    if not match or not match.group(3):
        raise QueryError(f"can't read filter {expression!r}: write field=value, field!=value, "
                         "field>=n, field~words (e.g. \"weather=Heavy rain\")")
    name, op, text = match.groups()
    on_human = name.startswith("human.")
    name = name.removeprefix("human.")
    if name == "confidence" or name.endswith(".confidence"):
        if on_human:
            raise QueryError(f"{expression!r}: human labels carry no confidence; filter on the captions' {name}")
        return _confidence_filter(expression, confidence_of(name), op, text)
    name = resolve_field(name)
    if on_human and name in PROVENANCE:
        raise QueryError(f"{expression!r}: human labels have no {name}; filter on label fields with human.<field>")

    def refuse(kinds: str) -> QueryError:
        return QueryError(f"{expression!r}: operator {op} does not apply to {name} ({kinds})")

    if name in PROVENANCE:
        if op not in ("=", "!="):
            raise refuse("a provenance column: use = or !=")
        values = tuple(p.strip() for p in text.split("|"))
        if name == "valid":
            values = tuple(int(_canonical(_BOOLEAN, v) == "True") for v in values)
        return Filter(name, op, values, on_human, expression)

    spec = FIELDS_BY_NAME[name]
    if text.lower() in ("null", "none") and op in ("=", "!="):
        if not spec.nullable:
            raise QueryError(f"{expression!r}: {name} is a required field, never null; filter on one of its values")
        return Filter(name, op, (None,), on_human, expression)
    if spec.kind == "text":
        if op not in ("=", "!=", "~"):
            raise refuse("free text: use ~ for words, = for the exact text")
        return Filter(name, op, (schema.clean_text(text),), on_human, expression)
    if spec.kind == "difficulty":
        if op == "~":
            raise refuse("an integer: use =, !=, <, <=, >, >= or a..b")
        if ".." in text:
            if op != "=":
                raise refuse("a range is written field=a..b")
            low, high = (_canonical(spec, part) for part in text.split("..", 1))
            return Filter(name, "between", (low, high), on_human, expression)
        return Filter(name, op, tuple(_canonical(spec, p.strip()) for p in text.split("|")), on_human, expression)
    if op not in ("=", "!="):
        raise refuse(f"a {spec.kind.replace('_', ' ')}: use = or !=")
    if spec.kind == "boolean":
        return Filter(name, op, tuple(int(_canonical(spec, p.strip()) == "True") for p in text.split("|")), on_human, expression)
    if spec.kind == "multi_category" and "&" in text:
        if op != "=":
            raise refuse("all-of (a&b) is written field=a&b")
        values = tuple(dict.fromkeys(v for part in text.split("&") for v in _category_values(spec, part)))
        return Filter(name, "all", values, on_human, expression)
    return Filter(name, op, _category_values(spec, text), on_human, expression)


def confidence_of(name: str) -> str:
    """The column of `confidence` (the clip's) or `<field>.confidence` (a closed field's answer)."""
    if name == "confidence":
        return CLIP_CONFIDENCE
    field_name = resolve_field(name.removesuffix(".confidence"))
    if field_name not in CLOSED_FIELD_NAMES:
        raise QueryError(f"{name}: confidence is recorded for the closed fields only ({', '.join(CLOSED_FIELD_NAMES)})")
    return confidence_column(field_name)


def _confidence_filter(expression: str, column: str, op: str, text: str) -> Filter:
    if op in ("!=", "~"):
        raise QueryError(f"{expression!r}: operator {op} does not apply to a confidence: use <, <=, >, >= or =a..b")
    parts = text.split("..", 1) if op == "=" and ".." in text else [text]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if not values or not all(0 <= value <= 1 for value in values):
        raise QueryError(f"{expression!r}: a confidence is a probability from 0 to 1, got {text!r}")
    return Filter(column, "between" if len(values) == 2 else op, values, False, expression)


def _sort_column(sort: str) -> tuple[str, bool]:
    """(column, most confident first) of a sort key: confidence, <field>.confidence, with "-" for descending."""
    name = sort.strip().removeprefix("-")
    if name != "confidence" and not name.endswith(".confidence"):
        raise QueryError(f"can't sort by {sort!r}: sort by confidence or <field>.confidence "
                         "(least confident first; -confidence for the most confident first)")
    return confidence_of(name), sort.strip().startswith("-")


_FTS_TOKEN = re.compile(r'(?:(\w+):)?("[^"]*"|\S+)')


def fts_query(text: str) -> str:
    """A user's words as an FTS5 expression: every word must appear (stemmed); phrases in
    quotes, OR / NOT / AND between terms, a trailing * for a prefix, field:word for one field."""
    parts: list[str] = []
    for column, token in _FTS_TOKEN.findall(text):
        if not column and token in ("AND", "OR", "NOT"):
            parts.append(token)
            continue
        prefix = token.endswith("*") and not token.endswith('"')
        words = token.strip('"').rstrip("*")
        if not re.search(r"\w", words):
            continue  # punctuation alone: nothing FTS could match
        term = '"' + words.replace('"', '""') + '"' + ("*" if prefix else "")
        if column:
            name = resolve_field(column)
            if name not in TEXT_FIELD_NAMES:
                raise QueryError(f"{column}:{words}: full-text search covers the free-text fields only ({', '.join(TEXT_FIELD_NAMES)})")
            term = f"{name} : {term}"
        parts.append(term)
    while parts and parts[-1] in ("AND", "OR", "NOT"):
        parts.pop()
    if not parts:
        raise QueryError(f"text query {text!r} has no words to search for")
    return " ".join(parts)


# --------------------------------------------------------------------------- SQL


def _condition(flt: Filter, alias: str) -> tuple[str, list]:
    """SQL for one filter on the annotations row `alias`."""
    if flt.on_human:
        inner, params = _condition(Filter(flt.field, flt.op, flt.values, False, flt.text), "h")
        return (f"EXISTS (SELECT 1 FROM annotations h WHERE h.kind = 'human' AND h.clip_id = {alias}.clip_id "
                f"AND {inner})", params)
    column = f'{alias}."{PROVENANCE.get(flt.field, flt.field)}"'
    values = list(flt.values)
    marks = ", ".join("?" * len(values))
    # null is a real answer ("none apply") only where the field was answered: `errors` names every
    # field a caption lacks, so a failed caption matches neither "=null" nor "contains none of"
    answered = f"json_type({alias}.errors, '$.\"{flt.field}\"') IS NULL"
    if values == [None]:
        return (f"({column} IS NULL AND {answered})", []) if flt.op == "=" else (f"{column} IS NOT NULL", [])
    if flt.field in MULTI_FIELDS:
        members = f"SELECT annotation_id FROM {members_table(flt.field)} WHERE value IN ({marks})"
        if flt.op == "all":
            return f"{alias}.id IN ({members} GROUP BY annotation_id HAVING count(*) = {len(values)})", values
        if flt.op == "!=":
            return f"({alias}.id NOT IN ({members}) AND {answered})", values
        return f"{alias}.id IN ({members})", values
    if flt.op == "~":
        return (f"{alias}.id IN (SELECT rowid FROM annotations_fts WHERE annotations_fts MATCH ?)",
                [f"{flt.field} : ({fts_query(values[0])})"])
    if flt.op == "between":
        return f"{column} BETWEEN ? AND ?", values
    if flt.op in ("<", "<=", ">", ">="):
        return f"{column} {flt.op} ?", values[:1]
    if flt.field in TEXT_FIELD_NAMES:
        return f"{column} {'!=' if flt.op == '!=' else '='} ? COLLATE NOCASE", values[:1]
    return f"{column} {'NOT IN' if flt.op == '!=' else 'IN'} ({marks})", values


@contextmanager
def _connection(db: str | Path | sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    if isinstance(db, sqlite3.Connection):
        yield db
        return
    con = connect(db, create=False)
    try:
        yield con
    finally:
        con.close()


# --------------------------------------------------------------------------- results


@dataclass(kw_only=True)
class Hit(Annotation):
    """One matching annotation, its scores, and the human label of the same clip where there is one."""

    id: int
    source: str
    kind: str
    score: float
    bm25: float | None = None
    similarity: float | None = None
    highlights: dict[str, str] = field(default_factory=dict)  # text field -> text with \x02match\x03 marks
    human: dict[str, Any] | None = None
    human_source: str | None = None

    @property
    def answered(self) -> dict[str, Any]:
        """The fields the caption answered (a null answer included; a missing one not)."""
        return {name: value for name, value in self.label.items() if name not in self.errors}

    @property
    def disagreements(self) -> list[str]:
        """Closed fields where the caption and the human label differ (lists compared as sets)."""
        if self.human is None or self.kind == "human":
            return []
        out = []
        for name in CLOSED_FIELD_NAMES:
            mine, theirs = self.label.get(name), self.human.get(name)
            if FIELDS_BY_NAME[name].kind == "multi_category":
                mine, theirs = set(mine or ()), set(theirs or ())
            if mine != theirs:
                out.append(name)
        return out


@dataclass
class SearchResult:
    query: dict[str, Any]
    total: int  # size of the matching set
    hits: list[Hit]  # the best `limit` of it, best first
    counts: dict[str, dict[str, int]]  # closed field -> value -> count over the matching set (and "run")
    notes: list[str]
    seconds: float

    def clip_ids(self) -> list[str]:
        return [hit.clip_id for hit in self.hits]


def _ranks(scores: dict[int, float]) -> dict[int, int]:
    return {key: rank for rank, key in enumerate(sorted(scores, key=lambda k: -scores[k]), 1)}


def _listed(values) -> str:
    """A list of any length as one parameter, for `IN (SELECT value FROM json_each(?))`
    (SQLite caps the number of parameters of a statement)."""
    return json.dumps([value if isinstance(value, str) else int(value) for value in values])


def _nearest_by_scan(con: sqlite3.Connection, query_vector, where_sql: str, params: list, match: str | None,
                     wanted: int | None, min_similarity: float, notes: list[str]) -> dict[int, float]:
    """Cosine of every matching annotation's vector to the query: exact, one pass over the matching rows."""
    fts = "a.id IN (SELECT rowid FROM annotations_fts WHERE annotations_fts MATCH ?) AND " if match else ""
    rows = con.execute(f"SELECT a.id, e.vector FROM annotations a LEFT JOIN embeddings e USING (text_sha) "
                       f"WHERE {fts}{where_sql} AND a.text_sha IS NOT NULL",  # no free text: no meaning to compare
                       [match, *params] if match else params).fetchall()
    embedded = [(row_id, vector) for row_id, vector in rows if vector is not None]
    _note_unembedded(len(rows) - len(embedded), notes)
    if not embedded:
        return {}
    scores = embeddings.from_blobs([vector for _, vector in embedded]) @ query_vector
    return _nearest_first({row_id: float(score) for (row_id, _), score in zip(embedded, scores) if score >= min_similarity},
                          wanted)


def _nearest_first(similarity: dict[int, float], wanted: int | None) -> dict[int, float]:
    """The `wanted` most similar (all with None); among equals the earlier indexed."""
    return dict(sorted(similarity.items(), key=lambda item: (-item[1], item[0]))[:wanted])


def _note_unembedded(count: int, notes: list[str]) -> None:
    if count:
        notes.append(f"{count} otherwise matching annotations have no embedding yet and were left out "
                     "(`avlabel search --index ...` embeds after indexing; `catalog.embed_pending(db)` alone)")


def _nearest_through_index(con: sqlite3.Connection, index, query_vector, where_sql: str, params: list,
                           match: str | None, wanted: int, min_similarity: float,
                           notes: list[str]) -> dict[int, float] | None:
    """The `wanted` matching annotations nearest to the query, from the vector index; None when the
    filters keep so few of the nearest vectors that scanning the matching rows is the faster way."""
    fts = "a.id IN (SELECT rowid FROM annotations_fts WHERE annotations_fts MATCH ?) AND " if match else ""
    # only rows indexed after the last complete embedding pass can lack a vector: a range of ids
    through = con.execute("SELECT value FROM meta WHERE key = 'embedded_through'").fetchone()
    unembedded = con.execute(f"SELECT count(*) FROM annotations a LEFT JOIN embeddings e USING (text_sha) "
                             f"WHERE a.id > ? AND a.text_sha IS NOT NULL AND e.text_sha IS NULL AND {fts}{where_sql}",
                             [int(through[0]) if through else 0, *([match] if match else []), *params]).fetchone()[0]
    _note_unembedded(unembedded, notes)
    # two steps: the rows of the nearest vectors, then the filters on those rows by id (asked in one
    # statement, SQLite may walk a filter's index over most of the table instead)
    rows_of = ("SELECT a.id, e.rowid FROM embeddings e JOIN annotations a ON a.text_sha = e.text_sha "
               "WHERE e.rowid IN (SELECT value FROM json_each(?))")
    passing = f"SELECT a.id FROM annotations a WHERE a.id IN (SELECT value FROM json_each(?)) AND {fts}{where_sql}"
    similarity: dict[int, float] = {}
    checked: set[int] = set()
    count = min(index.ntotal, ANN_OVERFETCH * wanted)
    for _ in range(ANN_ROUNDS):
        rowids, cosines = vectors.nearest(index, query_vector, count)
        close = cosines >= min_similarity
        new = {int(key): float(cosine) for key, cosine in zip(rowids[close], cosines[close]) if int(key) not in checked}
        checked.update(new)
        if new:
            key_of = dict(con.execute(rows_of, [_listed(new)]))
            for (row_id,) in con.execute(passing, [_listed(key_of), *([match] if match else []), *params]):
                similarity[row_id] = new[key_of[row_id]]
        # enough found, or no vector left that is alike enough, or none left at all
        if len(similarity) >= wanted or not close.all() or count >= index.ntotal:
            return _nearest_first(similarity, wanted)
        count = min(index.ntotal, count * 4)
    return None


def search(
    db: str | Path | sqlite3.Connection,
    where: Sequence[str | Filter] = (),
    text: str | None = None,
    semantic: str | None = None,
    runs: Sequence[str] = (),
    kind: str = "model",
    limit: int | None = 20,
    min_similarity: float = 0.25,
    neighbours: int | None = 1000,
    sort: str | None = None,
) -> SearchResult:
    """Find annotations matching every filter, the full-text query and the semantic query.

    `kind` is "model" (captions, the default) or "human" (labels); `runs` restricts the
    sources. The matching set is everything that passes the filters and the text query and,
    with `semantic`, is among the `neighbours` nearest in meaning (None: all) with a cosine
    similarity of at least `min_similarity`; `limit` caps the hits returned (None: all of
    them), never the matching set or its counts. `sort` orders by a confidence (see above).
    """
    started = time.perf_counter()
    if kind not in ("model", "human"):
        raise QueryError(f"kind must be 'model' or 'human', got {kind!r}")
    filters = [f if isinstance(f, Filter) else parse_filter(f) for f in where]
    sort_column, most_confident_first = _sort_column(sort) if sort else (None, False)
    conditions, params = ["a.kind = ?"], [kind]
    if runs:
        conditions.append(f"a.source IN ({', '.join('?' * len(runs))})")
        params += list(runs)
    for flt in filters:
        sql, values = _condition(flt, "a")
        conditions.append(sql)
        params += values
    notes: list[str] = []
    match = fts_query(text) if text else None
    query_vector = embeddings.encode([semantic])[0] if semantic else None
    if semantic and neighbours is not None and limit is not None:
        neighbours = max(neighbours, limit)  # the hits shown are never fewer than asked for

    with _connection(db) as con:
        known = {row[0] for row in con.execute("SELECT name FROM sources")}
        missing = [run for run in runs if run not in known]
        if missing:
            raise QueryError(f"no run named {', '.join(missing)} in the catalog (sources: {', '.join(sorted(known)) or 'none'})")
        where_sql = " AND ".join(conditions)
        # the sort key and the closed fields come along, so ordering and counts need no second pass
        columns = ", ".join(f'a."{name}"' for name in (sort_column or "id", *COUNTED))
        similarity: dict[int, float] = {}
        try:
            if semantic:
                index = vectors.open_index(con) if neighbours is not None else None
                found = None if index is None else _nearest_through_index(
                    con, index, query_vector, where_sql, params, match, neighbours, min_similarity, notes)
                similarity = found if found is not None else _nearest_by_scan(
                    con, query_vector, where_sql, params, match, neighbours, min_similarity, notes)
                rows = con.execute(f"SELECT a.id, a.clip_id, {columns} FROM annotations a "
                                   "WHERE a.id IN (SELECT value FROM json_each(?))", [_listed(similarity)]).fetchall()
                bm25 = dict(con.execute("SELECT rowid, bm25(annotations_fts) FROM annotations_fts WHERE annotations_fts "
                                        "MATCH ? AND rowid IN (SELECT value FROM json_each(?))",
                                        [match, _listed(similarity)])) if match else {}
            elif match:
                # MATERIALIZED: the full-text query runs once, not once per row a filter lets through
                rows = con.execute(
                    f"WITH fts AS MATERIALIZED (SELECT rowid AS id, bm25(annotations_fts) AS rank FROM annotations_fts "
                    f"WHERE annotations_fts MATCH ?) SELECT a.id, a.clip_id, {columns}, fts.rank "
                    f"FROM fts JOIN annotations a ON a.id = fts.id WHERE {where_sql}", [match, *params]).fetchall()
                bm25 = {row[0]: row[-1] for row in rows}
                rows = [row[:-1] for row in rows]
            else:
                rows = con.execute(f"SELECT a.id, a.clip_id, {columns} FROM annotations a WHERE {where_sql}",
                                   params).fetchall()
                bm25 = {}
        except sqlite3.OperationalError as err:  # FTS5 refuses e.g. a query that starts with NOT
            if match:
                raise QueryError(f"text query {text!r} can't be searched ({err})") from None
            raise
        ids = [row[0] for row in rows]

        if match and semantic:  # fuse ranks: bm25 and cosine live on different scales
            text_rank = _ranks({i: -bm25[i] for i in ids})
            meaning_rank = _ranks(similarity)
            score = {i: 1 / (RRF_K + text_rank[i]) + 1 / (RRF_K + meaning_rank[i]) for i in ids}
        elif match:
            score = {i: -bm25[i] for i in ids}  # FTS5's bm25() is lower-is-better
        elif semantic:
            score = similarity
        else:
            score = dict.fromkeys(ids, 0.0)

        counts = _counts([row[3:] for row in rows])
        if sort_column:  # by confidence, clips without one last; ties by score
            direction = -1 if most_confident_first else 1
            order = sorted(rows, key=lambda row: (row[2] is None, direction * (row[2] or 0), -score[row[0]], row[1], row[0]))
        else:
            order = sorted(rows, key=lambda row: (-score[row[0]], row[1], row[0]))  # best first, then by clip id
        top = [row[0] for row in (order if limit is None else order[:limit])]
        cursor = con.execute("SELECT * FROM annotations WHERE id IN (SELECT value FROM json_each(?))", [_listed(top)])
        names = [d[0] for d in cursor.description]
        full = {row[0]: dict(zip(names, row)) for row in cursor}
        hits = [_hit(full[i], score[i], bm25, similarity) for i in top]
        if match and hits:
            _add_highlights(con, hits, match)
        if kind == "model" and hits:
            _add_human_labels(con, hits)

    query = {"where": [str(f) for f in filters], "text": text, "semantic": semantic, "runs": list(runs),
             "kind": kind, "limit": limit, "min_similarity": min_similarity if semantic else None,
             "neighbours": neighbours if semantic else None, "sort": sort}
    return SearchResult(query, len(score), hits, counts, notes, time.perf_counter() - started)


COUNTED = ("source", *CLOSED_FIELD_NAMES)  # what the counts per category cover (the run, every closed field)


def _counts(rows: list[tuple]) -> dict[str, dict[str, int]]:
    """Counts per value of the run and every closed field, over rows of the COUNTED columns."""
    counts: dict[str, dict[str, int]] = {}
    for position, name in enumerate(COUNTED):
        spec = FIELDS_BY_NAME.get(name)
        tally = Counter(row[position] for row in rows)
        values: Counter = Counter()
        for value, n in tally.items():
            if value is None:
                if spec is None or spec.kind != "multi_category":  # a null manoeuvre list is "none apply"
                    values["(missing)"] += n
            elif spec is not None and spec.kind == "multi_category":
                for member in json.loads(value):  # each distinct list is parsed once
                    values[member] += n
            elif spec is not None and spec.kind == "boolean":
                values["True" if value else "False"] += n
            else:
                values[str(value)] += n
        order = spec.choices if spec else sorted(values)
        counts["run" if name == "source" else name] = {v: values[v] for v in [*order, "(missing)"] if v in values}
    return counts


def _hit(row: dict[str, Any], score: float, bm25: dict[int, float], similarity: dict[int, float]) -> Hit:
    return Hit(
        id=row["id"], source=row["source"], kind=row["kind"], clip_id=row["clip_id"], video=row["video"],
        model=row["model"], adapter=row["adapter"], prompt_sha=row["prompt_sha"], status=row["status"],
        valid=bool(row["valid"]), errors=json.loads(row["errors"]), label=row_label(row), score=score,
        bm25=bm25.get(row["id"]), similarity=similarity.get(row["id"]), confidence=row_confidence(row),
        clip_confidence=row["clip_confidence"],
    )


def _add_highlights(con: sqlite3.Connection, hits: list[Hit], match: str) -> None:
    columns = ", ".join(f"highlight(annotations_fts, {i}, char(2), char(3))" for i in range(len(TEXT_FIELD_NAMES)))
    by_id = {hit.id: hit for hit in hits}
    sql = (f"SELECT rowid, {columns} FROM annotations_fts WHERE annotations_fts MATCH ? "
           "AND rowid IN (SELECT value FROM json_each(?))")
    for rowid, *marked in con.execute(sql, [match, _listed(by_id)]):
        by_id[rowid].highlights = {name: text for name, text in zip(TEXT_FIELD_NAMES, marked) if text and "\x02" in text}


def _add_human_labels(con: sqlite3.Connection, hits: list[Hit]) -> None:
    humans: dict[str, tuple[str, dict]] = {}
    cursor = con.execute("SELECT * FROM annotations WHERE kind = 'human' AND clip_id IN (SELECT value FROM json_each(?)) "
                         "ORDER BY source DESC", [_listed({hit.clip_id for hit in hits})])
    columns = [d[0] for d in cursor.description]
    for row in cursor:
        record = dict(zip(columns, row))
        humans[record["clip_id"]] = (record["source"], row_label(record))  # the first source by name wins
    for hit in hits:
        if hit.clip_id in humans:
            hit.human_source, hit.human = humans[hit.clip_id]
