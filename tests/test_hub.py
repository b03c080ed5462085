"""Publishing to the Hub, for real, against the in-memory Hub-protocol server (tests/hub_server.py),
which refuses what the real Hub refuses: one test per rule checks the status code.

The fixtures are made by the project's own pieces: the tiny model (merged weights), a PEFT
adapter saved from it, the real resolved training arguments (`train.sft`), the real loss plot,
and a real `avlabel compare` run with the LLM judge served by tests/openai_server.py. Credentials
and machine paths are planted where careless code would carry them along; every pushed byte is
searched for them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from avlabel.core import schema
from avlabel.core.errors import UsageError
from avlabel.core.layouts import METADATA_NAME
from avlabel.hub.publish import (
    METRIC_DIR,
    PublishError,
    main,
    make_parser,
    publish_dataset,
    publish_eval,
    publish_metric,
    publish_model,
)

FAKE_OPENAI_KEY = "sk-planted-" + "Z9q" * 12
FAKE_HF_TOKEN = "hf_planted" + "Kx7" * 10
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def train_output(work, tiny_model_dir, synthetic_dataset_dir):
    """A training output folder as `avlabel train` leaves it, with a token planted where Trainer puts one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerState
    from trl import ModelConfig, SFTConfig

    from avlabel.train.plots import plot_loss
    from avlabel.train.sft import TrainScriptArguments, _resolved_arguments

    out = work / "train_out"
    shutil.copytree(tiny_model_dir, out / "merged")
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))  # non-zero B: the weights say something
    lora.save_pretrained(out / "adapter")  # adapter_config.json names the local base model's path
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(out / "adapter")

    args = SFTConfig(output_dir=str(out), hub_token=FAKE_HF_TOKEN, bf16=False, report_to=[], learning_rate=1e-4)
    script = TrainScriptArguments(dataset_name=str(synthetic_dataset_dir))
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4)
    recipe = _resolved_arguments(script, args, model_args)  # the real resolved arguments: it hides the token...
    recipe["hub_token"] = FAKE_HF_TOKEN  # ...which dumping the dataclass as it is would not
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for folder in (out / "checkpoint-4", out / "adapter"):
        folder.mkdir(exist_ok=True)
        torch.save(args, folder / "training_args.bin")  # what Trainer saves: pickled arguments, token included
    history = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-4} for s in range(1, 5)] + [{"step": 4, "eval_loss": 1.1}]
    TrainerState(global_step=4, log_history=history, best_model_checkpoint=str(out / "checkpoint-4")).save_to_json(
        str(out / "trainer_state.json"))
    plot_loss(history, out / "loss_curve.png", title="lora fine-tuning")
    (out / "train_results.json").write_text(json.dumps({
        "method": "lora", "base_model": str(tiny_model_dir), "dataset": str(synthetic_dataset_dir),
        "train_samples": 9, "epochs": 1.0, "steps": 4, "hardware": "cpu, 1 process(es), 2 cores",
        "prompt_sha": "0123abcd", "short_prompt": False, "answer_format": "fenced",
        "hyperparameters": {"learning_rate": 1e-4, "per_device_train_batch_size": 2, "lora_r": 4,
                            "lora_target_modules": ["q_proj", "v_proj"], "sampling": {"fps": 2.0, "max_frames": 4}},
        "final_loss": 0.75, "eval_loss": 1.1,
    }, indent=2))
    return out


@pytest.fixture(scope="module")
def eval_output(work):
    """A real `avlabel compare` folder: two runs against references, judged, with the trust checks."""
    from eval_labels import perturbed, random_label, write_labels
    from openai_server import OpenAIServer

    from avlabel.eval.compare import compare_runs
    from avlabel.eval.judge import JudgeConfig
    from avlabel.eval.trust import TrustConfig

    rng = np.random.default_rng(7)
    references = {f"clip{i:02d}": random_label(rng) for i in range(10)}
    refs = write_labels(work / "references", references)
    runs = {"baseline": write_labels(work / "baseline", {k: perturbed(v, rng, 0.7) for k, v in references.items()}),
            "sft": write_labels(work / "sft", {k: perturbed(v, rng, 0.2) for k, v in references.items()})}
    out = work / "compare"
    with OpenAIServer() as judge_server:
        config = JudgeConfig(judge_model="test-judge", judge_base_url=judge_server.base_url, judge_api_key=FAKE_OPENAI_KEY,
                             judge_cache=str(work / "judge_cache.sqlite"), judge_per_clip=True, judge_progress=False)
        compare_runs(runs, refs, out, judge=config, bootstrap_samples=200, trust=TrustConfig(clips=4, repeats=2))
    results = json.loads((out / "results.json").read_text())
    results["judge"]["api_key"] = FAKE_OPENAI_KEY  # a careless evaluator that dumps its whole config
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return out


def _repo_id(name: str, request) -> str:
    """A repo of this test's own (the server lives as long as the session)."""
    return f"tester/{name}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]}"


# ----------------------------------------------------------------------------- the server itself


def test_server_answers_missing_things_as_the_hub_does(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi()
    assert api.whoami()["name"] == "tester"
    api.create_repo("tester/rejects")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("tester/rejects")
    assert conflict.value.response.status_code == 409
    api.create_repo("tester/rejects", exist_ok=True)  # the 409 that exist_ok swallows
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/no-such-repo")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("tester/rejects", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("tester/rejects", "missing.json", cache_dir=tmp_path)
    assert hub.unhandled == []


def _status(error: Exception) -> int:
    """The HTTP status behind a client's error (validate-yaml's ValueError wraps the HTTP error)."""
    while getattr(error, "response", None) is None and error.__cause__ is not None:
        error = error.__cause__
    return error.response.status_code


def _lfs_puts(requests) -> set[str]:
    return {path.rsplit("/", 1)[1] for method, path in requests if method == "PUT" and path.startswith("/_lfs/")}


def test_an_unknown_token_is_401_on_every_route(hub, request):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = _repo_id("token", request)
    HfApi().create_repo(repo_id)
    garbage = HfApi(token="garbage")
    for call in (garbage.whoami, lambda: garbage.model_info(repo_id),
                 lambda: garbage.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id=repo_id)):
        with pytest.raises(HfHubHTTPError) as refused:
            call()
        assert _status(refused.value) == 401
    assert "Invalid credentials in Authorization header" in str(refused.value)
    anonymous = HfApi(token=False)  # no token: public reads work, writes do not
    assert anonymous.model_info(repo_id).id == repo_id
    with pytest.raises(HfHubHTTPError) as unsigned:
        anonymous.create_repo(_repo_id("anonymous", request))
    assert _status(unsigned.value) == 401
    assert set(hub.files(repo_id)) == {".gitattributes"}


def test_the_token_decides_the_namespace(hub, request, eval_output):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    from hub_server import OTHER_TOKEN, OTHER_USER

    mine, theirs = HfApi(), HfApi(token=OTHER_TOKEN)
    assert (mine.whoami()["name"], theirs.whoami()["name"]) == ("tester", OTHER_USER)
    their_repo = f"{OTHER_USER}/{_repo_id('theirs', request).split('/')[1]}"
    theirs.create_repo(their_repo)

    with pytest.raises(HfHubHTTPError) as create:
        mine.create_repo(f"{OTHER_USER}/not-mine")
    assert _status(create.value) == 403
    assert f'You don\'t have the rights to create a model under the namespace "{OTHER_USER}"' in str(create.value)
    with pytest.raises(HfHubHTTPError) as commit:
        mine.upload_file(path_or_fileobj=b"mine", path_in_repo="notes.txt", repo_id=their_repo)
    assert _status(commit.value) == 403 and "pass `create_pr=1`" in str(commit.value)
    assert set(hub.files(their_repo)) == {".gitattributes"}
    with pytest.raises(PublishError, match=r"refused the push.*403"):  # publish says so in one line
        publish_eval(eval_output, f"{OTHER_USER}/eval-run")
    assert ("dataset", f"{OTHER_USER}/eval-run") not in hub.state.repos

    private = f"{OTHER_USER}/{_repo_id('private', request).split('/')[1]}"
    theirs.create_repo(private, private=True)
    with pytest.raises(RepositoryNotFoundError) as hidden:  # another user's private repo does not exist for you
        mine.model_info(private)
    assert _status(hidden.value) == 404


def test_create_pr_opens_a_pull_request_ref_and_leaves_main(hub, request):
    from huggingface_hub import HfApi
    from hub_server import OTHER_TOKEN

    repo_id = _repo_id("pr", request)
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="notes.txt", repo_id=repo_id)
    main_before = hub.files(repo_id)
    proposal = HfApi(token=OTHER_TOKEN).upload_file(path_or_fileobj=b"v2 from someone else", path_in_repo="notes.txt",
                                                   repo_id=repo_id, create_pr=True)
    assert (proposal.pr_revision, proposal.pr_num) == ("refs/pr/1", 1)
    assert hub.files(repo_id) == main_before
    assert hub.files(repo_id, revision="refs/pr/1")["notes.txt"] == b"v2 from someone else"
    assert api.model_info(repo_id, revision="refs/pr/1").sha != api.model_info(repo_id).sha
    second = api.upload_file(path_or_fileobj=b"v3", path_in_repo="notes.txt", repo_id=repo_id, create_pr=True)
    assert second.pr_revision == "refs/pr/2"
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [b.name for b in refs.branches] == ["main"]
    assert sorted(r.ref for r in refs.pull_requests) == ["refs/pr/1", "refs/pr/2"]
    assert hub.files(repo_id) == main_before


def _binary_files(synthetic_dataset_dir) -> dict[str, bytes]:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save

    parquet = io.BytesIO()
    pq.write_table(pa.table({"x": [1, 2, 3]}), parquet)
    return {"model.safetensors": save({"weight": np.arange(6, dtype=np.float32)}),
            "clip.mp4": next((synthetic_dataset_dir / "test").glob("*.mp4")).read_bytes(),
            "rows.parquet": parquet.getvalue()}


@pytest.mark.parametrize("name", ["model.safetensors", "clip.mp4", "rows.parquet", "notes.txt"])
def test_binary_or_large_files_must_go_through_lfs(hub, request, name, synthetic_dataset_dir):
    """The Hub's pre-receive hook refuses binary files (and text over 10 MiB) committed as regular files."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import BadRequestError

    data = _binary_files(synthetic_dataset_dir).get(name, b"a line of text\n" * 800_000)  # 11.2 MB of text
    repo_id = _repo_id("binary", request)
    api = HfApi()
    api.create_repo(repo_id)
    forced = CommitOperationAdd(name, data)
    forced._upload_mode = "regular"  # what a client sends that skips preupload, like git without LFS
    with pytest.raises(BadRequestError) as refused:
        api.create_commit(repo_id, [forced], commit_message="no LFS")
    assert _status(refused.value) == 400
    assert f"- {name} (ref: refs/heads/main)" in str(refused.value)
    assert ("larger than 10 MiB" if name == "notes.txt" else "contains binary files") in str(refused.value)
    assert name not in hub.files(repo_id)
    api.upload_file(path_or_fileobj=data, path_in_repo=name, repo_id=repo_id)  # the client's own way: LFS
    assert hub.state.repos[("model", repo_id)].resolve("main").files[name].lfs


@pytest.mark.parametrize("repo_type, metadata, complaint", [
    ("model", "license: not-a-real-license", '"license" must be one of'),
    ("dataset", "license: not-a-real-license", '"license" must be one of'),
    ("dataset", "configs: 42", '"configs" must be an array'),
    ("dataset", "configs:\n- data_files: train/*", '"configs[0].config_name" is required'),
    ("model", "model-index:\n- name: x\n  results:\n  - task: {}\n    metrics: []", "task.type"),
    ("space", "sdk: jupyter-lab", '"sdk" must be one of'),
    ("dataset", "language: en", '"language" must be an array'),
    ("dataset", "language:\n- en-US", '"language[0]" must be a lowercase ISO 639 code'),
    ("model", "language:\n- en\n- no", '"language[1]" must be a lowercase ISO 639 code'),  # YAML reads `no` as false
    ("dataset", "task_categories: video-text-to-text", '"task_categories" must be an array'),
])
def test_card_metadata_is_validated(hub, request, monkeypatch, repo_type, metadata, complaint):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import BadRequestError

    card = f"---\n{metadata}\n---\n# card\n".encode()
    repo_id = _repo_id(f"card-{repo_type}", request)
    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, space_sdk="gradio" if repo_type == "space" else None)
    before = hub.files(repo_id, repo_type)
    with pytest.raises(ValueError, match=re.escape(complaint)) as refused:  # huggingface_hub asks validate-yaml first
        api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id=repo_id, repo_type=repo_type)
    assert _status(refused.value) == 400
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda *args, **kwargs: None)  # a client that does not ask first
    with pytest.raises(BadRequestError, match=re.escape(complaint)) as at_commit:
        api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id=repo_id, repo_type=repo_type)
    assert _status(at_commit.value) == 400
    assert hub.files(repo_id, repo_type) == before


def test_a_folder_holds_at_most_10000_entries(hub, request):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import BadRequestError
    from hub_server import MAX_FOLDER_ENTRIES

    assert MAX_FOLDER_ENTRIES == 10_000
    repo_id = _repo_id("folder", request)
    hub.seed(repo_id, {f"clips/{i:05d}.txt": b"x" for i in range(MAX_FOLDER_ENTRIES - 1)})
    api = HfApi()
    api.upload_file(path_or_fileobj=b"fits", path_in_repo="clips/last.txt", repo_id=repo_id)  # the 10,000th
    with pytest.raises(BadRequestError) as refused:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="clips/one-too-many.txt", repo_id=repo_id)
    assert _status(refused.value) == 400
    assert "too many files per directory" in str(refused.value) and "Offending directories: /clips/" in str(refused.value)
    assert len(hub.files(repo_id)) == MAX_FOLDER_ENTRIES + 1
    del hub.state.repos[("model", repo_id)]


def test_a_repository_holds_at_most_100000_files(hub, request):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import BadRequestError
    from hub_server import MAX_REPO_FILES

    assert MAX_REPO_FILES == 100_000
    repo_id = _repo_id("repo", request)
    hub.seed(repo_id, {f"part{i // 5000:02d}/{i:06d}.txt": b"x" for i in range(MAX_REPO_FILES - 1)})  # + .gitattributes
    with pytest.raises(BadRequestError) as refused:
        HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="one-too-many.txt", repo_id=repo_id)
    assert _status(refused.value) == 400 and "more than the 100000" in str(refused.value)
    del hub.state.repos[("model", repo_id)]


def test_a_commit_carries_at_most_1000_files(hub, request):
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import BadRequestError, HfHubHTTPError
    from hub_server import MAX_COMMIT_FILES, MAX_PATHS_INFO

    repo_id = _repo_id("commit", request)
    api = HfApi()
    api.create_repo(repo_id)
    operations = [CommitOperationAdd(f"notes/{i:04d}.txt", b"%d\n" % i) for i in range(MAX_COMMIT_FILES + 1)]
    with pytest.raises(BadRequestError) as refused:
        api.create_commit(repo_id, operations, commit_message="too many at once")
    assert _status(refused.value) == 400 and "split it into several commits" in str(refused.value)
    api.create_commit(repo_id, operations[:MAX_COMMIT_FILES], commit_message="just enough")
    assert len(hub.files(repo_id)) == MAX_COMMIT_FILES + 1
    with pytest.raises(HfHubHTTPError) as asked:  # the Hub answers paths-info for 1,000 paths at most
        api.get_paths_info(repo_id, [f"notes/{i:04d}.txt" for i in range(MAX_PATHS_INFO + 1)])
    assert _status(asked.value) == 413


# ----------------------------------------------------------------------------- models


def test_push_merged_model_with_eval_and_load_back(hub, request, train_output, eval_output, tiny_model_dir):
    import torch
    from huggingface_hub import HfApi
    from transformers import AutoModelForImageTextToText, AutoProcessor

    repo_id = _repo_id("merged", request)
    published = publish_model(train_output, repo_id, eval_dir=eval_output, dataset_repo="tester/dashcam-clips")
    assert published.url and "/commit/" in published.url and "pushed" in published.describe()
    commits = len(hub.commits)
    again = publish_model(train_output, repo_id, eval_dir=eval_output, dataset_repo="tester/dashcam-clips")
    assert len(hub.commits) == commits and again.url == published.url  # nothing changed: no commit, the same head
    assert "up to date, nothing pushed" in again.describe()

    model = AutoModelForImageTextToText.from_pretrained(repo_id)
    processor = AutoProcessor.from_pretrained(repo_id)
    original = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    for (name, loaded), (_, source) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(loaded, source), name
    assert processor.tokenizer.convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id

    info = HfApi().model_info(repo_id)
    files = {s.rfilename for s in info.siblings}
    assert {"model.safetensors", "config.json", "loss_curve.png", "recipe.yaml", "train_results.json",
            "eval/results.json", "eval/report.html", "README.md"} <= files
    assert not any(f.endswith("training_args.bin") for f in files)
    card = info.card_data
    assert card.pipeline_tag == "video-text-to-text" and card.datasets == ["tester/dashcam-clips"]
    assert "test-model" in card.tags and card.license == "apache-2.0"
    assert card.base_model is None  # trained from a local folder: no Hub id to name

    # model-index: the fine-tuned run's judge score and exact metric of every field, with intervals and the judge
    results = json.loads((eval_output / "results.json").read_text())
    for section in ("fields", "deterministic"):
        entries = {r.metric_name.split(" ")[0]: r for r in card.eval_results
                   if (r.metric_type == "judge_score") == (section == "fields")}
        assert set(entries) == set(schema.FIELD_NAMES)
        for field_name, result in entries.items():
            expected = results[section][field_name]["sft"]
            assert result.metric_type == expected["metric"]
            assert result.metric_value == pytest.approx(expected["value"], abs=1e-4)
            assert result.metric_args["ci_low"] == pytest.approx(expected["ci_low"], abs=1e-4)
            assert result.metric_args["ci_high"] == pytest.approx(expected["ci_high"], abs=1e-4)
            assert result.metric_args.get("judge") == ("test-judge" if section == "fields" else None)
            assert result.dataset_type == "tester/dashcam-clips" and result.task_type == "video-text-to-text"

    readme = hub.files(repo_id, "model")["README.md"].decode()
    assert "randomly initialised test model" in readme
    assert "](loss_curve.png)" in readme and "](eval/judge_scores.png)" in readme and "](eval/report.html)" in readme
    assert "LoRA" in readme and "learning_rate" in readme and "```yaml" in readme  # method, hyperparameters, recipe
    assert "Judge trust" in readme and "`test-judge`" in readme
    assert "## Intended use" in readme and "## Limitations" in readme and "## License" in readme


def test_push_adapter_and_load_back(hub, request, train_output, tiny_model_dir):
    import torch
    from huggingface_hub import HfApi
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    base_repo = _repo_id("base", request)
    HfApi().create_repo(base_repo)
    HfApi().upload_folder(folder_path=str(tiny_model_dir), repo_id=base_repo, commit_message="tiny base")
    repo_id = _repo_id("adapter", request)
    publish_model(train_output, repo_id, weights="adapter", base_model=base_repo)

    config = PeftConfig.from_pretrained(repo_id)
    assert config.base_model_name_or_path == base_repo  # the local path was replaced by the Hub id
    base = AutoModelForImageTextToText.from_pretrained(config.base_model_name_or_path)
    model = PeftModel.from_pretrained(base, repo_id)
    saved = load_file(train_output / "adapter" / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():
        match = [v for k, v in loaded.items() if k.startswith(key.removesuffix(".weight")) and k.endswith(".weight")]
        assert len(match) == 1 and torch.equal(match[0], value), key

    card = HfApi().model_info(repo_id).card_data
    assert card.library_name == "peft" and card.base_model == base_repo and card.base_model_relation == "adapter"
    assert not card.eval_results  # no evaluation published with this one


def test_dry_run_writes_the_exact_repo_folder_and_pushes_nothing(hub, request, train_output, eval_output, tmp_path):
    repo_id = _repo_id("dry", request)
    before = len(hub.requests)
    published = publish_model(train_output, repo_id, eval_dir=eval_output, dry_run_dir=tmp_path / "dry")
    assert hub.requests[before:] == []  # not a single request: nothing created, nothing pushed
    assert ("model", repo_id) not in hub.state.repos
    folder = published.folder
    assert folder == tmp_path / "dry" / "models" / repo_id
    written = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert sorted(written) == published.files
    # the small files are copies, to edit freely; the weights are links to the run's own
    assert all(p.stat().st_nlink == 1 for p in folder.rglob("*") if p.is_file() and p.stat().st_size < 2**20)
    weights = folder / "model.safetensors"
    assert weights.stat().st_size >= 2**20 and weights.stat().st_ino == (train_output / "merged" / "model.safetensors").stat().st_ino

    publish_model(train_output, repo_id, eval_dir=eval_output)  # the same plan, pushed
    pushed = hub.files(repo_id, "model")
    pushed.pop(".gitattributes")
    assert pushed == written


def test_dry_run_refuses_a_folder_with_stale_files(train_output, eval_output, tmp_path):
    publish_model(train_output, "tester/stale", eval_dir=eval_output, dry_run_dir=tmp_path)
    with pytest.raises(PublishError, match="already holds files"):
        publish_model(train_output, "tester/stale", dry_run_dir=tmp_path)  # without eval/: those files are stale


def test_card_shows_compare_trust_table_and_names_a_trust_section_it_cannot_read(eval_output):
    from avlabel.eval.compare import trust_table
    from avlabel.hub.cards import CardInputError, check_results, evaluation_markdown

    results = json.loads((eval_output / "results.json").read_text())
    table = trust_table(results["trust"])
    # the card's trust rows are the compare report's, cell for cell
    assert all(" | ".join(row) in evaluation_markdown(check_results(results, "results.json")) for row in table["rows"])
    broken = {**results, "trust": {**results["trust"], "fields": {"weather": {"verdict": "trustworthy"}}}}
    with pytest.raises(CardInputError, match=r"^results.json: 'trust' is not the judge-trust checks .*'identity'"):
        check_results(broken, "results.json")


def test_card_of_a_real_base_model_without_a_judge(eval_output):
    """A Cosmos Reason fine-tune: its license and base model, no test-model wording; deterministic results only."""
    from huggingface_hub import ModelCard

    from avlabel.hub.cards import model_card

    judged = json.loads((eval_output / "results.json").read_text())
    # what compare writes without a judge: the deterministic metrics are the headline
    results = {**judged, "fields": judged["deterministic"], "headline": "deterministic", "judge": None, "trust": None}
    train = {"method": "qlora", "base_model": "nvidia/Cosmos-Reason1-7B", "train_samples": 9273, "short_prompt": True}
    card = model_card(repo_id="me/cosmos-av", train=train, weights="merged", base_model_id="nvidia/Cosmos-Reason1-7B",
                      base_model_name="Cosmos-Reason1-7B", dataset_id="me/clips", dataset_name="clips", test_model=False,
                      results=results, eval_run="sft")
    data = ModelCard(str(card)).data  # parsed back from the YAML, as the Hub does
    assert (data.license, data.license_name) == ("other", "nvidia-open-model-license")
    assert data.base_model == "nvidia/Cosmos-Reason1-7B" and data.base_model_relation == "finetune"
    assert "test-model" not in data.tags and "qlora" in data.tags
    assert "randomly initialised" not in card.text and "QLoRA (LoRA on a base quantised to 4 bits)" in card.text
    assert "--model me/cosmos-av --short_prompt" in card.text  # how to caption with the prompt it was trained on
    eight_bit = model_card(repo_id="me/cosmos-av", train={**train, "hyperparameters": {"quantization": {"bits": 8}}},
                           weights="merged", base_model_id="nvidia/Cosmos-Reason1-7B", base_model_name="Cosmos-Reason1-7B",
                           dataset_id="me/clips", dataset_name="clips", test_model=False, results=results, eval_run="sft")
    assert "QLoRA (LoRA on a base quantised to 8 bits)" in eight_bit.text
    assert "No LLM judge was used" in card.text and "### Deterministic metrics" not in card.text
    assert {r.metric_type for r in data.eval_results} == {"accuracy", "f1", "balanced_accuracy", "sentence_chrf"}
    assert len(data.eval_results) == len(schema.FIELD_NAMES)


# ----------------------------------------------------------------------------- datasets


def _rows(dataset) -> dict[str, dict]:
    return {row["clip_id"]: schema.row_to_label(row) for row in dataset.select_columns(["clip_id", *schema.FIELD_NAMES])}


def test_publish_builder_folder_and_load_dataset(hub, request, synthetic_dataset_dir):
    import datasets
    from huggingface_hub import HfApi

    repo_id = _repo_id("clips", request)
    published = publish_dataset(synthetic_dataset_dir, repo_id, private=True, clips_per_folder=8)
    pushed = hub.files(repo_id, "dataset")
    train_clips = sorted(name for name in pushed if name.startswith("train/") and name.endswith(".mp4"))
    assert len(train_clips) == 20 and {name.split("/")[1] for name in train_clips} == {"000", "001", "002"}
    assert max(sum(n.startswith(f"train/{f}/") for n in train_clips) for f in ("000", "001", "002")) == 8
    metadata = pq.read_table(io.BytesIO(pushed[f"train/{METADATA_NAME}"])).to_pylist()
    assert sorted(f"train/{row['file_name']}" for row in metadata) == train_clips  # file_name: 000/<clip>.mp4
    local = datasets.load_dataset(str(synthetic_dataset_dir))
    remote = datasets.load_dataset(repo_id)
    assert set(remote) == set(local) == {"train", "test"}
    assert isinstance(remote["train"].features["video"], datasets.Video)
    for split in local:
        assert _rows(remote[split]) == _rows(local[split])
    frame = remote["test"][0]["video"].get_frame_at(0).data
    assert frame.ndim == 3 and frame.shape[0] == 3

    streamed = next(iter(datasets.load_dataset(repo_id, split="train", streaming=True)))
    assert streamed["clip_id"] in _rows(local["train"]) and streamed["video"].get_frame_at(0).data.shape == frame.shape

    info = HfApi().dataset_info(repo_id)
    assert info.private is True
    assert {c["config_name"] for c in info.card_data.configs} == {"default"}
    features = {f["name"]: f for f in info.card_data.dataset_info["features"]}  # the builder's card, read back
    assert features["video"]["dtype"] == "video" and set(schema.FIELD_NAMES) <= set(features)
    assert {s.rfilename for s in info.siblings} - {".gitattributes"} == set(published.files)
    from huggingface_hub.errors import RepositoryNotFoundError
    with pytest.raises(RepositoryNotFoundError):  # private: invisible without a token
        HfApi(token=False).dataset_info(repo_id)


def test_both_dataset_layouts_load_the_same_rows_and_videos(hub, request, synthetic_dataset_dir, tmp_path):
    """The folders layout and the Parquet shards with embedded clips, read back by `load_dataset` from the Hub."""
    import datasets
    import torch

    folders, parquet = _repo_id("folders", request), _repo_id("parquet", request)
    assert publish_dataset(synthetic_dataset_dir, folders).files == sorted(hub.files(folders, "dataset").keys() - {".gitattributes"})
    dry = publish_dataset(synthetic_dataset_dir, parquet, layout="parquet", dry_run_dir=tmp_path / "dry")
    publish_dataset(synthetic_dataset_dir, parquet, layout="parquet")
    pushed = hub.files(parquet, "dataset")
    assert sorted(pushed.keys() - {".gitattributes"}) == dry.files == [
        "README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet", "quarantine.jsonl",
        "statistics.png"]
    for name in dry.files:  # the dry run wrote exactly what was pushed: the shards are written the same way twice
        assert (dry.folder / name).read_bytes() == pushed[name], name
    shard = pq.read_table(io.BytesIO(pushed["data/test-00000-of-00001.parquet"]))
    clips = {path.name: path.read_bytes() for path in (synthetic_dataset_dir / "test").glob("*.mp4")}
    assert {row["path"]: row["bytes"] for row in shard.column("video").to_pylist()} == clips  # bytes inside, no paths

    by_folders, by_parquet = datasets.load_dataset(folders), datasets.load_dataset(parquet)
    for split in ("train", "test"):
        assert by_parquet[split].features == by_folders[split].features
        assert isinstance(by_parquet[split].features["video"], datasets.Video)
        assert by_parquet[split].remove_columns("video").to_list() == by_folders[split].remove_columns("video").to_list()
        for row in (0, len(by_folders[split]) - 1):
            frames = [d[row]["video"].get_frames_in_range(0, 3).data for d in (by_folders[split], by_parquet[split])]
            assert frames[0].shape[0] == 3 and torch.equal(*frames)


def test_folders_layout_refuses_more_clips_than_a_repo_holds(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# clips\n")
    names = [f"clip{i:06d}.mp4" for i in range(100_000)]
    pq.write_table(pa.table({"file_name": names}), tmp_path / "train" / METADATA_NAME)
    with pytest.raises(PublishError, match=r"100,000 clips, one file each, do not fit .* --dataset_layout parquet"):
        publish_dataset(tmp_path, "tester/too-many", layout="folders", dry_run_dir=tmp_path / "dry")
    with pytest.raises(UsageError, match=r"--clips_per_folder 10001: must be 1 to 10,000"):
        publish_dataset(tmp_path, "tester/too-many", clips_per_folder=10_001, dry_run_dir=tmp_path / "dry")


def _fake_dataset(folder: Path, clips: int) -> list[str]:
    """A built dataset's shape with `clips` tiny distinct stand-ins for videos (publishing never decodes them)."""
    (folder / "train").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nconfigs:\n- config_name: default\n  data_files:\n"
                                      "  - split: train\n    path: train/**\n---\n# many clips\n")
    names = [f"clip{i:05d}.mp4" for i in range(clips)]
    for i, name in enumerate(names):
        (folder / "train" / name).write_bytes(b"\0\0\0\x18ftypisom" + b"%d" % i)
    pq.write_table(pa.table({"file_name": names, "clip_id": [n.removesuffix(".mp4") for n in names]}),
                   folder / "train" / METADATA_NAME)
    return names


