"""Two builder folders with the same card must each load their own clips."""

import shutil

import datasets

from avlabel.core.loading import load_clip_dataset


def test_copies_of_a_dataset_load_their_own_videos(synthetic_dataset_dir, tmp_path):
    first, second = tmp_path / "a" / "dataset", tmp_path / "b" / "dataset"
    shutil.copytree(synthetic_dataset_dir, first)
    shutil.copytree(synthetic_dataset_dir, second)
    for folder in (first, second):
        ds = load_clip_dataset(folder, split="train").cast_column("video", datasets.Video(decode=False))
        assert ds[0]["video"]["path"].startswith(str(folder))
        streamed = next(iter(load_clip_dataset(folder, split="train", streaming=True).decode(False)))
        assert streamed["clip_id"] == ds[0]["clip_id"]
