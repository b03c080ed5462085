"""Benchmark of the clip catalog at fleet scale: indexing 1,000,000 captions and query latency, on this machine's cores.

    python bench/catalog.py [--captions 1000000] [--embed_sample 1000] [--queries 200]

Caption records are generated from the label schema (seeded): categories, manoeuvres, difficulty and
booleans drawn from the schema's value lists, short free-text fields from the schema's examples with
varied details, and a safety paragraph composed to agree with the drawn label, in the record format of
`avlabel caption` (including failed and partly invalid captions). Measured:

  index_s               indexing all captions: the catalog (typed columns + full-text index, from the
                        JSONL file) plus the vector index over their sentence vectors; wall time
  index_cpu_s           the CPU time of that (all threads), which other load on the machine doesn't inflate
  reindex_s             indexing the same file again (nothing changes)
  update_s              re-indexing after 1% of the captions changed (incremental)
  query_p50_ms/p95_ms   latency of a mix of filter and full-text queries (with counts per category)
  semantic_p50_ms/p95_ms  latency of semantic queries (query embedding + vector index + the matching rows)
  semantic_filtered_*   the same with filters beside the meaning
  recall_at_20/1000     share of the exact nearest vectors that the vector index returns
  embed_texts_per_s     sentence-embedding throughput of the real model on a sample of the captions

Sentence vectors: embedding 1,000,000 texts with all-MiniLM-L6-v2 takes about 11 hours on 2 cores, so
the vectors indexed here are composed, not embedded: every distinct sentence of the generated captions
(about 1,300) goes through the real model once, and a caption's vector is the normalised sum of its
sentences' token vectors (the model itself mean-pools token vectors, over the whole text at once).
`composed_fidelity` is the mean cosine between composed and real vectors on the embedded sample. The
index's cost depends on the number of vectors and how they cluster, which composed vectors share with
real ones; recall is measured against the exact nearest neighbours of the same vectors.

Writes bench/results/catalog.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avlabel.core import schema  # noqa: E402
from avlabel.core.prompts import load_prompts  # noqa: E402

HAZARDS = ("a pedestrian crossing ahead", "a cyclist on the right", "parked cars narrowing the lane",
           "a delivery van stopped in the lane", "a bus pulling out from a stop", "children near the curb",
           "a dog at the roadside", "a car reversing out of a driveway", "road works with cones",
           "a motorcyclist filtering between lanes", "a truck turning across the road", "debris on the road")
EGO_ACTIONS = ("keeps its lane at a steady speed", "slows down gently", "stops at the line and waits",
               "changes to the left lane", "turns right at the junction", "turns left after oncoming traffic clears",
               "nudges around an obstacle within its lane", "follows the car ahead at a safe gap",
               "accelerates onto the main road", "yields before proceeding")
SETTINGS = ("a residential street", "a busy downtown avenue", "a suburban collector road", "a multi-lane arterial",
            "a highway", "a narrow country road", "an industrial area", "a school zone", "a shopping district")


def _weighted(rng: random.Random, choices: tuple) -> str:
    # real fleets are skewed: earlier schema values (clear skies, daytime) are the common ones
    return rng.choices(choices, weights=[1 / (rank + 1) for rank in range(len(choices))])[0]


def _text(rng: random.Random, spec: schema.LabelField) -> str:
    base = rng.choice(spec.examples)
    if "km/h" in base or "Speed limit" in base:
        base = f"Speed limit {rng.choice((20, 30, 40, 50, 60, 70, 80, 100))} km/h."
    extra = rng.random()
    if spec.name == "traffic_sign" and extra < 0.5:
        base += " " + rng.choice(("A yield sign on the right.", "No parking on this side.", "A pedestrian crossing sign.",
                                  "Road works ahead.", "A one-way sign pointing left."))
    return base


def random_label(rng: random.Random) -> dict:
    label = {}
    for spec in schema.FIELDS:
        if spec.kind == "category":
            label[spec.name] = _weighted(rng, spec.choices)
        elif spec.kind == "multi_category":
            count = rng.choices((0, 1, 2, 3), weights=(4, 4, 2, 1))[0]
            label[spec.name] = sorted(rng.sample(spec.choices, count)) or None
        elif spec.kind == "difficulty":
            label[spec.name] = int(rng.choices(spec.choices, weights=(3, 4, 2, 1))[0])
        elif spec.kind == "boolean":
            label[spec.name] = "True" if rng.random() < 0.25 else "False"
        elif spec.nullable and rng.random() < 0.5:
            label[spec.name] = None
        elif spec.examples:
            label[spec.name] = _text(rng, spec)
    hazards = rng.sample(HAZARDS, rng.randint(0, 3))
    sentences = [
        f"The ego vehicle drives through {rng.choice(SETTINGS)} under {label['weather'].lower()} "
        f"conditions, {label['lighting'].lower()}, on {label['road_conditions'].lower()}.",
        *(f"It {action}." for action in rng.sample(EGO_ACTIONS, rng.randint(1, 3))),
        *(f"There is {hazard}, so the ego vehicle {rng.choice(EGO_ACTIONS)}." for hazard in hazards),
        f"Overall the situation is {schema.DIFFICULTY_LEVELS[label['driving_difficulty']].split(':')[0]} to drive.",
    ]
    label["safety_analysis"] = " ".join(sentences)
    return label  # canonical by construction (checked on the first records in main)


def caption_records(count: int, seed: int = 0, model: str = "nvidia/Cosmos-Reason1-7B", adapter: str | None = None):
    """`count` caption records as `avlabel caption` writes them; 2% failed, 3% with a field missing."""
    rng = random.Random(seed)
    prompt_sha = load_prompts().sha
    for index in range(count):
        clip_id = f"clip{index:06d}"
        record = {"clip_id": clip_id, "video": f"/fleet/videos/{clip_id}.mp4", "model": model, "adapter": adapter,
                  "prompt_sha": prompt_sha, "generation": {"temperature": 0.1, "top_p": 0.9, "max_new_tokens": 4096},
                  "prompt_tokens": 1900, "seconds": round(rng.uniform(2, 6), 2)}
        roll = rng.random()
        if roll < 0.02:
            record |= {"raw": "", "label": {}, "valid": False, "errors": {}, "completion_tokens": 0,
                       "status": "failed", "error": f"{record['video']}: decoding failed at frame 41"}
        else:
            label = random_label(rng)
            errors = {}
            if roll < 0.05:
                dropped = rng.choice(schema.FIELD_NAMES)
                label.pop(dropped)
                errors[dropped] = ["is missing"]
            raw = schema.label_to_json(label)
            record |= {"raw": raw, "label": label, "valid": not errors, "errors": errors,
                       "completion_tokens": len(raw) // 4, "status": "ok", "error": None}
        yield record


QUERIES = [
    {"where": ["weather=Heavy rain"]},
    {"where": ["lighting=Night*", "driving_difficulty>=3"]},
    {"where": ["metaaction=Yield to VRUs", "interesting_scenario=true"]},
    {"where": ["metaaction=Vehicle following&Yield to vehicles", "weather=Light rain|Heavy rain"]},
    {"where": ["driving_difficulty=2..3", "rule_violation=true", "lighting=Daytime*"]},
    {"text": "pedestrian crossing"},
    {"text": "cyclist", "where": ["lighting=Night*"]},
    {"text": '"school zone" OR children', "where": ["driving_difficulty>=2"]},
    {"text": "truck turning", "where": ["weather=Clear skies", "metaaction=Yield to vehicles"]},
    {"where": ["traffic_sign~speed limit", "road_type~highway"]},
]
SEMANTIC_QUERIES = ["a child runs into the road in front of the car", "driving on a snowy highway at night",
                    "a cyclist squeezes past parked cars", "waiting at a red light in heavy traffic",
                    "a bus leaves its stop and pulls into our lane", "construction cones narrow the road",
                    "a dog near the edge of the street", "merging onto a busy motorway",
                    "a van blocks the lane and we go around it", "a quiet residential street in the rain",
                    "a truck turns in front of us at an intersection", "heavy fog on a country road",
                    "a motorbike weaves between the lanes", "children walking near a school",
                    "a car backs out of a driveway", "stopping behind traffic at a junction"]
FILTERED = [["lighting=Night*"], ["weather=Light rain|Heavy rain", "driving_difficulty>=3"],
            ["metaaction=Yield to VRUs"], ["interesting_scenario=true", "road_type~highway"]]


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _segments(text: str) -> list[str]:
    """A caption's text as the pieces composed vectors are made of: its lines, and the sentences of each."""
    return [piece for line in text.split("\n") for piece in re.split(r"(?<=\.) ", line) if piece]


