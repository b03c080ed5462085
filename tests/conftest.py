"""Shared session fixtures: built once per test run, used by every area's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised Qwen2.5-VL test model with the small tokenizer."""
    from avlabel.demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), family="qwen2_5_vl", tokenizer="small", seed=0)


@pytest.fixture(scope="session")
def hub_server():
    """An in-memory Hub-protocol server on 127.0.0.1 (tests/hub_server.py), shared by the session."""
    from hub_server import HubServer

    with HubServer() as server:
        yield server


@pytest.fixture
def hub(hub_server, monkeypatch, tmp_path):
    """The Hub server with huggingface_hub, datasets, transformers and peft pointed at it, and a token set."""
    from hub_server import point_clients_at

    point_clients_at(hub_server.endpoint, monkeypatch, tmp_path / "hf_cache")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_for_the_local_hub")
    return hub_server


SYNTHETIC_CLIPS = 24
SYNTHETIC_SEED = 0


@pytest.fixture(scope="session")
def synthetic_raw_dir(tmp_path_factory):
    """24 synthetic clips (3 s, 256x144, 10 fps) with labels, in the recipe layout."""
    from avlabel.demo.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic_raw")
    generate(out, num_clips=SYNTHETIC_CLIPS, seed=SYNTHETIC_SEED, width=256, height=144, seconds=3.0, fps=10, progress=False)
    return out


SYNTHETIC_TEST_CLIPS = 4


@pytest.fixture(scope="session")
def synthetic_dataset_dir(synthetic_raw_dir, tmp_path_factory):
    """The synthetic clips built into a dataset folder (`avlabel build`): 20 train and 4 test clips."""
    from avlabel.data_builder.build import BuildArguments, build

    out = tmp_path_factory.mktemp("synthetic_dataset") / "dataset"
    result = build(BuildArguments(input=str(synthetic_raw_dir), output_dir=str(out), test_size=SYNTHETIC_TEST_CLIPS))
    assert not result.problems, result.problems
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`avlabel demo` as a newcomer runs it (minutes on 2 cores), made once for the tests that read its output.

    Returns (output folder, what it printed)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo") / "demo_output"
    done = subprocess.run([sys.executable, "-m", "avlabel", "demo", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout
