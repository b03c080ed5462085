"""Loading a builder dataset: the one `load_dataset` call that training, inference, evaluation
and the catalog share; and the settings files a model folder carries beside its weights.

datasets (5.2) keys its cache of a local folder by the folder's name and the card, not by its
path or its files. The card names a digest of the rows (data_builder/card.py), so another build
is another table; but a copy of a folder has the same card, and would be handed the first
folder's prepared table, video paths included, so that a model is trained or scored on another
folder's clips. A local folder therefore gets a cache of its own, keyed by its absolute path and
the state of its metadata files; Hub ids use the normal cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from .layouts import METADATA_NAME

T = TypeVar("T")


def _cache_dir(folder: Path) -> str:
    state = [str(folder.resolve())]
    for path in sorted([folder / "README.md", *folder.glob(f"*/{METADATA_NAME}")]):
        if path.exists():
            stat = path.stat()
            state.append(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}")
    key = hashlib.sha256("\n".join(state).encode()).hexdigest()[:16]
    return str(cache_root() / "datasets" / key)


def cache_root() -> Path:
    """avlabel's own cache folder: $AVLABEL_CACHE, else ~/.cache/avlabel."""
    return Path(os.environ.get("AVLABEL_CACHE", Path.home() / ".cache" / "avlabel"))


def load_clip_dataset(source: str | Path, split: str | None = None, *, name: str | None = None, streaming: bool = False):
    """`datasets.load_dataset` of a builder folder or Hub id (a DatasetDict when `split` is None)."""
    import datasets

    from avlabel.extras import require_video_decoder

    folder = Path(source)
    cache_dir = _cache_dir(folder) if folder.is_dir() else None
    try:
        return datasets.load_dataset(str(source), name=name, split=split, streaming=streaming, cache_dir=cache_dir)
    except Exception:
        # preparing the Video column imports torchcodec, and datasets reports its failure to load only as "An error
        # occurred while generating the dataset": name it and its fix (checked only now: the import takes seconds)
        require_video_decoder()
        raise


def saved_with_model(sources: Iterable[str | Path | None], file_name: str, what: str,
                     make: Callable[..., T]) -> T | None:
    """`make(**json)` of the settings file `file_name` (sampling_config.json, answer_config.json,
    calibration.json) saved with a model: the first of `sources` (model folders or Hub ids, an adapter
    before its base model; None is skipped) that holds it, or None when none does. A file that `make`
    refuses raises ValueError naming it."""
    from transformers.utils import cached_file

    for source in filter(None, sources):
        path = cached_file(str(source), file_name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path is None:
            continue
        try:
            saved: Any = json.loads(Path(path).read_text(encoding="utf-8"))
            return make(**saved)
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{source}/{file_name}: not a valid {what} ({err}); delete it or fix it") from None
    return None
