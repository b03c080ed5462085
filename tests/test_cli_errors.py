"""Every mistake on the command line is answered in one line, before anything heavy loads.

Each bad command runs in a fresh interpreter through the real entry point (`avlabel.cli.main`),
which reports on exit which modules it had imported: the exit code, a single stderr line with no
traceback, and no model code (nor torch, for a mistake in the arguments themselves) loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# what loading a model needs; a wrong argument must be refused before any of it
MODEL_CODE = ("transformers.modeling_utils", "peft", "bitsandbytes")
HEAVY = ("torch", "transformers.training_args", "trl.trainer.sft_config", "accelerate", "datasets", *MODEL_CODE)

_ENTRY = """\
import atexit, json, os, sys
atexit.register(lambda: open(os.environ["AVLABEL_TEST_MODULES"], "w").write(
    json.dumps(sorted(name for name, module in sys.modules.items() if module is not None))))
from avlabel.cli import main
main(sys.argv[1:])
"""


def avlabel(tmp_path: Path, *args: str, env: dict | None = None):
    """(exit code, stderr lines, heavy modules imported) of `avlabel ARGS` in a fresh interpreter."""
    modules = tmp_path / "modules.json"
    environment = {name: value for name, value in os.environ.items() if name != "AVLABEL_DEBUG"}
    environment.update({"PYTHONPATH": str(ROOT), "AVLABEL_TEST_MODULES": str(modules), **(env or {})})
    done = subprocess.run([sys.executable, "-c", _ENTRY, *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)
    imported = set(json.loads(modules.read_text())) if modules.exists() else set()
    return done.returncode, done.stderr.splitlines(), {name for name in HEAVY if name in imported}


def assert_one_line(code, lines, expected_code: int, *fragments: str) -> str:
    assert code == expected_code, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines
    return lines[0]


@pytest.fixture
def dataset_dir(tmp_path):
    """A builder dataset's shape (train/ and test/ splits); the argument checks read no more."""
    for split in ("train", "test"):
        (tmp_path / "dataset" / split).mkdir(parents=True)
        (tmp_path / "dataset" / split / "metadata.parquet").touch()
    return tmp_path / "dataset"


@pytest.fixture
def model_dir(tmp_path):
    """A folder the model checks accept: a Qwen2.5-VL config (no weights: nothing may load them)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return folder


# ----------------------------------------------------------------------------- the bad command lines


def test_build_help_says_what_an_unset_sampling_flag_presamples_with():
    """build reads no model: its sampling flags' help gives the recipe's values, not "the model's own", while
    caption's, which has a model, keeps it."""
    from avlabel.core.sampling import SamplingConfig
    from avlabel.data_builder.build import make_parser as build_parser
    from avlabel.infer.caption import make_parser as caption_parser

    text = " ".join(build_parser().format_help().split())
    assert "model's own" not in text
    assert "Frames sampled per second of video (--presample; unset: 2)" in text
    assert "Most frames taken from one clip (--presample; unset: 768)" in text
    assert "Fewest pixels a frame is resized to (--presample; unset: 128*28*28, Qwen2.5-VL (Cosmos Reason 1)'s)" in text
    assert 128 * 28 * 28 == SamplingConfig.min_pixels and 144 * 28 * 28 == SamplingConfig.max_pixels
    assert "(unset: the model's own, else 2)" in " ".join(caption_parser().format_help().split())


