"""`avlabel publish`: push a trained model, a built dataset and an evaluation run to the Hub.

    avlabel publish --model_dir out/train --model_repo me/cosmos-av-labeller \\
        --eval_dir out/compare --dataset_dir out/dataset --dataset_repo me/dashcam-labels
    avlabel publish ... --dry_run --dry_run_dir out/publish     # write the repos' folders, push nothing

Each artefact goes to its own repo: the model (merged weights or the adapter alone, with a
model card whose `model-index` holds the evaluation results), the dataset folder as the builder
wrote it (its card included), and the evaluation run either into the model repo (`eval/`) or,
with `--eval_repo`, into a dataset repo of its own with an evaluation-run card.

What is pushed is first planned as a mapping {path in repo: file or bytes}. A dry run writes
exactly that mapping to a folder; a real push commits exactly that mapping (and deletes what
else the branch holds, so the repo mirrors the plan). Before either, the plan is scrubbed and
checked (`Scrubber`): credential-named keys are dropped from JSON/YAML files and values that
are machine paths become names; in every text file (cards, reports, JSONL) credentials known to
this process (secret-named environment variables, the stored Hub token) become `<redacted>` and
local paths become names. Files that cannot be edited (weights, pickles, images) are searched
instead: if one holds a credential or a local path, publishing stops and names the file.
Pickled training arguments (`training_args.bin`, which holds `hub_token`) are never published.

The token comes from `HF_TOKEN` or the stored login (`hf auth login`), the endpoint from `HF_ENDPOINT`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from avlabel.core.layouts import METADATA_NAME

NAME = "publish"
MODEL_SKIP = {  # what a weights folder may hold that is not part of a model repo
    "training_args.bin": "pickled training arguments (may hold a hub token)",
    "optimizer.pt": "optimizer state", "scheduler.pt": "scheduler state", "trainer_state.json": "checkpoint state",
    "README.md": "replaced by the generated model card",
}
EVAL_SUFFIXES = {".json", ".jsonl", ".html", ".png", ".svg", ".csv", ".md", ".txt"}
STRUCTURED_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml"}
TEXT_SUFFIXES = STRUCTURED_SUFFIXES | {".md", ".txt", ".html", ".csv", ".svg", ".jinja", ".py", ".toml", ".cfg"}
VOCABULARIES = {"tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model"}
SCAN_WINDOW = 1 << 20  # binary files: container metadata lives in the first and last MiB
# keys whose values are credentials (the tokenizer's "pad_token" and the like are not)
SECRET_KEY = re.compile(r"(^|_)(hub|hf|access|auth|api|bearer)_?(token|key)$|secret|passw|credential", re.IGNORECASE)
SECRET_ENV = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
ABSOLUTE_PATH = re.compile(r"^(~|[A-Za-z]:)?[/\\][^\s]*$")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

Content = Path | bytes


class PublishError(RuntimeError):
    """Publishing cannot go on; the message says which repo or file and what to do."""


@dataclass
class PublishArguments:
    model_dir: str | None = field(
        default=None,
        metadata={"help": "A training output folder (`avlabel train`): merged/ or adapter/, loss_curve.png, recipe.yaml, "
                  "train_results.json, trainer_state.json."},
    )
    model_repo: str | None = field(default=None, metadata={"help": "Hub repo for the model, e.g. `me/cosmos-av-labeller`."})
    weights: Literal["merged", "adapter"] = field(
        default="merged",
        metadata={"help": "Push merged/ (the whole model, loads with from_pretrained) or adapter/ (the PEFT adapter alone)."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base model when training read a local copy; goes into the card and "
                  "adapter_config.json. Default: the base model named in train_results.json, if it is a Hub id."},
    )
    license: str | None = field(
        default=None, metadata={"help": "License id for the model card. Default: the base model's license."}
    )
    dataset_dir: str | None = field(default=None, metadata={"help": "A dataset folder written by `avlabel build`."})
    dataset_repo: str | None = field(
        default=None,
        metadata={"help": "Hub dataset repo for --dataset_dir; also named in the model card as the training data."},
    )
    eval_dir: str | None = field(
        default=None,
        metadata={"help": "An `avlabel compare` output folder (results.json, report.html, charts). Goes into the model "
                  "repo under eval/, or to --eval_repo."},
    )
    eval_repo: str | None = field(
        default=None, metadata={"help": "Publish the evaluation run to this dataset repo of its own instead."}
    )
    eval_run: str | None = field(
        default=None,
        metadata={"help": "Which run in results.json is the published model (default: the last run compared)."},
    )
    private: bool = field(default=False, metadata={"help": "Create the repos as private."})
    revision: str = field(default="main", metadata={"help": "Branch to push to."})
    create_repo: bool = field(
        default=True, metadata={"help": "Create missing repos. With false, a repo that does not exist is an error."}
    )
    create_branch: bool = field(
        default=True,
        metadata={"help": "Create the --revision branch from main when it does not exist. With false, it is an error."},
    )
    commit_message: str | None = field(default=None, metadata={"help": "Commit message (default: says what is published)."})
    dry_run: bool = field(default=False, metadata={"help": "Write each repo's exact folder locally and push nothing."})
    dry_run_dir: str = field(
        default="publish_dry_run",
        metadata={"help": "Where --dry_run writes the folders: <dry_run_dir>/<models|datasets>/<repo id>/."},
    )


@dataclass
class Published:
    """What one publish did: where it went and which files the repo holds."""

    repo_id: str
    repo_type: str
    revision: str
    files: list[str]
    skipped: list[str] = field(default_factory=list)
    url: str | None = None  # the commit, after a push
    folder: Path | None = None  # the repo folder, after a dry run

    def describe(self) -> str:
        where = f"wrote {self.folder}" if self.folder else f"pushed {self.url}"
        return f"{self.repo_type} {self.repo_id}@{self.revision}: {len(self.files)} files, {where}"


# ----------------------------------------------------------------------------- scrubbing


def secret_values() -> set[str]:
    """Credentials this process can see: secret-named environment variables and the stored Hub token."""
    from huggingface_hub import get_token

    values = {
        value for name, value in os.environ.items()
        if SECRET_ENV.search(name) and len(value) >= 8 and not re.fullmatch(r"[\d.]+|true|false|none", value, re.IGNORECASE)
    }
    token = get_token()
    if token:
        values.add(token)
    return values


def _machine_paths(sources: list[Path]) -> tuple[set[str], set[str]]:
    """Local paths that must not show up in a pushed file.

    Returns (specific, general): the sources and their parents, which name this machine's
    folders exactly; and home, cwd and temp, general enough that only what lies *under* them
    (a trailing separator) counts, since "/tmp" and "/root" are ordinary tokens of a vocabulary.
    """
    specific = set()
    for source in sources:
        resolved = source.resolve()
        specific.add(str(resolved))
        if len(resolved.parent.parts) > 2:  # not "/" or "/tmp": too short to be specific
            specific.add(str(resolved.parent))
    general = {str(place.resolve()) + os.sep for place in (Path.home(), Path.cwd(), Path(tempfile.gettempdir()))
               if len(place.resolve().parts) > 1}
    return specific, general


class Scrubber:
    """Takes credentials and machine paths out of a plan's text files, then checks every file.

    JSON/YAML: keys named like credentials are dropped and values that are absolute paths become
    names (or the Hub id that replaces a local base model). Every text file: credentials from
    the environment become `<redacted>` and paths in the local places of `_machine_paths` become
    names. Binary files cannot be edited, so `check` refuses them if they hold either. Tokenizer
    vocabularies are left as they are (their tokens are not paths) and checked for credentials
    and the specific paths only.
    """

    def __init__(self, sources: list[Path], replacements: dict[str, str] | None = None):
        self.secrets = sorted(secret_values(), key=len, reverse=True)
        self.specific, self.general = _machine_paths(sources)
        self.replacements = {str(Path(k).expanduser().resolve()): v for k, v in (replacements or {}).items()}
        tail = r"[^\s\"'<>`|)\]]"  # characters that may follow in a path
        # not inside a URL or a longer name; a specific folder alone or with a path under it,
        # a general place only with a path under it
        specific = "|".join(re.escape(p) + rf"(?:/{tail}*)?(?![\w.-])" for p in sorted(self.specific, key=len, reverse=True))
        general = "|".join(re.escape(p) + rf"{tail}+" for p in sorted(self.general, key=len, reverse=True))
        self._local_path = re.compile(rf"(?<![\w.-])(?:{specific}|{general})")

    def _name(self, path: str) -> str:
        resolved = str(Path(path).expanduser().resolve())
        return self.replacements.get(resolved, Path(path.rstrip("/\\")).name)

    def text(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<redacted>")
        return self._local_path.sub(lambda match: self._name(match.group(0)), text)

    def value(self, value):
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items() if not (isinstance(k, str) and SECRET_KEY.search(k))}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if not isinstance(value, str):
            return value
        if ABSOLUTE_PATH.match(value) and len([p for p in re.split(r"[/\\]", value) if p]) >= 2:
            return self._name(value)
        return self.text(value)

    def file(self, path: Path) -> Content:
        """The file as it should be pushed: the path itself, or scrubbed bytes when something changed."""
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES or path.name in VOCABULARIES:
            return path
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return path  # not text after all: `check` looks at its bytes
        out = text
        try:
            if suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
                cleaned = [self.value(r) for r in records]
                if cleaned != records:
                    out = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cleaned)
            elif suffix == ".json":
                records = json.loads(text)
                cleaned = self.value(records)
                if cleaned != records:
                    out = json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n"
            elif suffix in (".yaml", ".yml"):
                records = yaml.safe_load(text)
                cleaned = self.value(records)
                if cleaned != records:
                    out = yaml.safe_dump(cleaned, sort_keys=False, allow_unicode=True)
        except (json.JSONDecodeError, yaml.YAMLError):
            pass  # malformed: scrubbed as plain text below
        out = self.text(out)
        return path if out == text else out.encode("utf-8")

    def check(self, name: str, content: Content, source: str) -> None:
        """Stop when a credential or a machine path is still in the file (text: all of it; binary: its ends)."""
        if isinstance(content, bytes):
            data = content
        elif content.suffix.lower() in TEXT_SUFFIXES or content.stat().st_size <= 2 * SCAN_WINDOW:
            data = content.read_bytes()
        else:
            with content.open("rb") as handle:
                head = handle.read(SCAN_WINDOW)
                handle.seek(max(content.stat().st_size - SCAN_WINDOW, SCAN_WINDOW))
                data = head + handle.read()
        for secret in self.secrets:
            if secret.encode() in data:
                raise PublishError(f"{source}: contains a credential from this environment (would be pushed as {name}); "
                                   "remove it from the file before publishing")
        vocabulary = Path(name).name in VOCABULARIES
        for path in sorted(self.specific) + ([] if vocabulary else sorted(self.general)):
            if path.encode() in data:
                raise PublishError(f"{source}: contains the local path {path!r} (would be pushed as {name}); "
                                   "remove it from the file before publishing")


# ----------------------------------------------------------------------------- plans


@dataclass
class Plan:
    repo_id: str
    repo_type: str
    files: dict[str, Content] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # path in repo -> where it came from (for messages)
    skipped: list[str] = field(default_factory=list)

    def add(self, name: str, content: Content, source: str | None = None) -> None:
        self.files[name] = content
        self.sources[name] = source or (str(content) if isinstance(content, Path) else f"generated {name}")


def _visible_files(folder: Path):
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            yield relative.as_posix(), path


def _folder(path: str | Path | None, what: str) -> Path:
    if not path:
        raise PublishError(f"no {what} folder given")
    folder = Path(path)
    if not folder.is_dir():
        raise PublishError(f"{folder}: not a folder ({what})")
    return folder


def _hub_id(value: str | None) -> str | None:
    """`value` when it names a Hub repo rather than a local folder."""
    if value and HUB_ID.match(value) and not Path(value).expanduser().exists():
        return value
    return None


def _is_test_model(*config_dirs: Path | None) -> bool:
    """The tiny model writes `test_model_note` into its config.json (train/tiny_model.py)."""
    for folder in config_dirs:
        config = folder / "config.json" if folder else None
        if config and config.is_file():
            try:
                if "test_model_note" in json.loads(config.read_text(encoding="utf-8")):
                    return True
            except json.JSONDecodeError:
                continue
    return False


def _eval_files(plan: Plan, eval_dir: Path, prefix: str, scrub: Scrubber) -> tuple[dict, list[str], str | None]:
    """Add a compare folder's files under `prefix`; returns results.json, the charts to embed and the report."""
    from .cards import check_results, read_json

    results_path = eval_dir / "results.json"
    results = check_results(scrub.value(read_json(results_path, "the results.json of `avlabel compare`")), str(results_path))
    files = list(_visible_files(eval_dir))
    for name, path in files:
        if path.suffix.lower() not in EVAL_SUFFIXES or (not prefix and name == "README.md"):
            plan.skipped.append(f"{path} (not part of an evaluation run's files)")
            continue
        plan.add(prefix + name, scrub.file(path), str(path))
    artifacts = results.get("artifacts") or {}
    # compare lists its charts headline first; without that list, every picture in the folder
    listed = artifacts.get("charts") or [n for n, _ in files if n.endswith((".png", ".svg"))]
    charts = [prefix + n for n in listed if prefix + n in plan.files]
    report = prefix + (artifacts.get("report_html") or "report.html")
    return results, charts, report if report in plan.files else None


