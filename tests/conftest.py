"""Shared session fixtures: built once per test run, used by every area's tests."""

from __future__ import annotations

import sys

import pytest

# Cache folders the libraries read into module constants at import, relative to HF_HOME (a library
# imported later reads them from the environment set below instead).
HF_CACHE_CONSTANTS = {
    "huggingface_hub.constants": {"HF_HOME": "", "HF_HUB_CACHE": "hub", "HUGGINGFACE_HUB_CACHE": "hub",
                                  "HF_ASSETS_CACHE": "assets", "HUGGINGFACE_ASSETS_CACHE": "assets", "HF_XET_CACHE": "xet",
                                  "HF_TOKEN_PATH": "token", "HF_STORED_TOKENS_PATH": "stored_tokens"},
    "datasets.config": {"HF_CACHE_HOME": "", "HF_DATASETS_CACHE": "datasets", "HF_MODULES_CACHE": "modules",
                        "DOWNLOADED_DATASETS_PATH": "datasets/downloads",
                        "EXTRACTED_DATASETS_PATH": "datasets/downloads/extracted"},
    "evaluate.config": {"HF_CACHE_HOME": "", "HF_EVALUATE_CACHE": "evaluate", "HF_METRICS_CACHE": "metrics",
                        "HF_MODULES_CACHE": "modules", "DOWNLOADED_EVALUATE_PATH": "evaluate/downloads",
                        "EXTRACTED_EVALUATE_PATH": "evaluate/downloads/extracted"},
    "transformers.utils.hub": {"HF_MODULES_CACHE": "modules"},
    "transformers.dynamic_module_utils": {"HF_MODULES_CACHE": "modules"},
}
# what would move one of those folders away from HF_HOME in a subprocess
HF_CACHE_OVERRIDES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH",
                      "HF_DATASETS_CACHE", "HF_MODULES_CACHE", "HF_EVALUATE_CACHE", "HF_METRICS_CACHE",
                      "TRANSFORMERS_CACHE", "AVLABEL_JUDGE_CACHE")


@pytest.fixture(scope="session", autouse=True)
def caches_of_this_session(tmp_path_factory):
    """Every cache the tests read or fill lives in this session's temporary folder, never in ~/.cache:
    nothing of an earlier session (a datasets cache holding the video paths of a deleted build) is read
    back, and nothing is left behind. Subprocesses follow HF_HOME and AVLABEL_CACHE, or set their own."""
    root = tmp_path_factory.mktemp("caches")
    hf_home = root / "huggingface"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(hf_home))
        patch.setenv("AVLABEL_CACHE", str(root / "avlabel"))
        for name in HF_CACHE_OVERRIDES:
            patch.delenv(name, raising=False)
        for module, constants in HF_CACHE_CONSTANTS.items():
            if module in sys.modules:  # imported while collecting the tests
                for constant, folder in constants.items():
                    old = getattr(sys.modules[module], constant)
                    patch.setattr(sys.modules[module], constant, type(old)(hf_home / folder if folder else hf_home))
        yield root


# Every model family's tests: Qwen2.5-VL (Cosmos Reason 1) in the quick loop, the others in CI
# (`pytest -m "not slow"` leaves them out). `@pytest.mark.parametrize("family", FAMILIES)`.
FAMILIES = ["qwen2_5_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)]


@pytest.fixture(scope="session")
def tiny_model_of(tmp_path_factory):
    """family -> a randomly initialised test model of that family with the small tokenizer, built once a session."""
    from avlabel.demo.tiny_model import build_tiny_model

    built = {}

    def tiny_model(family: str):
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(f"tiny_{family}"), family=family, tokenizer="small", seed=0)
        return built[family]

    return tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_of):
    """A randomly initialised Qwen2.5-VL test model with the small tokenizer."""
    return tiny_model_of("qwen2_5_vl")


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