@pytest.mark.parametrize("command", ["train", "caption", "build"])
def test_help_names_the_config_flag(command):
    """The README's commands pass --config; argparse alone would leave it out of --help (TrlParser reads it)."""
    done = subprocess.run([sys.executable, "-m", "avlabel", command, "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("--config FILE: a YAML file of any of the arguments above") == 1, done.stdout[-500:]
    assert not done.stderr, done.stderr  # e.g. bitsandbytes' notice about its CPU kernels: help loads no weights


@pytest.mark.parametrize("command", ["train", "caption", "build"])
def test_a_missing_config_file(tmp_path, command):
    code, lines, heavy = avlabel(tmp_path, command, "--config", "recipes/nope.yaml")
    assert_one_line(code, lines, 2, "--config recipes/nope.yaml: no such file")
    assert not heavy


def test_a_config_key_that_no_command_reads(tmp_path):
    (tmp_path / "build.yaml").write_text("input: clips\noutput_dir: out\ntset_size: 3\n")
    code, lines, heavy = avlabel(tmp_path, "build", "--config", "build.yaml")
    assert_one_line(code, lines, 2, "unknown argument 'tset_size'; did you mean test_size?")
    assert not heavy


@pytest.mark.parametrize(("args", "flag", "suggestion"), [
    (["build", "--input", "clips", "--output_dir", "out", "--tset_size", "3"], "--tset_size", "--test_size"),
    (["caption", "--input", "clips", "--temprature", "0.2"], "--temprature", "--temperature"),
    (["train", "--dataset_name", "data", "--lerning_rate", "1e-4"], "--lerning_rate", "--learning_rate"),
    # a flag cut short: its whole, not the look-alike difflib ranks first (--layout, --input, --fps)
    (["build", "--input", "clips", "--out", "ds"], "--out", "--output_dir"),
    (["caption", "--input", "clips", "--out", "caps"], "--out", "--output_dir"),
    (["build", "--input", "clips", "--output_dir", "ds", "--pres"], "--pres", "--presample"),
])
def test_a_misspelled_flag_gets_a_suggestion(tmp_path, args, flag, suggestion):
    code, lines, heavy = avlabel(tmp_path, *args)
    assert_one_line(code, lines, 2, f"unrecognized argument {flag}; did you mean {suggestion}?")
    assert not heavy


@pytest.mark.parametrize("args", [["train", "--max_step", "2"], ["caption", "--input", "clips", "--temp", "0"]])
def test_an_abbreviated_flag_is_refused(tmp_path, args):
    code, lines, heavy = avlabel(tmp_path, *args)
    assert_one_line(code, lines, 2, f"unrecognized argument {args[-2]}")
    assert not heavy


def test_caption_input_that_does_not_exist(tmp_path, model_dir):
    code, lines, heavy = avlabel(tmp_path, "caption", "--input", "no/such/clips", "--model", str(model_dir))
    assert_one_line(code, lines, 2, "--input no/such/clips: no such file or folder")
    assert not heavy


def test_build_input_that_does_not_exist(tmp_path):
    code, lines, heavy = avlabel(tmp_path, "build", "--input", "no/such/clips", "--output_dir", "out")
    assert_one_line(code, lines, 2, "avlabel build: error: --input no/such/clips: no such file or folder")
    assert not heavy and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["caption", "--batch_size", "0"], "--batch_size 0: give a number of at least 1"),
    (["caption", "--prefill_batch_size", "-2"], "--prefill_batch_size -2: give a number of at least 1"),
    (["caption", "--limit", "-1"], "--limit -1: give a number of at least 1"),
    (["caption", "--max_new_tokens", "0"], "--max_new_tokens 0: give a number of at least 1"),
    (["caption", "--temperature", "-0.5"], "--temperature -0.5: give a number of at least 0"),
    (["caption", "--fps", "0"], "--fps 0.0: give a rate above 0 frames per second"),
    (["build", "--output_dir", "out", "--max_frames", "0"], "--max_frames 0: give a number of at least 1"),
    (["train", "--dataset_name", "dataset", "--max_pixels", "-1"], "--max_pixels -1: give a number of at least 1"),
])
def test_a_count_or_rate_out_of_range_is_refused(tmp_path, dataset_dir, model_dir, args, fragment):
    """A zero or negative batch, limit or token budget would caption nothing, or blame every clip for it."""
    if args[0] == "caption":
        args = [*args, "--input", str(dataset_dir), "--model", str(model_dir)]
    if args[0] == "build":
        args = [*args, "--input", str(dataset_dir)]
    code, lines, heavy = avlabel(tmp_path, *args)
    assert_one_line(code, lines, 2, fragment)
    assert not heavy & set(MODEL_CODE)


@pytest.mark.parametrize(("files", "fragment"), [
    (["adapter_config.json"], "a LoRA adapter, not a model; give its base model"),
    (["adapter_config.json", "merged/config.json"], "a LoRA adapter, not a model"),  # a LoRA run's own folder
    (["merged/config.json", "train_results.json"], "a training run; give its merged model, run/merged"),
    (["notes.txt"], "no config.json, so not a model folder"),
])
@pytest.mark.parametrize("command", ["caption", "train"])
def test_a_folder_that_is_no_model_is_named(tmp_path, dataset_dir, command, files, fragment):
    for name in files:
        (tmp_path / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / name).write_text("{}")
    flag, args = ("--model", ["--input", str(dataset_dir)]) if command == "caption" else \
        ("--model_name_or_path", ["--dataset_name", str(dataset_dir)])
    code, lines, heavy = avlabel(tmp_path, command, flag, "run", *args)
    line = assert_one_line(code, lines, 2, f"{flag} run: {fragment}")
    if "adapter_config.json" in files:  # caption can apply an adapter to its base model; train starts from a model
        assert ("and this folder as --adapter" in line) == (command == "caption"), line
    assert not heavy & set(MODEL_CODE)


