"""Two builder folders with the same card must each load their own clips; the tests' caches are their own."""

import shutil
import subprocess
import sys
from pathlib import Path

import datasets

from avlabel.core.loading import cache_root, load_clip_dataset


def test_copies_of_a_dataset_load_their_own_videos(synthetic_dataset_dir, tmp_path):
    first, second = tmp_path / "a" / "dataset", tmp_path / "b" / "dataset"
    shutil.copytree(synthetic_dataset_dir, first)
    shutil.copytree(synthetic_dataset_dir, second)
    for folder in (first, second):
        ds = load_clip_dataset(folder, split="train").cast_column("video", datasets.Video(decode=False))
        assert ds[0]["video"]["path"].startswith(str(folder))
        streamed = next(iter(load_clip_dataset(folder, split="train", streaming=True).decode(False)))
        assert streamed["clip_id"] == ds[0]["clip_id"]


def test_the_tests_caches_are_this_sessions(caches_of_this_session, synthetic_dataset_dir):
    """conftest's caches_of_this_session: in this process, in a library imported only now, and in a subprocess."""
    import evaluate.config
    import huggingface_hub.constants
    import transformers.dynamic_module_utils

    folders = [datasets.config.HF_DATASETS_CACHE, huggingface_hub.constants.HF_HUB_CACHE, huggingface_hub.constants.HF_TOKEN_PATH,
               evaluate.config.HF_MODULES_CACHE, transformers.dynamic_module_utils.HF_MODULES_CACHE, cache_root()]
    loaded = datasets.load_dataset(str(synthetic_dataset_dir), split="test")
    assert loaded.cache_files
    folders += [entry["filename"] for entry in loaded.cache_files]
    script = "import datasets.config, huggingface_hub.constants as c; print(datasets.config.HF_DATASETS_CACHE); print(c.HF_HUB_CACHE)"
    in_subprocess = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert len(in_subprocess) == 2
    outside = [str(f) for f in folders + in_subprocess if not Path(f).is_relative_to(caches_of_this_session)]
    assert outside == []