def plan_model(output_dir: str | Path, repo_id: str, *, weights: str = "merged", base_model: str | None = None,
               license: str | None = None, dataset_repo: str | None = None, eval_dir: str | Path | None = None,
               eval_run: str | None = None) -> tuple[Plan, Scrubber]:
    from .cards import model_card, read_json

    output_dir = _folder(output_dir, "training output")
    weights_dir = output_dir / weights
    if not weights_dir.is_dir():
        other = "adapter" if weights == "merged" else "merged"
        hint = f"; it has {other}/, so pass --weights {other}" if (output_dir / other).is_dir() else ""
        raise PublishError(f"{output_dir}: no {weights}/ folder (expected a training output of `avlabel train`){hint}")
    train = read_json(output_dir / "train_results.json", "the train_results.json of `avlabel train`")
    trained_from = train.get("base_model")
    base_model_id = base_model or _hub_id(trained_from)
    local_base = Path(trained_from).expanduser() if trained_from and Path(trained_from).expanduser().is_dir() else None
    dataset_id = dataset_repo or _hub_id(train.get("dataset"))
    replacements = {}
    if local_base and base_model_id:
        replacements[str(local_base)] = base_model_id  # adapter_config.json then names the Hub base model
    if train.get("dataset") and dataset_id and Path(train["dataset"]).expanduser().exists():
        replacements[train["dataset"]] = dataset_id
    sources = [output_dir] + ([Path(eval_dir)] if eval_dir else []) + ([local_base] if local_base else [])
    scrub = Scrubber(sources, replacements)
    train = scrub.value(train)

    plan = Plan(repo_id, "model")
    for name, path in _visible_files(weights_dir):
        reason = MODEL_SKIP.get(Path(name).name) or ("training state" if re.match(r"rng_state.*\.pth$", Path(name).name) else None)
        if reason:
            plan.skipped.append(f"{path} ({reason})")
            continue
        plan.add(name, scrub.file(path), str(path))
    if not any(n.endswith((".safetensors", ".bin")) for n in plan.files):
        raise PublishError(f"{weights_dir}: holds no weights (*.safetensors or *.bin)")
    for name in ("loss_curve.png", "recipe.yaml", "train_results.json", "trainer_state.json"):
        if (output_dir / name).is_file():
            plan.add(name, scrub.file(output_dir / name), str(output_dir / name))
        else:
            plan.skipped.append(f"{output_dir / name} (missing: the card goes without it)")
    recipe = plan.files.get("recipe.yaml")
    recipe_text = (recipe.read_text(encoding="utf-8") if isinstance(recipe, Path) else recipe.decode()) if recipe else None

    results = report = None
    charts = []
    if eval_dir:
        from .cards import pick_run

        results, charts, report = _eval_files(plan, _folder(eval_dir, "evaluation run"), "eval/", scrub)
        eval_run = pick_run(results, eval_run, str(Path(eval_dir) / "results.json"))

    card = model_card(
        repo_id=repo_id, train=train, weights=weights, base_model_id=base_model_id,
        base_model_name=Path(str(trained_from or "base model")).name, dataset_id=dataset_id,
        dataset_name=Path(str(train.get("dataset") or "dataset")).name,
        test_model=_is_test_model(weights_dir, local_base), recipe=recipe_text,
        loss_curve="loss_curve.png" if "loss_curve.png" in plan.files else None, license=license,
        results=results, eval_run=eval_run, charts=charts, report=report,
        processor_in_repo=any(n in plan.files for n in ("tokenizer_config.json", "processor_config.json")),
    )
    plan.add("README.md", str(card).encode("utf-8"))
    return plan, scrub


def plan_dataset(dataset_dir: str | Path, repo_id: str) -> tuple[Plan, Scrubber]:
    dataset_dir = _folder(dataset_dir, "dataset")
    if not (dataset_dir / "README.md").is_file() or not list(dataset_dir.glob(f"*/{METADATA_NAME}")):
        raise PublishError(f"{dataset_dir}: not a dataset folder of `avlabel build` "
                           f"(expected README.md and <split>/{METADATA_NAME})")
    scrub = Scrubber([dataset_dir])
    plan = Plan(repo_id, "dataset")
    for name, path in _visible_files(dataset_dir):
        plan.add(name, scrub.file(path), str(path))
    return plan, scrub


def plan_eval(eval_dir: str | Path, repo_id: str, *, model_repo: str | None = None,
              eval_run: str | None = None) -> tuple[Plan, Scrubber]:
    from .cards import eval_card, pick_run

    eval_dir = _folder(eval_dir, "evaluation run")
    scrub = Scrubber([eval_dir])
    plan = Plan(repo_id, "dataset")
    results, charts, report = _eval_files(plan, eval_dir, "", scrub)
    eval_run = pick_run(results, eval_run, str(eval_dir / "results.json")) if model_repo else None
    described = {"results.json": "per-field results of every run with 95% intervals, judge and trust checks",
                 "report.html": "the full report: charts, tables, judge trust, clips where the runs disagree",
                 "report.md": "the report's tables in Markdown",
                 "per_clip.jsonl": "every clip's answers and scores per field and run (with the judge's reasons)"}
    files = [(name, described.get(name, "chart" if name.endswith((".png", ".svg")) else "evaluation output"))
             for name in sorted(plan.files)]
    card = eval_card(repo_id=repo_id, results=results, eval_run=eval_run, files=files, model_repo=model_repo,
                     charts=charts, report=report)
    plan.add("README.md", str(card).encode("utf-8"))
    return plan, scrub


# ----------------------------------------------------------------------------- writing and pushing


def _checked(plan: Plan, scrub: Scrubber) -> Plan:
    for name, content in plan.files.items():
        scrub.check(name, content, plan.sources[name])
    return plan


def write_folder(plan: Plan, root: str | Path) -> Path:
    """Write the plan to `<root>/<models|datasets>/<repo id>/`, exactly: stale files there are an error."""
    folder = Path(root) / f"{plan.repo_type}s" / plan.repo_id
    if folder.exists():
        stale = sorted(name for name, _ in _visible_files(folder) if name not in plan.files)
        if stale:
            raise PublishError(f"{folder}: already holds files this publish would not write ({', '.join(stale[:5])}); "
                               "remove the folder or choose another --dry_run_dir")
    for name, content in plan.files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            try:
                os.link(content, target)  # weights can be gigabytes: link when the file system allows
            except OSError:
                shutil.copyfile(content, target)
    return folder


def push(plan: Plan, *, private: bool = False, revision: str = "main", create_repo: bool = True,
         create_branch: bool = True, commit_message: str | None = None) -> str:
    """Commit the plan to the Hub as the branch's whole content; returns the commit URL."""
    from huggingface_hub import (
        CommitOperationAdd,
        CommitOperationDelete,
        HfApi,
        get_token,
    )
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if get_token() is None:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry_run)")
    api = HfApi()
    where = f"{plan.repo_type} repo '{plan.repo_id}' on {api.endpoint}"
    try:
        if create_repo:
            api.create_repo(plan.repo_id, repo_type=plan.repo_type, private=private, exist_ok=True)
        if private and not api.repo_info(plan.repo_id, repo_type=plan.repo_type).private:
            # exist_ok leaves an existing repo as it was: say so rather than push "private" files publicly unnoticed
            print(f"warning: {where} already exists and is public; --private applies to new repos only", file=sys.stderr)
        if revision != "main" and create_branch:
            api.create_branch(plan.repo_id, repo_type=plan.repo_type, branch=revision, exist_ok=True)
        remote = set(api.list_repo_files(plan.repo_id, repo_type=plan.repo_type, revision=revision))
        operations = [CommitOperationAdd(name, content if isinstance(content, bytes) else str(content))
                      for name, content in plan.files.items()]
        operations += [CommitOperationDelete(name) for name in sorted(remote - set(plan.files) - {".gitattributes"})]
        info = api.create_commit(plan.repo_id, operations, repo_type=plan.repo_type, revision=revision,
                                 commit_message=commit_message or f"Publish {plan.repo_type} with avlabel")
    except RepositoryNotFoundError:
        fix = ("create it on the Hub first, or let publish create it (--create_repo true, the default)" if not create_repo
               else "check the repo id and that the token may write to it")
        raise PublishError(f"{where} does not exist (or the token cannot see it): {fix}") from None
    except RevisionNotFoundError:
        fix = ("name an existing branch, or let publish create it from main (--create_branch true, the default)"
               if not create_branch else "check the branch name")
        raise PublishError(f"{where} has no branch '{revision}': {fix}") from None
    except HfHubHTTPError as err:
        raise PublishError(f"{where}: the Hub refused the push: {err}") from None
    return info.commit_url


def _run(plan: Plan, scrub: Scrubber, revision: str, dry_run_dir, **push_args) -> Published:
    _checked(plan, scrub)
    published = Published(plan.repo_id, plan.repo_type, revision, sorted(plan.files), plan.skipped)
    if dry_run_dir is not None:
        published.folder = write_folder(plan, dry_run_dir)
    else:
        published.url = push(plan, revision=revision, **push_args)
    return published


def publish_model(output_dir: str | Path, repo_id: str, *, weights: str = "merged", base_model: str | None = None,
                  license: str | None = None, dataset_repo: str | None = None, eval_dir: str | Path | None = None,
                  eval_run: str | None = None, private: bool = False, revision: str = "main", create_repo: bool = True,
                  create_branch: bool = True, commit_message: str | None = None,
                  dry_run_dir: str | Path | None = None) -> Published:
    """Publish a training output (and optionally its evaluation run under eval/); `dry_run_dir` pushes nothing."""
    plan, scrub = plan_model(output_dir, repo_id, weights=weights, base_model=base_model, license=license,
                             dataset_repo=dataset_repo, eval_dir=eval_dir, eval_run=eval_run)
    return _run(plan, scrub, revision, dry_run_dir, private=private, create_repo=create_repo,
                create_branch=create_branch, commit_message=commit_message)


def publish_dataset(dataset_dir: str | Path, repo_id: str, *, private: bool = False, revision: str = "main",
                    create_repo: bool = True, create_branch: bool = True, commit_message: str | None = None,
                    dry_run_dir: str | Path | None = None) -> Published:
    """Publish a dataset folder of `avlabel build` as it is (its card included)."""
    plan, scrub = plan_dataset(dataset_dir, repo_id)
    return _run(plan, scrub, revision, dry_run_dir, private=private, create_repo=create_repo,
                create_branch=create_branch, commit_message=commit_message)


def publish_eval(eval_dir: str | Path, repo_id: str, *, model_repo: str | None = None, eval_run: str | None = None,
                 private: bool = False, revision: str = "main", create_repo: bool = True, create_branch: bool = True,
                 commit_message: str | None = None, dry_run_dir: str | Path | None = None) -> Published:
    """Publish an `avlabel compare` folder to a dataset repo of its own, with an evaluation-run card."""
    plan, scrub = plan_eval(eval_dir, repo_id, model_repo=model_repo, eval_run=eval_run)
    return _run(plan, scrub, revision, dry_run_dir, private=private, create_repo=create_repo,
                create_branch=create_branch, commit_message=commit_message)


# ----------------------------------------------------------------------------- CLI


def make_parser(subparsers=None):
    from trl import TrlParser

    if subparsers is not None:
        return subparsers.add_parser(NAME, help="Push a model, a dataset and an evaluation run to the Hub, with cards",
                                     dataclass_types=[PublishArguments])
    return TrlParser(dataclass_types=[PublishArguments])


def publish(args: PublishArguments) -> list[Published]:
    if not (args.model_dir or args.dataset_dir or args.eval_dir):
        raise PublishError("nothing to publish: give --model_dir, --dataset_dir and/or --eval_dir")
    for folder, repo, option in ((args.model_dir, args.model_repo, "model"), (args.dataset_dir, args.dataset_repo, "dataset")):
        if folder and not repo:
            raise PublishError(f"--{option}_dir needs --{option}_repo (the Hub repo to publish it to)")
    if args.eval_dir and not (args.eval_repo or args.model_dir):
        raise PublishError("--eval_dir needs --eval_repo, or --model_dir to publish it with the model")
    common = dict(private=args.private, revision=args.revision, create_repo=args.create_repo,
                  create_branch=args.create_branch, commit_message=args.commit_message,
                  dry_run_dir=args.dry_run_dir if args.dry_run else None)
    done = []
    if args.dataset_dir:
        done.append(publish_dataset(args.dataset_dir, args.dataset_repo, **common))
    if args.model_dir:
        done.append(publish_model(args.model_dir, args.model_repo, weights=args.weights, base_model=args.base_model,
                                  license=args.license, dataset_repo=args.dataset_repo,
                                  eval_dir=None if args.eval_repo else args.eval_dir, eval_run=args.eval_run, **common))
    if args.eval_dir and args.eval_repo:
        done.append(publish_eval(args.eval_dir, args.eval_repo, model_repo=args.model_repo, eval_run=args.eval_run, **common))
    return done


def main(args: PublishArguments) -> list[Published]:
    from .cards import CardInputError

    try:
        done = publish(args)
    except (PublishError, CardInputError) as err:
        raise SystemExit(f"publish: {err}") from None
    for published in done:
        print(published.describe())
        for skipped in published.skipped:
            print(f"  not published: {skipped}")
    if args.dry_run:
        print("dry run: nothing was pushed", file=sys.stderr)
    return done


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