@pytest.mark.slow
def test_a_25000_clip_publish_killed_midway_resumes_without_resending(hub, request, tmp_path):
    """`avlabel publish` in a process killed after a few commits; the rerun sends only what the Hub lacks.

    The command is the publish module itself (`avlabel publish` runs its `main`): `python -m avlabel.cli`
    builds every command's parser first, which imports TRL and transformers, 30 s here.
    """
    from hub_server import MAX_FOLDER_ENTRIES

    names = _fake_dataset(tmp_path / "dataset", 25_000)
    repo_id = _repo_id("fleet", request)
    command = [sys.executable, "-m", "avlabel.hub.publish", "--dataset_dir", str(tmp_path / "dataset"),
               "--dataset_repo", repo_id, "--files_per_commit", "500"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

    def commits() -> list:
        return [c for c in hub.commits if c.repo_id == repo_id]

    killed = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(commits()) < 4 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.kill()
    assert killed.wait() != 0, killed.stderr.read().decode()[-2000:]  # it was killed, not finished
    time.sleep(0.5)  # a request the killed process had in flight is answered (or not) by now
    with hub.state.lock:
        at_kill = hub.files(repo_id, "dataset")
        stored = set(hub.state.lfs)
        requests_before, commits_before = len(hub.requests), len(commits())
    assert 4 * 500 <= len(at_kill) - 1 < len(names)  # some commits made it, most of the clips did not

    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(at_kill) - 1} of {len(names) + 2} files are there already" in rerun.stderr

    resent = [path for c in commits()[commits_before:] for path in c.added if path in at_kill]
    assert resent == []  # no finished file is in any commit of the rerun...
    assert _lfs_puts(hub.requests[requests_before:]) & stored == set()  # ...nor uploaded again
    assert all(len(c.added) + len(c.deleted) <= 500 for c in commits())

    final = hub.files(repo_id, "dataset")
    metadata = pq.read_table(io.BytesIO(final[f"train/{METADATA_NAME}"])).column("file_name").to_pylist()
    assert sorted(f"train/{name}" for name in metadata) == sorted(n for n in final if n.endswith(".mp4"))
    assert len(metadata) == len(names) and {n.split("/")[0] for n in metadata} == {f"{i:03d}" for i in range(25)}
    folders = {}
    for name in final:
        folders[name.rsplit("/", 1)[0]] = folders.get(name.rsplit("/", 1)[0], 0) + 1
    assert max(folders.values()) == 1_000 < MAX_FOLDER_ENTRIES
    index = ["README.md", f"train/{METADATA_NAME}"]  # what names the clips is committed after them
    assert commits()[-1].added[-2:] == index and not any(set(index) & set(c.added) for c in commits()[:-1])