@pytest.mark.parametrize("command", ["caption", "train"])
def test_a_hub_model_that_cannot_be_fetched_offline_is_named(tmp_path, dataset_dir, command):
    """Offline (an air-gapped cluster) with an empty cache: the option and the fix, not only transformers' sentence."""
    from odd_inputs import write_video

    write_video(tmp_path / "clips" / "a.mp4")
    flag, args = ("--model", ["--input", "clips"]) if command == "caption" else \
        ("--model_name_or_path", ["--config", str(ROOT / "recipes" / "tiny" / "sft.yaml"), "--dataset_name",
                                  str(dataset_dir), "--output_dir", "out"])
    code, lines, _ = avlabel(tmp_path, command, flag, "nvidia/Cosmos-Reason1-7B", *args,
                             env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line(code, lines, 1, f"{flag} nvidia/Cosmos-Reason1-7B: can't be loaded (",
                    "HF_HUB_OFFLINE is set: download it where the Hub can be reached")


def test_caption_input_that_holds_no_clips(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    code, lines, heavy = avlabel(tmp_path, "caption", "--input", "empty", "--model", str(model_dir))
    assert_one_line(code, lines, 1, "empty", "no clips")
    assert not heavy & set(MODEL_CODE)  # found out by reading the folder, before the model


@pytest.mark.parametrize("command", ["metrics", "judge", "compare"])
def test_evaluation_commands_refuse_a_missing_path_or_split_before_reading(tmp_path, dataset_dir, command):
    """As the README says: a path that is not there, or a split the dataset lacks, is a command-line mistake."""
    (tmp_path / "run").mkdir()
    run = ["--runs", "a=run"] if command == "compare" else ["--predictions", "run"]
    for args, fragment in (
        ([*run, "--references", "no/such/refs"], "--references no/such/refs: no such file or folder"),
        ([*run, "--references", str(dataset_dir), "--split", "validation"],
         f"--split validation: --references {dataset_dir} has the split(s) test, train"),
    ):
        code, lines, _ = avlabel(tmp_path, command, *args, "--output_dir", "out")
        assert_one_line(code, lines, 2, fragment)
    if command != "compare":
        code, lines, _ = avlabel(tmp_path, command, "--predictions", "nope", "--references", str(dataset_dir), "--output_dir", "out")
        assert_one_line(code, lines, 2, "--predictions nope: no such file or folder")


@pytest.mark.parametrize(("args", "code", "fragment"), [
    (["build", "--input", ".", "--output_dir", "."], 2, "--output_dir .: the output folder can't be the input folder"),
    (["compare", "--runs", "captions", "--references", "dataset", "--output_dir", "eval"], 2, "--runs expects NAME=PATH, got 'captions'"),
    (["publish", "--dataset_dir", "dataset"], 2, "--dataset_dir needs --dataset_repo"),
    (["publish", "--model_dir", "no/such/run", "--model_repo", "me/model", "--dry_run"], 2,
     "--model_dir no/such/run: no such file or folder"),
    (["train", "--dataset_name", "dataset", "--model_name_or_path", "model", "--load_in_8bit", "true"], 2,
     "--load_in_8bit: quantized weights can't be trained directly; add --use_peft true (QLoRA)"),
    (["publish", "--metric_repo", "me/tiny av", "--dry_run"], 2, "--metric_repo me/tiny av: not a Hub repo id (Repo id "
     "must use alphanumeric chars"),
    (["publish", "--dataset_dir", "dataset", "--dataset_repo", "dashcam", "--dry_run"], 2,
     "--dataset_repo dashcam: give owner/name"),
    (["review", "--budget", "5%"], 2, "--captions: give the caption run to review"),
    (["demo", "--output_dir", str(ROOT / "tests")], 2, "/tests: the folder is not empty (an earlier demo?)"),
    (["search", "--db", "nowhere.sqlite"], 1, "nowhere.sqlite: no catalog here"),
    (["search", "--index", "sft=no/such/run"], 2, "--index sft=no/such/run: no such file or folder"),
    (["compare", "--runs", "sft=no/such/run", "--references", ".", "--output_dir", "eval"], 2,
     "--runs sft=no/such/run: no such file or folder"),
    (["calibrate", "--captions", "no/such/run", "--labels", "."], 2, "--captions no/such/run: no such file or folder"),
])
def test_every_command_answers_a_mistake_in_one_line(tmp_path, args, code, fragment):
    """Each command's own checks end as the parser's do: `avlabel <command>: error: ...`, exit 2 for the
    command line, 1 for the data."""
    found, lines, _ = avlabel(tmp_path, *args)
    line = assert_one_line(found, lines, code, fragment)
    assert line.startswith(f"avlabel {args[0]}: error: "), line


# each command that writes a folder, with the flag that names it ({out}: the folder)
WRITERS = {
    "synth": ["--output_dir", "{out}"],
    "tiny-model": ["--output_dir", "{out}"],
    "build": ["--input", "clips", "--output_dir", "{out}"],
    "caption": ["--input", "clips", "--model", "model", "--output_dir", "{out}"],
    "train": ["--dataset_name", "dataset", "--model_name_or_path", "model", "--output_dir", "{out}"],
    "export": ["--checkpoint", "clips", "--output_dir", "{out}"],
    "metrics": ["--predictions", "clips", "--references", "clips", "--output_dir", "{out}"],
    "judge": ["--predictions", "clips", "--references", "clips", "--output_dir", "{out}"],
    "compare": ["--runs", "a=clips", "--references", "clips", "--output_dir", "{out}"],
    "review": ["--captions", "clips", "--output_dir", "{out}"],
    "demo": ["--output_dir", "{out}"],
    "search": ["--export", "{out}"],
    "publish": ["--metric_repo", "me/metric", "--dry_run", "--dry_run_dir", "{out}"],
}


def _writer(command: str, out: str) -> tuple[list[str], str]:
    """The command line of `command` writing into `out`, and the flag naming it."""
    args = [arg.format(out=out) for arg in WRITERS[command]]
    return [command, *args], args[args.index(out) - 1]


@pytest.mark.parametrize("command", list(WRITERS))
def test_an_output_folder_under_a_file(tmp_path, dataset_dir, model_dir, command):
    """A path under a regular file can't be made by anyone, root included: every command says so at once, by flag."""
    (tmp_path / "clips").mkdir()
    (tmp_path / "notes.txt").write_text("a file\n")
    args, flag = _writer(command, "notes.txt/out")
    code, lines, heavy = avlabel(tmp_path, *args)
    line = assert_one_line(code, lines, 2, f"{flag} notes.txt/out: notes.txt is a file, not a folder")
    assert line.startswith(f"avlabel {command}: error: "), line
    assert not heavy & set(MODEL_CODE)
    assert not list(tmp_path.glob("*/frame_cache")) and (tmp_path / "notes.txt").read_text() == "a file\n"


def test_the_output_folder_checked_is_the_one_written(tmp_path, monkeypatch):
    """`~/out` from a YAML recipe reaches the command unexpanded, which writes ./~/out: that is what is checked."""
    from avlabel.core.errors import UsageError
    from avlabel.core.parser import check_output_dir

    (tmp_path / "home").write_text("not a folder\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    check_output_dir("~/out", "--output_dir")
    with pytest.raises(UsageError, match="--output_dir home/out: home is a file, not a folder"):
        check_output_dir("home/out", "--output_dir")


@pytest.fixture
def locked_dir(tmp_path):
    """A folder nobody can write into, root included: the immutable attribute (chattr +i), which, unlike chmod,
    binds root too (the tests run as root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {done.stderr.strip()}")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("command", ["caption", "train", "compare", "search", "publish"])
def test_an_output_folder_that_cant_be_written(tmp_path, dataset_dir, model_dir, locked_dir, command):
    (tmp_path / "clips").mkdir()
    args, flag = _writer(command, "locked/out")
    code, lines, heavy = avlabel(tmp_path, *args)
    assert_one_line(code, lines, 2, f"{flag} locked/out: locked can't be written", "choose a folder you can write to")
    assert not heavy
    assert not (locked_dir / "out").exists()


@pytest.fixture
def locked_run(tmp_path):
    """Inputs inside a folder nobody can write into (chattr +i, as `locked_dir`): a caption run, a training
    checkpoint and a model, as on a read-only share."""
    folder = tmp_path / "shared"
    (folder / "run").mkdir(parents=True)
    (folder / "run" / "captions.jsonl").write_text("")
    (folder / "checkpoint-4").mkdir()
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text("{}")
    done = subprocess.run(["chattr", "+i", str(folder / "run"), str(folder / "checkpoint-4"), str(folder / "model")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {done.stderr.strip()}")
    yield folder
    subprocess.run(["chattr", "-i", str(folder / "run"), str(folder / "checkpoint-4"), str(folder / "model")], check=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["review", "--captions", "shared/run"],
         "the default --output_dir shared/run/review: shared/run can't be written"),
        (["review", "--annotations", "notes.txt", "--labels_dir", "notes.txt/labels"],
         "--labels_dir notes.txt/labels: notes.txt is a file, not a folder"),
        (["export", "--checkpoint", "shared/checkpoint-4"],
         "the default --output_dir shared/checkpoint-4/merged: shared/checkpoint-4 can't be written"),
        (["calibrate", "--captions", "shared/run", "--labels", "dataset", "--split", "train", "--model", "shared/model"],
         "--model shared/model: shared/model/calibration.json can't be written"),
        (["search", "--db", "notes.txt/catalog.db", "--index", "shared/run"],
         "--db notes.txt/catalog.db: notes.txt is a file, not a folder"),
        (["search", "--db", "shared", "--labels", "dataset"], "--db shared: it is a folder; give the path of a file"),
        (["search", "--html", "notes.txt/hits.html"], "--html notes.txt/hits.html: notes.txt is a file, not a folder"),
        (["search", "--json_out", "shared"], "--json_out shared: it is a folder; give the path of a file"),
    ],
)
def test_output_paths_besides_output_dir(tmp_path, monkeypatch, capsys, dataset_dir, locked_run, args, message):
    """The folders review and export derive when --output_dir is not given, review's --labels_dir, the model folder
    calibrate writes into, and search's output files: each refused before any work, in one line."""
    from avlabel.cli import main as avlabel

    (tmp_path / "notes.txt").write_text("a file\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        avlabel(args)
    assert_one_line(err.value.code, capsys.readouterr().err.splitlines(), 2, message)


def test_the_judge_cache_follows_avlabel_cache(tmp_path):
    done = subprocess.run([sys.executable, "-c", "from avlabel.eval.judge import default_cache; print(default_cache())"],
                          env={**os.environ, "AVLABEL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == str(tmp_path / "cache" / "judge_cache.sqlite")


def test_an_unknown_split(tmp_path, dataset_dir, model_dir):
    code, lines, heavy = avlabel(tmp_path, "caption", "--input", str(dataset_dir), "--split", "valid",
                                 "--model", str(model_dir))
    assert_one_line(code, lines, 2, "--split valid", "test, train")
    assert not heavy


@pytest.mark.parametrize("model", ["./no/such/model", "/no/such/model", "runs/merged"])
def test_a_local_model_path_that_does_not_exist(tmp_path, model, model_dir):
    (tmp_path / "runs").mkdir()  # so runs/merged is a path, not a Hub id
    (tmp_path / "clips").mkdir()
    for args in (["caption", "--input", "clips", "--model", model],
                 ["train", "--dataset_name", "clips", "--model_name_or_path", model]):
        code, lines, heavy = avlabel(tmp_path, *args)
        line = assert_one_line(code, lines, 2, f"{model}: no such file or folder")
        assert "Repo id" not in line
        assert not heavy


def test_train_without_a_dataset(tmp_path, model_dir):
    code, lines, heavy = avlabel(tmp_path, "train", "--model_name_or_path", str(model_dir), "--output_dir", "out")
    assert_one_line(code, lines, 2, "--dataset_name is required")
    assert not heavy


def test_resuming_the_last_checkpoint_when_there_is_none(tmp_path, dataset_dir, model_dir):
    (tmp_path / "out").mkdir()
    args = ["train", "--dataset_name", str(dataset_dir), "--model_name_or_path", str(model_dir), "--output_dir", "out"]
    code, lines, heavy = avlabel(tmp_path, *args, "--resume_from_checkpoint", "last")
    assert_one_line(code, lines, 2, "--resume_from_checkpoint last: out holds no checkpoint-N folder")
    assert not heavy
    code, lines, heavy = avlabel(tmp_path, *args, "--resume_from_checkpoint", "out/checkpoint-7")
    assert_one_line(code, lines, 2, "out/checkpoint-7: no such checkpoint folder")


def test_a_new_run_does_not_write_over_an_earlier_run_or_another_folder(tmp_path, dataset_dir, model_dir):
    """Without --resume_from_checkpoint the Trainer would replace an earlier run's model and prune its
    checkpoints, or write its card over a dataset's: refused before torch loads, nothing touched."""
    args = ["train", "--dataset_name", str(dataset_dir), "--model_name_or_path", str(model_dir), "--output_dir", "out"]
    out = tmp_path / "out"
    (out / "checkpoint-40").mkdir(parents=True)
    (out / "recipe.yaml").write_text("learning_rate: 0.001\n")
    code, lines, heavy = avlabel(tmp_path, *args)
    assert_one_line(code, lines, 2, "--output_dir out: it holds an earlier run (checkpoint-40)", "--resume_from_checkpoint last")
    assert not heavy and (out / "checkpoint-40").is_dir()
    shutil.rmtree(out / "checkpoint-40")  # a start that saved nothing (Ctrl-C before the first checkpoint) starts again
    (out / "frame_cache").mkdir()
    from avlabel.train.sft import check_fresh_run_folder

    check_fresh_run_folder(out)  # no refusal
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "README.md").write_text("a dataset card")
    code, lines, heavy = avlabel(tmp_path, *args[:-1], "data")
    assert_one_line(code, lines, 2, "--output_dir data: the folder holds files training did not write")
    assert (tmp_path / "data" / "README.md").read_text() == "a dataset card"


def test_a_rerun_into_a_folder_made_with_other_settings(tmp_path, model_dir):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").touch()  # listed, never decoded: the refusal comes first
    (tmp_path / "captions").mkdir()
    earlier = {"clip_id": "a", "model": "another/model", "adapter": None, "prompt_sha": "x", "generation": {},
               "status": "ok"}
    (tmp_path / "captions" / "captions.jsonl").write_text(json.dumps(earlier) + "\n")
    code, lines, heavy = avlabel(tmp_path, "caption", "--input", "clips", "--output_dir", "captions",
                                 "--model", str(model_dir))
    assert_one_line(code, lines, 2, "captions already holds captions made with a different model", "--overwrite")
    assert not heavy & set(MODEL_CODE)


def test_version(capsys):
    from avlabel import __version__
    from avlabel.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"avlabel {__version__}\n"


def test_an_unknown_command(tmp_path):
    code, lines, heavy = avlabel(tmp_path, "trian")
    assert_one_line(code, lines, 2, "unknown command 'trian'; did you mean train?")
    assert not heavy


def test_debug_shows_the_traceback(tmp_path):
    code, lines, _ = avlabel(tmp_path, "--debug", "train", "--max_step", "2")
    assert code == 1 and any("Traceback" in line for line in lines) and "UsageError" in lines[-1]
    code, lines, _ = avlabel(tmp_path, "train", "--max_step", "2", env={"AVLABEL_DEBUG": "1"})
    assert code == 1 and any("Traceback" in line for line in lines)


def test_an_unexpected_error_names_the_reason_a_library_wrapped(capsys):
    """A library's wrapper ("An error occurred while generating the dataset") says nothing of why: the line adds
    the innermost cause it was raised from."""
    from avlabel.core.errors import run

    def fails():
        try:
            raise RuntimeError("Could not load libtorchcodec.\n  Likely causes: ...")
        except RuntimeError as err:
            raise LookupError("An error occurred while generating the dataset") from err

    with pytest.raises(SystemExit) as stopped:
        run(fails, prog="avlabel caption")
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (
        "avlabel caption: error: LookupError: An error occurred while generating the dataset (because RuntimeError: "
        "Could not load libtorchcodec. Likely causes: ...) (rerun with AVLABEL_DEBUG=1 for the traceback)\n")


# ----------------------------------------------------------------------------- a quick start


def test_help_imports_no_library(tmp_path):
    modules = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", _ENTRY, "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "AVLABEL_TEST_MODULES": str(modules)})
    assert done.returncode == 0 and "train" in done.stdout and not done.stderr
    imported = set(json.loads(modules.read_text()))
    assert not imported & {"trl", "numpy", *HEAVY}, imported & {"trl", "numpy", *HEAVY}


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "4bit"])
def test_bitsandbytes_loads_only_to_quantize(tmp_path, dataset_dir, model_dir, quantized):
    """Training imports peft, and peft imports bitsandbytes, which warns about its CPU kernels on
    every command; a run that quantizes nothing keeps it out, and prints nothing but its own line."""
    code, lines, heavy = avlabel(tmp_path, "train", "--config", str(ROOT / "recipes" / "tiny" / "sft.yaml"),
                                 "--dataset_name", str(dataset_dir), "--model_name_or_path", str(model_dir),
                                 "--output_dir", "out", *(["--use_peft", "--load_in_4bit"] if quantized else []))
    assert code == 1 and "peft" in heavy, lines  # it got as far as the model folder, which holds no processor
    assert ("bitsandbytes" in heavy) == quantized
    if not quantized:
        assert_one_line(code, lines, 1, "avlabel train: error:")


def test_the_option_snapshot_of_sftconfig_is_current():
    """train reads its command line against train/sft_options.json before importing SFTConfig;
    after upgrading trl or transformers, rewrite it with
    python -c 'from avlabel.train.sft import SFT_CONFIG; SFT_CONFIG.write_snapshot()'"""
    from avlabel.train.sft import SFT_CONFIG

    assert json.loads(SFT_CONFIG.snapshot.read_text()) == SFT_CONFIG.current(), SFT_CONFIG.snapshot
    assert SFT_CONFIG.options() is not None


def test_without_a_snapshot_for_the_installed_trl_the_checks_still_answer_first(tmp_path, model_dir, monkeypatch):
    """Any trl or transformers but the snapshot's imports SFTConfig at once, yet builds it only after the checks:
    its __post_init__ (bf16 on a CPU, say) must not answer a command line that misses its dataset."""
    from avlabel.core.errors import UsageError
    from avlabel.core.parser import Deferred
    from avlabel.train import sft

    monkeypatch.setattr(sft, "SFT_CONFIG", Deferred("trl:SFTConfig", tmp_path / "no_snapshot.json", ("trl",)))
    with pytest.raises(UsageError, match="--dataset_name is required"):
        sft.make_parser().parse_args_and_config(["--model_name_or_path", str(model_dir), "--output_dir", "out",
                                                 "--bf16", "true", "--use_cpu", "false"])


def test_the_light_check_and_the_full_parse_read_a_command_line_alike(tmp_path, dataset_dir, model_dir):
    """The checked command line then parses into TRL's real classes, booleans and lists typed."""
    from trl import ModelConfig, SFTConfig

    from avlabel.train.sft import TrainScriptArguments, make_parser

    script_args, training_args, model_args = make_parser().parse_args_and_config([
        "--config", str(ROOT / "recipes" / "tiny" / "sft.yaml"), "--dataset_name", str(dataset_dir),
        "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--no_remove_unused_columns", "--report_to", "none", "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
    ])
    assert isinstance(script_args, TrainScriptArguments) and isinstance(training_args, SFTConfig)
    assert isinstance(model_args, ModelConfig)
    assert training_args.max_steps == 2 and training_args.remove_unused_columns is False
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny" / "sft.yaml").read_text())
    assert training_args.learning_rate == recipe["learning_rate"] != SFTConfig.learning_rate  # from the recipe
    assert model_args.use_peft is True and model_args.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("started", [["avlabel.train"], ["train"], ["avlabel.infer"], ["avlabel.eval", "metrics"],
                                     ["avlabel.eval.metrics"], ["eval.metrics"], ["avlabel.catalog"]], ids=" ".join)
def test_a_command_run_with_python_m_is_named_as_it_was_started(tmp_path, started):
    """`python -m avlabel.train` (installed), `python -m train` (a clone), a command's own module: each error
    names the command the way the user typed it, not another package's name."""
    done = subprocess.run([sys.executable, "-m", *started, "--no_such_flag", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    prog = f"python -m {' '.join(started)}"
    assert_one_line(done.returncode, done.stderr.splitlines(), 2, f"{prog}: error: unrecognized argument --no_such_flag")