class ComposedVectors:
    """Sentence vectors for many captions from one real-model pass over their distinct sentences."""

    def __init__(self, segments: set[str]):
        from avlabel.catalog import embeddings

        ordered = sorted(segments)
        self.position = {piece: index for index, piece in enumerate(ordered)}
        token_vectors = embeddings.load_model().encode(ordered, output_value="token_embeddings", batch_size=64)
        self.sums = np.stack([np.asarray(vectors.float().sum(0)) for vectors in token_vectors])

    def __call__(self, texts: list[str]) -> np.ndarray:
        pieces = [[self.position[piece] for piece in _segments(text)] for text in texts]
        starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        summed = np.add.reduceat(self.sums[np.concatenate(pieces)], starts, axis=0)
        return (summed / np.linalg.norm(summed, axis=1, keepdims=True)).astype(np.float32)


def _texts(con: sqlite3.Connection, where: str = "", params: tuple = (), batch: int = 20_000):
    """(text hashes, texts) of the catalog's distinct embeddable texts, a batch at a time."""
    from avlabel.catalog import embeddings
    from avlabel.core.schema import TEXT_FIELD_NAMES

    columns = ", ".join(f'"{name}"' for name in TEXT_FIELD_NAMES)
    cursor = con.execute(f"SELECT text_sha, {columns} FROM annotations WHERE text_sha IS NOT NULL {where} "
                         "GROUP BY text_sha", params)
    while rows := cursor.fetchmany(batch):
        yield [row[0] for row in rows], [embeddings.embedding_text(dict(zip(TEXT_FIELD_NAMES, row[1:]))) for row in rows]