def test_dataset_push_to_hub_with_video_column(hub, request, synthetic_dataset_dir):
    import datasets

    repo_id = _repo_id("parquet", request)
    local = datasets.load_dataset(str(synthetic_dataset_dir))
    local.push_to_hub(repo_id)
    remote = datasets.load_dataset(repo_id)
    assert isinstance(remote["test"].features["video"], datasets.Video)
    assert _rows(remote["test"]) == _rows(local["test"])
    streamed = next(iter(datasets.load_dataset(repo_id, split="test", streaming=True)))
    assert streamed["video"].get_frame_at(0).data.ndim == 3


# ----------------------------------------------------------------------------- evaluation runs and errors


def test_publish_eval_run_to_its_own_repo(hub, request, eval_output):
    from huggingface_hub import HfApi

    repo_id = _repo_id("eval", request)
    publish_eval(eval_output, repo_id, model_repo="tester/some-model")
    info = HfApi().dataset_info(repo_id)
    files = {s.rfilename for s in info.siblings}
    assert {"results.json", "report.html", "judge_scores.png", "README.md"} <= files
    assert info.card_data.viewer is False
    readme = hub.files(repo_id, "dataset")["README.md"].decode()
    assert "tester/some-model" in readme and "](judge_scores.png)" in readme and "| weather |" in readme


