"""Input layouts and clip ids: what a clip and its label file are called on disk."""

from __future__ import annotations

from pathlib import Path

CAMERA_SUFFIX = ".camera_front_wide_120fov"  # the recipe names each clip after the camera that filmed it
LABEL_SUFFIX = ".label.json"
# What datasets' videofolder recognises as a video (datasets/packaged_modules/videofolder); a test checks it.
VIDEO_EXTENSIONS = (".mkv", ".mp4", ".avi", ".mpeg", ".mov")
# Parquet, not JSON lines: datasets infers a JSON metadata file's types from its first rows, so
# a split whose manoeuvre lists happen to be all empty would get another type than the other
# split and fail to load ("Metadata files ... have different features"). Parquet states them.
METADATA_NAME = "metadata.parquet"


def clip_id_of(name: str) -> str:
    """A clip's id from its file name: without the extension and the recipe's camera suffix."""
    stem = Path(name).name.rsplit(".", 1)[0]
    return stem.removesuffix(CAMERA_SUFFIX)