NETWORK_LOG = "network.log"
# Python's audit hook sees every host name a process (and the workers it forks) looks up, whichever library asks
NETWORK_HOOK = """import os, sys
def _log_lookup(event, args):
    if event == "socket.getaddrinfo":
        with open(os.environ["AVLABEL_NETWORK_LOG"], "a") as log:
            log.write(f"{args[0]}\\n")
sys.addaudithook(_log_lookup)
"""


def network_logged(log: Path) -> dict[str, str]:
    """An environment whose Python processes write each host name they look up to `log`. CI is unset: libraries
    skip their telemetry under CI, which would hide it from the test of a user's run."""
    import os

    hooks = log.parent / "network_hook"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(NETWORK_HOOK)
    env = {name: value for name, value in os.environ.items() if name != "CI"}
    return {**env, "AVLABEL_NETWORK_LOG": str(log), "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")]))}


# The default demo is the suite's longest setup (minutes of training on 2 cores), and it runs in a process of its
# own: when a selected test reads it, it starts with the session and runs beside the other tests, which mostly keep
# one core busy, instead of holding the whole suite while it trains.
DEFAULT_DEMO = ("qwen2_5_vl",)


def _reads_default_demo(item) -> bool:
    callspec = getattr(item, "callspec", None)
    return "demo_run" in item.fixturenames or bool(callspec and callspec.params.get("demo") == DEFAULT_DEMO[0])


def pytest_collection_finish(session):
    """Note whether a selected test reads the default demo (after -k and -m have deselected theirs)."""
    session.config.reads_default_demo = any(_reads_default_demo(item) for item in session.items)


@pytest.fixture(scope="session")
def demo_of(tmp_path_factory):
    """`avlabel demo --family F` as a newcomer runs it (minutes on 2 cores), made once per family for the tests
    that read its output. Returns a function of the family giving (output folder, what it printed)."""
    import subprocess
    import sys
    import time

    started, runs = {}, {}

    def start(family: str = DEFAULT_DEMO[0], *options: str) -> None:
        key = (family, *options)
        if key not in started:
            out = tmp_path_factory.mktemp(f"demo_{family}") / "demo_output"
            printed = out.parent / "printed.log"  # a file, not a pipe: nobody reads a pipe while tests run beside it
            with open(printed, "w") as log:
                process = subprocess.Popen([sys.executable, "-m", "avlabel", "demo", "--output_dir", str(out), "--family",
                                            family, *options], stdout=log, stderr=subprocess.STDOUT, text=True,
                                           env=network_logged(out.parent / NETWORK_LOG))
            started[key] = (process, out, printed, time.monotonic())

    def run(family: str = DEFAULT_DEMO[0], *options: str):
        key = (family, *options)
        if key not in runs:
            start(family, *options)
            process, out, printed, since = started[key]
            try:
                process.wait(timeout=max(1, 1800 - (time.monotonic() - since)))
                done = process.returncode == 0
                runs[key] = (out, printed.read_text()) if done else printed.read_text()[-6000:]
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                runs[key] = "the demo did not finish in 1800 s; its last lines:\n" + printed.read_text()[-6000:]
        # a failed demo fails every test that reads it, once: running it again for each would repeat minutes of work
        if isinstance(runs[key], str):
            pytest.fail(f"avlabel demo --family {' '.join(key)} failed: {runs[key]}", pytrace=False)
        return runs[key]

    run.start = start
    yield run
    for process, *_ in started.values():  # a session that ends first (-x, Ctrl-C) leaves no demo training
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="session", autouse=True)
def default_demo_started_early(request, caches_of_this_session, demo_of):
    if getattr(request.config, "reads_default_demo", False):
        demo_of.start(*DEFAULT_DEMO)


@pytest.fixture(scope="session")
def demo_run(demo_of):
    """The default demo (Qwen2.5-VL, Cosmos Reason 1's architecture): (output folder, what it printed)."""
    return demo_of()