@pytest.mark.slow
def test_published_metric_loads_with_evaluate_by_repo_id(hub, tmp_path):
    """`avlabel publish --metric_repo tester/av_label_metric`, then `evaluate.load("tester/av_label_metric")` in
    a fresh process computes what the metric folder computes."""
    from eval_labels import perturbed, random_label

    (args,) = make_parser().parse_args_and_config(args=["--metric_repo", "tester/av_label_metric"])
    (published,) = main(args)
    space = hub.files("tester/av_label_metric", "space")
    assert {"av_label_metric.py", "README.md", "app.py", "requirements.txt"} <= set(space)
    card = yaml.safe_load(space["README.md"].decode().split("---")[1])
    assert card["sdk"] == "gradio" and card["app_file"] == "app.py" and {"evaluate", "metric"} <= set(card["tags"])
    assert 'evaluate.load("tester/av_label_metric")' in space["app.py"].decode()
    # its card's usage loads it as the Space's visitors can: by repo id, not the project's folder
    assert 'evaluate.load("tester/av_label_metric")' in space["README.md"].decode()
    assert "eval/av_label_metric" not in space["README.md"].decode()
    # the Space installs what evaluate.load refuses to run the metric without (its own widget needs evaluate)
    assert {"evaluate", "sacrebleu", "rouge_score", "scikit-learn"} <= set(space["requirements.txt"].decode().split())

    rng = np.random.default_rng(3)
    references = [random_label(rng) for _ in range(6)]
    labels = {"predictions": [json.dumps(perturbed(r, rng, 0.5)) for r in references],
              "references": [json.dumps(r) for r in references]}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    script = ("import evaluate, json, sys\n"
              "labels = json.load(open('labels.json'))\n"
              "scores = [evaluate.load(path).compute(**labels) for path in ('tester/av_label_metric', sys.argv[1])]\n"
              "print(json.dumps(scores))\n")
    before = len(hub.requests)
    done = subprocess.run([sys.executable, "-c", script, str(METRIC_DIR)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_HOME": str(tmp_path / "hf_home")}, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    from_hub, from_folder = json.loads(done.stdout.splitlines()[-1])
    assert from_hub == from_folder and from_hub["weather/accuracy"] is not None
    assert ("GET", "/spaces/tester/av_label_metric/resolve/main/av_label_metric.py") in hub.requests[before:]

    with pytest.raises(UsageError, match="must be a Python identifier"):
        publish_metric("tester/av-label-metric")


def test_missing_repo_without_create_is_a_clear_error(hub, request, train_output):
    repo_id = _repo_id("absent", request)
    with pytest.raises(PublishError, match=rf"model repo '{repo_id}' .* does not exist"):
        publish_model(train_output, repo_id, create_repo=False)
    assert ("model", repo_id) not in hub.state.repos


def test_revisions(hub, request, train_output):
    from huggingface_hub import HfApi

    repo_id = _repo_id("branches", request)
    HfApi().create_repo(repo_id)
    with pytest.raises(PublishError, match="has no branch 'experiment': name an existing branch.*--create_branch true"):
        publish_model(train_output, repo_id, revision="experiment", create_branch=False)
    publish_model(train_output, repo_id, revision="experiment", commit_message="try a branch")
    on_branch = {s.rfilename for s in HfApi().model_info(repo_id, revision="experiment").siblings}
    on_main = {s.rfilename for s in HfApi().model_info(repo_id).siblings}
    assert "model.safetensors" in on_branch and on_main == {".gitattributes"}
    assert HfApi().list_repo_commits(repo_id, revision="experiment")[0].title == "try a branch"


def test_token_from_the_stored_login_or_a_clear_error(hub, request, monkeypatch, eval_output, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    repo_id = _repo_id("login", request)
    with pytest.raises(PublishError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        publish_eval(eval_output, repo_id)
    assert ("dataset", repo_id) not in hub.state.repos

    monkeypatch.setitem(hub.users, "hf_stored_login_token", "tester")  # a token the Hub knows
    huggingface_hub.login(token="hf_stored_login_token")  # what `hf auth login` stores
    publish_eval(eval_output, repo_id)
    assert ("dataset", repo_id) in hub.state.repos and "hf_stored_login_token" in hub.tokens


def test_cli_in_a_fresh_process_reads_the_environment(hub, request, eval_output, tmp_path):
    """`python -m hub publish` with HF_ENDPOINT set before any import: the way users run it."""
    import os

    from huggingface_hub import HfApi

    repo_id = _repo_id("cli", request)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "hub", "publish", "--eval_dir", str(eval_output), "--eval_repo", repo_id]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"dataset {repo_id}@main" in done.stdout
    assert "results.json" in {s.rfilename for s in HfApi().dataset_info(repo_id).siblings}

    failed = subprocess.run(command + ["--no_create_repo", "--eval_repo", repo_id + "-absent"], env=env,
                            capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert failed.returncode == 1 and "does not exist" in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.parametrize(("argv", "message"), [
    (["--model_dir", "."], "--model_dir needs --model_repo"),
    ([], "nothing to publish"),
    (["--metric_repo", "me/av-label-metric", "--dry_run"], "--metric_repo me/av-label-metric: evaluate imports the metric"),
])
def test_cli_arguments_are_checked(argv, message, capsys):
    """A wrong argument is one line and exit code 2, as for every command."""
    from avlabel.cli import main as avlabel

    with pytest.raises(SystemExit) as exited:
        avlabel(["publish", *argv])
    lines = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("avlabel publish: error: "), lines
    assert message in lines[0], lines


# ----------------------------------------------------------------------------- secrets and paths


def test_no_secret_or_machine_path_in_any_pushed_file(hub, request, monkeypatch, work, train_output, eval_output,
                                                       synthetic_dataset_dir, tiny_model_dir):
    from huggingface_hub import HfApi

    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    monkeypatch.setitem(hub.users, FAKE_HF_TOKEN, "tester")  # the token publishes, and must not be published
    planted = [p for p in (train_output / "recipe.yaml", train_output / "adapter" / "training_args.bin",
                           eval_output / "results.json") if FAKE_HF_TOKEN.encode() in p.read_bytes()
               or FAKE_OPENAI_KEY.encode() in p.read_bytes()]
    assert len(planted) == 3  # the fixtures really carry the credentials
    assert str(tiny_model_dir).encode() in (train_output / "adapter" / "adapter_config.json").read_bytes()

    repos = [(_repo_id("s-merged", request), "model"), (_repo_id("s-adapter", request), "model"),
             (_repo_id("s-data", request), "dataset"), (_repo_id("s-eval", request), "dataset")]
    publish_model(train_output, repos[0][0], eval_dir=eval_output)
    publish_model(train_output, repos[1][0], weights="adapter")
    publish_dataset(synthetic_dataset_dir, repos[2][0])
    publish_eval(eval_output, repos[3][0], model_repo=repos[0][0])

    needles = [FAKE_OPENAI_KEY, FAKE_HF_TOKEN, str(work), str(tiny_model_dir), str(synthetic_dataset_dir),
               str(Path.home()) + "/"]
    for repo_id, repo_type in repos:
        files = hub.files(repo_id, repo_type)
        assert len(files) > 3
        for name, data in files.items():
            for needle in needles:
                assert needle.encode() not in data, f"{needle!r} pushed in {repo_type}s/{repo_id}/{name}"
    assert HfApi().model_info(repos[0][0]).card_data.eval_results  # the scrubbed results still make the card


def test_text_files_are_scrubbed_and_binary_files_with_secrets_refused(hub, request, monkeypatch, train_output,
                                                                       eval_output, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)
    careless = tmp_path / "compare"
    shutil.copytree(eval_output, careless)
    (careless / "notes.txt").write_text(f"judge key {FAKE_OPENAI_KEY}, clips in {tmp_path}/clips/a.mp4\n")
    repo_id = _repo_id("scrubbed", request)
    publish_model(train_output, repo_id, eval_dir=careless)
    assert hub.files(repo_id, "model")["eval/notes.txt"] == b"judge key <redacted>, clips in a.mp4\n"

    weights = tmp_path / "train_out"
    shutil.copytree(train_output, weights)
    import torch
    torch.save({"api_key": FAKE_OPENAI_KEY}, weights / "merged" / "extra_state.pt")  # cannot be edited safely
    blocked = _repo_id("blocked", request)
    with pytest.raises(PublishError, match=r"extra_state\.pt: contains a credential"):
        publish_model(weights, blocked)
    assert ("model", blocked) not in hub.state.repos  # checked before anything is sent


def test_vocabulary_tokens_that_look_like_paths_are_left_alone(tiny_model_dir, tmp_path):
    """Qwen's real vocabulary has "/tmp" and "/root" tokens: scrubbing them would break the tokenizer."""
    from avlabel.hub.publish import Scrubber

    tokenizer = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"].update({"/tmp": 90001, "/root/": 90002, str(Path.home()) + "/x": 90003})
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "notes.md").write_text(f"cache in {Path.home()}/.cache/hf/model.bin, tokens like /tmp stay\n")
    scrub = Scrubber([tmp_path / "train_out"])
    assert scrub.file(tmp_path / "tokenizer.json") == tmp_path / "tokenizer.json"
    scrub.check("tokenizer.json", tmp_path / "tokenizer.json", "tokenizer.json")  # does not raise
    assert scrub.file(tmp_path / "notes.md") == b"cache in model.bin, tokens like /tmp stay\n"