def _compose_all(db: Path) -> tuple[int, float, float]:
    """Replace every stored vector by a composed one; (sentences embedded, seconds, cosine to the real sample)."""
    from avlabel.catalog import embeddings

    con = sqlite3.connect(db)
    started = time.perf_counter()
    compose = ComposedVectors({piece for _, texts in _texts(con) for text in texts for piece in _segments(text)})
    seconds = time.perf_counter() - started
    sample = dict(con.execute("SELECT text_sha, vector FROM embeddings"))
    sample_texts = dict(pair for shas, texts in _texts(con, "AND text_sha IN (SELECT text_sha FROM embeddings)")
                        for pair in zip(shas, texts))
    real = embeddings.from_blobs([sample[sha] for sha in sample_texts])
    fidelity = float(np.mean(np.sum(real * compose(list(sample_texts.values())), axis=1)))
    with con:  # every vector composed, the sample's too: one kind of vector in the index
        con.execute("DELETE FROM embeddings")
        for shas, texts in _texts(con):
            con.executemany("INSERT INTO embeddings VALUES (?, ?)", zip(shas, map(embeddings.to_blob, compose(texts))))
    con.close()
    return len(compose.position), seconds, fidelity


def _exact_nearest(con: sqlite3.Connection, query: np.ndarray, count: int) -> np.ndarray:
    """Rowids of the `count` stored vectors nearest to the query, by a scan of them all."""
    from avlabel.catalog import embeddings

    best_ids, best_scores = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    cursor = con.execute("SELECT rowid, vector FROM embeddings")
    while rows := cursor.fetchmany(100_000):
        scores = embeddings.from_blobs([row[1] for row in rows]) @ query
        best_ids = np.concatenate([best_ids, [row[0] for row in rows]])
        best_scores = np.concatenate([best_scores, scores])
        keep = np.argsort(-best_scores, kind="stable")[:count]
        best_ids, best_scores = best_ids[keep], best_scores[keep]
    return best_ids


def _timed(step):
    """(result, wall seconds, CPU seconds of every thread of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = step()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--embed_sample", type=int, default=1000, help="texts embedded by the real model")
    parser.add_argument("--queries", type=int, default=200, help="queries timed of each kind")
    parser.add_argument("--recall_queries", type=int, default=len(SEMANTIC_QUERIES))
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "catalog.json"))
    args = parser.parse_args()

    import faiss

    from avlabel import catalog
    from avlabel.catalog import embeddings, query, vectors
    from avlabel.catalog.store import connect

    load_start = os.getloadavg()[0]  # other work on the machine slows every wall time below
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "sft"
        run_dir.mkdir()
        captions = run_dir / "captions.jsonl"
        with captions.open("w", encoding="utf-8") as out:
            for index, record in enumerate(caption_records(args.captions, seed=0)):
                if index < 1000 and record["status"] == "ok":
                    assert schema.check_label(record["label"])[0] == record["label"]
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        db = Path(tmp) / "catalog.db"
        megabytes = captions.stat().st_size / 1e6

        report, catalog_s, catalog_cpu_s = _timed(lambda: catalog.index_run(db, captions))
        print(report.summary(), f"(CPU {catalog_cpu_s:.1f}s)", flush=True)
        again = catalog.index_run(db, captions)
        print(again.summary(), flush=True)
        assert not again.changed

        # 1% of the captions change (a re-captioned subset): only those are rewritten
        changed = set(random.Random(1).sample(range(args.captions), args.captions // 100))
        rewritten = run_dir / "rewritten.jsonl"
        with captions.open(encoding="utf-8") as lines, rewritten.open("w", encoding="utf-8") as out:
            for index, line in enumerate(lines):
                if index in changed:
                    record = json.loads(line)
                    if record["status"] == "ok" and "weather" in record["label"]:
                        record["label"]["weather"] = "Dense fog"
                    line = json.dumps(record, ensure_ascii=False) + "\n"
                out.write(line)
        os.replace(rewritten, captions)
        update = catalog.index_run(db, captions)
        print(update.summary(), flush=True)

        # the real model on a sample (throughput), then composed vectors for every text (see above)
        embedded = catalog.embed_pending(db, limit=args.embed_sample)
        print(embedded.summary(), flush=True)
        sentences, compose_s, fidelity = _compose_all(db)
        print(f"composed vectors: {sentences} sentences embedded in {compose_s:.0f}s; "
              f"mean cosine to the real vectors {fidelity:.3f}", flush=True)

        # nothing left to embed: this pass records that and builds the vector index
        indexed, vector_s, vector_cpu_s = _timed(lambda: catalog.embed_pending(db))
        assert indexed.texts == 0 and indexed.pending == 0
        print(f"vector index: {indexed.vectors_indexed} vectors in {vector_s:.1f}s (CPU {vector_cpu_s:.1f}s)", flush=True)
        con = connect(db, create=False)
        index = vectors.open_index(con)

        latencies = []
        for i in range(args.queries):
            asked = QUERIES[i % len(QUERIES)]
            started = time.perf_counter()
            result = catalog.search(con, limit=20, **asked)
            latencies.append((time.perf_counter() - started) * 1000)
            if i < len(QUERIES):
                print(f"{result.total:7d} matches  {latencies[-1]:7.1f} ms  {asked}", flush=True)

        embeddings.encode(["warm-up"])
        semantic, semantic_cpu, filtered = [], [], []
        for i in range(args.queries):
            text = SEMANTIC_QUERIES[i % len(SEMANTIC_QUERIES)]
            result, seconds, cpu = _timed(lambda: catalog.search(con, semantic=text, limit=20))
            semantic.append(seconds * 1000)
            semantic_cpu.append(cpu * 1000)
            where = FILTERED[i % len(FILTERED)]
            filtered_result, seconds, _ = _timed(lambda: catalog.search(con, semantic=text, where=where, limit=20))
            filtered.append(seconds * 1000)
            if i < 4:
                print(f"semantic {semantic[-1]:6.1f} ms ({result.total} nearest); with {where} {filtered[-1]:6.1f} ms "
                      f"({filtered_result.total})", flush=True)

        # what a semantic query asks the index for (its default neighbours, overfetched) against a scan
        recall = {20: [], 1000: []}
        for text in SEMANTIC_QUERIES[: args.recall_queries]:
            query_vector = embeddings.encode([text])[0]
            found, _ = vectors.nearest(index, query_vector, query.ANN_OVERFETCH * 1000)
            exact = _exact_nearest(con, query_vector, max(recall))
            for count in recall:
                recall[count].append(len(set(found[:count].tolist()) & set(exact[:count].tolist())) / count)
        con.close()
        db_mb = db.stat().st_size / 1e6
        index_mb = vectors.index_file(sqlite3.connect(db)).stat().st_size / 1e6

    p50, p95 = _percentiles(latencies)
    s50, s95 = _percentiles(semantic)
    f50, f95 = _percentiles(filtered)
    cpu50, cpu95 = _percentiles(semantic_cpu)
    result = {
        "captions": args.captions,
        "index_s": round(catalog_s + vector_s, 1),
        "index_cpu_s": round(catalog_cpu_s + vector_cpu_s, 1),
        "catalog_index_s": round(catalog_s, 1),
        "catalog_index_cpu_s": round(catalog_cpu_s, 1),
        "vector_index_s": round(vector_s, 1),
        "vector_index_cpu_s": round(vector_cpu_s, 1),
        "captions_per_s": round(args.captions / catalog_s),
        "reindex_s": round(again.seconds, 2),
        "update_s": round(update.seconds, 2),
        "updated": update.updated,
        "query_p50_ms": round(p50, 1),
        "query_p95_ms": round(p95, 1),
        "queries": len(latencies),
        "semantic_p50_ms": round(s50, 1),
        "semantic_p95_ms": round(s95, 1),
        "semantic_cpu_p50_ms": round(cpu50, 1),
        "semantic_cpu_p95_ms": round(cpu95, 1),
        "semantic_filtered_p50_ms": round(f50, 1),
        "semantic_filtered_p95_ms": round(f95, 1),
        "semantic_queries": len(semantic),
        "recall_at_20": round(statistics.mean(recall[20]), 3),
        "recall_at_1000": round(statistics.mean(recall[1000]), 3),
        "vector_index": f"faiss {faiss.__version__} IVF{index.nlist},SQfp16, {index.ntotal} vectors",
        "vectors": "composed from real-model vectors of each distinct sentence (see bench/catalog.py)",
        "composed_sentences": sentences,
        "composed_fidelity": round(fidelity, 3),
        "embed_sample": embedded.texts,
        "embed_texts_per_s": round(embedded.texts_per_s, 1),
        "embedding_model": embeddings.MODEL_ID,
        "captions_jsonl_mb": round(megabytes, 1),
        "db_mb": round(db_mb, 1),
        "vector_index_mb": round(index_mb, 1),
        "sqlite": sqlite3.sqlite_version,
        "cores": len(os.sched_getaffinity(0)),
        "load_average_1m": {"start": round(load_start, 1), "end": round(os.getloadavg()[0], 1)},
        "device": f"CPU: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "date": date.today().isoformat(),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
