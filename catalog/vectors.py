"""The semantic index: an inverted-file index (faiss IVF) over the catalog's vectors, in a file beside it.

A scan of every stored vector costs about a second per 100,000 captions. The index groups the
vectors around k-means centroids and a query reads only the groups nearest to it, so a query over
1,000,000 captions takes milliseconds. faiss was chosen by measuring here (BENCHMARKS.md, "Clip
catalog"): its IVF index builds in seconds on 2 cores where an HNSW graph (usearch) took minutes
for 200,000 vectors, it reads a saved index memory-mapped (a new process queries without loading
it), and sqlite-vec cannot be loaded by a Python whose sqlite3 lacks extension loading, as here.

The index's ids are the rowids of the `embeddings` table. Vectors are only ever added to that
table, so the rows after the last indexed rowid are exactly the new ones: `update` adds them and
saves the file under a temporary name before renaming it, so a reader never sees half a file.
The centroids are trained once, and again when the catalog has grown RETRAIN_GROWTH times since.
The catalog's meta table records what the file holds; a file that disagrees with it (deleted,
copied from another catalog, written for another embedding model) is rebuilt.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from pathlib import Path

import numpy as np

from . import embeddings

SUFFIX = ".vectors.faiss"
EXACT_BELOW = 20_000  # with fewer vectors a scan of them all is fast and exact: no index is built
RETRAIN_GROWTH = 4
TRAINING_PER_LIST = 40  # vectors per centroid that k-means trains on (faiss warns below 39)
# a query reads the groups that together hold about SCAN_PER_RESULT vectors per result asked for
# (at least MIN_PROBES groups): recall against cost, measured in bench/catalog.py
SCAN_PER_RESULT, MIN_PROBES = 16, 16
_META_KEY = "vector_index"
_BATCH = 50_000  # vectors read from the catalog and added at a time
_OPEN: dict[str, tuple[tuple, object]] = {}  # file -> (its stat when opened, the memory-mapped index)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("semantic search over a large catalog needs its vector index: pip install faiss-cpu") from None
    return faiss


def index_file(con: sqlite3.Connection) -> Path | None:
    """Where the index of this catalog lives (None for a catalog in memory)."""
    database = con.execute("PRAGMA database_list").fetchone()[2]
    return Path(database + SUFFIX) if database else None


def _recorded(con: sqlite3.Connection) -> dict:
    row = con.execute("SELECT value FROM meta WHERE key = ?", (_META_KEY,)).fetchone()
    return json.loads(row[0]) if row else {}


def _last_rowid(con: sqlite3.Connection) -> int:
    return con.execute("SELECT max(rowid) FROM embeddings").fetchone()[0] or 0  # rows are never deleted


def _batches(con: sqlite3.Connection, after: int):
    """(rowids, float32 vectors) of the stored vectors after rowid `after`, a batch at a time."""
    while True:
        rows = con.execute("SELECT rowid, vector FROM embeddings WHERE rowid > ? ORDER BY rowid LIMIT ?",
                           (after, _BATCH)).fetchall()
        if not rows:
            return
        after = rows[-1][0]
        yield np.array([row[0] for row in rows], dtype=np.int64), embeddings.from_blobs([row[1] for row in rows])


def _trained(con: sqlite3.Connection, rows: int):
    """A new, empty index whose centroids are trained on an even sample of the stored vectors."""
    faiss = _faiss()
    lists = max(1, round(math.sqrt(rows)))
    step = max(1, rows // (TRAINING_PER_LIST * lists))
    sample = embeddings.from_blobs([row[0] for row in con.execute(
        "SELECT vector FROM embeddings WHERE rowid % ? = 0", (step,))])
    # float16 is how the catalog stores the vectors: the index holds them at that precision
    index = faiss.index_factory(embeddings.DIMENSIONS, f"IVF{lists},SQfp16", faiss.METRIC_INNER_PRODUCT)
    index.train(sample)
    return index


def update(con: sqlite3.Connection, progress: bool = False) -> int:
    """Bring the index file up to date with the stored vectors; returns how many were added."""
    faiss = _faiss()
    path = index_file(con)
    last = _last_rowid(con)
    if path is None or last < EXACT_BELOW:
        return 0
    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))
    recorded = _recorded(con)
    index = None
    if recorded.get("model") == embeddings.MODEL_ID and path.exists() and last < RETRAIN_GROWTH * recorded["trained_on"]:
        if recorded["last_rowid"] == last and path.stat().st_size == recorded["bytes"]:
            return 0
        index = faiss.read_index(str(path))  # into memory, to add to
        if index.ntotal != recorded["rows"]:
            index = None
    if index is None:
        start, trained_on, index = 0, last, _trained(con, last)
    else:
        start, trained_on = recorded["last_rowid"], recorded["trained_on"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=last - start, desc="vector index", unit="vector")
    added = 0
    for rowids, vectors in _batches(con, start):
        index.add_with_ids(vectors, rowids)
        added, start = added + len(rowids), int(rowids[-1])
        if bar:
            bar.update(len(rowids))
    if bar:
        bar.close()
    partial = path.with_name(path.name + ".partial")
    faiss.write_index(index, str(partial))
    os.replace(partial, path)
    with con:
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_META_KEY, json.dumps(
            {"model": embeddings.MODEL_ID, "rows": index.ntotal, "last_rowid": start, "trained_on": trained_on,
             "bytes": path.stat().st_size})))
    return added


def open_index(con: sqlite3.Connection):
    """The catalog's index, memory-mapped and up to date, or None when a scan is the better way
    (fewer than EXACT_BELOW vectors, or a catalog in memory)."""
    faiss = _faiss()
    path = index_file(con)
    if path is None or _last_rowid(con) < EXACT_BELOW:
        return None
    update(con)
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    cached = _OPEN.get(str(path))
    if cached is None or cached[0] != key:
        cached = _OPEN[str(path)] = (key, faiss.read_index(str(path), faiss.IO_FLAG_MMAP))
    return cached[1]


def nearest(index, query_vector: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(rowids, cosines) of about the `count` stored vectors nearest to the query, nearest first."""
    faiss = _faiss()
    per_list = index.ntotal / index.nlist
    probes = min(index.nlist, max(MIN_PROBES, math.ceil(SCAN_PER_RESULT * count / per_list)))
    cosines, rowids = index.search(query_vector[None].astype(np.float32), count,
                                   params=faiss.SearchParametersIVF(nprobe=probes))
    found = rowids[0] >= 0  # fewer than `count` in the groups read: the rest is padding
    return rowids[0][found], cosines[0][found]
