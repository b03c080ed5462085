"""`avlabel publish`: push a trained model, a built dataset, an evaluation run and the metric to the Hub.

    avlabel publish --model_dir out/train --model_repo me/cosmos-av-labeller \\
        --eval_dir out/compare --dataset_dir out/dataset --dataset_repo me/dashcam-labels \\
        --metric_repo me/av_label_metric
    avlabel publish ... --dry_run --dry_run_dir out/publish     # write the repos' folders, push nothing

Each artefact goes to its own repo: the model (merged weights or the adapter alone, with a
model card whose `model-index` holds the evaluation results), the dataset with its card, the
evaluation run either into the model repo (`eval/`) or, with `--eval_repo`, into a dataset repo
of its own with an evaluation-run card, and the `evaluate` metric (eval/av_label_metric) into a
Space, where `evaluate.load("<namespace>/<name>")` finds it.

A dataset goes up in one of two layouts that `load_dataset("<namespace>/<name>")` reads to the
same rows and `Video` column (README.md, "Publish", says when to use which):
  folders  `<split>/NNN/<clip>.mp4` in folders of at most --clips_per_folder clips, beside
           `<split>/metadata.parquet` (its `file_name` column reads `NNN/<clip>.mp4`)
  parquet  `data/<split>-NNNNN-of-NNNNN.parquet` shards with the clips' bytes inside, as
           `Dataset.push_to_hub` writes them
`auto` takes folders while the repo stays under the Hub's 100,000 files.

What is pushed is first planned as a mapping {path in repo: file or bytes}. A dry run writes
exactly that mapping to a folder; a real push commits exactly that mapping (and deletes what
else the branch holds, so the repo mirrors the plan), in commits of at most --files_per_commit
files, the files that describe the others (cards, metadata) last. One listing of the branch
first finds the files it already holds as they are: those are neither committed nor uploaded
again, so a push that was interrupted, rerun, sends only what is missing.

Before either, the plan is scrubbed and checked (`Scrubber`): credential-named keys are dropped
from JSON/YAML files and values that are machine paths become names; in every text file (cards,
reports, JSONL) credentials known to this process (secret-named environment variables, the
stored Hub token) become `<redacted>` and local paths become names. Files that cannot be edited
(weights, pickles, images, clips) are searched instead: if one holds a credential or a local
path, publishing stops and names the file. Pickled training arguments (`training_args.bin`,
which holds `hub_token`) are never published.

The token comes from `HF_TOKEN` or the stored login (`hf auth login`), the endpoint from `HF_ENDPOINT`.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import yaml

from avlabel.core.errors import UsageError
from avlabel.core.files import link_or_copy
from avlabel.core.layouts import METADATA_NAME, is_hub_id
from avlabel.eval.metric_bundle import METRIC_DIR

NAME = "publish"
DatasetLayout = Literal["auto", "folders", "parquet"]  # the type of --dataset_layout
DATASET_LAYOUTS: tuple[DatasetLayout, ...] = get_args(DatasetLayout)
CLIPS_PER_FOLDER = 1_000  # well under the Hub's 10,000 entries per folder, and quick to browse
MAX_FOLDER_ENTRIES = 10_000  # the Hub refuses a commit that leaves a folder with more
MAX_REPO_FILES = 100_000  # the Hub's bound on files in one repository
# huggingface_hub 2 has no upload_large_folder, and its upload_folder splits a large folder
# into several commits only on its Xet path: with LFS it is one commit. So publish bounds
# its commits itself; 500 is between the Hub's advice (under 100) and the largest batch
# huggingface_hub's own multi-commit upload makes (1,000).
FILES_PER_COMMIT = 500
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

Content = Path | bytes


class PublishError(ValueError):
    """Publishing cannot go on; the message says which repo or file and what to do (exit 1; a wrong
    argument is a UsageError, exit 2)."""


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
    dataset_layout: DatasetLayout = field(
        default="auto",
        metadata={"help": "folders: each clip an .mp4 in <split>/NNN/ folders of at most --clips_per_folder, beside "
                  "<split>/metadata.parquet; parquet: data/<split>-NNNNN-of-NNNNN.parquet shards with the clips "
                  "embedded, as Dataset.push_to_hub writes them (past 100,000 clips a repo cannot hold one file "
                  "per clip); auto: folders while the repo stays under 100,000 files, else parquet."},
    )
    clips_per_folder: int = field(
        default=CLIPS_PER_FOLDER,
        metadata={"help": f"Clips per folder in the folders layout (the Hub allows {MAX_FOLDER_ENTRIES:,} entries per folder)."},
    )
    files_per_commit: int = field(
        default=FILES_PER_COMMIT,
        metadata={"help": "Files per commit: a large push goes in several commits, so that, interrupted and rerun, "
                  "it sends only what is missing."},
    )
    metric_repo: str | None = field(
        default=None,
        metadata={"help": "Push the evaluate metric (eval/av_label_metric) to this Space, e.g. `me/av_label_metric`, "
                  "so that `evaluate.load(\"me/av_label_metric\")` loads it. The name must be a Python identifier."},
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
        metadata={"help": "Where --dry_run writes the folders: <dry_run_dir>/<models|datasets|spaces>/<repo id>/."},
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
    up_to_date: bool = False  # the push found every file there already and made no commit
    folder: Path | None = None  # the repo folder, after a dry run

    def describe(self) -> str:
        where = (f"wrote {self.folder}" if self.folder else
                 f"up to date, nothing pushed: {self.url}" if self.up_to_date else f"pushed {self.url}")
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
    return value if value and is_hub_id(value) else None


def _is_test_model(*config_dirs: Path | None) -> bool:
    """The tiny model writes `test_model_note` into its config.json (avlabel/demo/tiny_model.py)."""
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


def _metadata_tables(dataset_dir: Path) -> dict:
    """{split: its metadata as a pyarrow Table}."""
    import pyarrow.parquet as pq

    return {path.parent.name: pq.read_table(path) for path in sorted(dataset_dir.glob(f"*/{METADATA_NAME}"))}


def _add_clip_folders(plan: Plan, dataset_dir: Path, split: str, table, clips_per_folder: int) -> None:
    """A split as `<split>/NNN/<clip>.mp4` folders of at most `clips_per_folder` clips and its metadata.

    The metadata's `file_name` becomes `NNN/<clip>.mp4`: videofolder resolves it against the
    folder of the metadata file, and the card's `<split>/**` pattern takes the subfolders in.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = table.column("file_name").to_pylist()
    width = max(3, len(str((len(names) - 1) // clips_per_folder)))
    sharded = []
    for index, name in enumerate(names):
        source = dataset_dir / split / name
        if not source.is_file():
            raise PublishError(f"{dataset_dir / split / METADATA_NAME}: row {index} names {name!r}, which is not in "
                               f"{dataset_dir / split}; rebuild the dataset with `avlabel build`")
        sharded.append(f"{index // clips_per_folder:0{width}d}/{Path(name).name}")
        plan.add(f"{split}/{sharded[-1]}", source)  # a clip: binary, searched by `Scrubber.check`, not edited
    table = table.set_column(table.schema.get_field_index("file_name"), "file_name", pa.array(sharded, pa.string()))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)  # the schema's metadata (the declared features) goes along
    plan.add(f"{split}/{METADATA_NAME}", buffer.getvalue(), str(dataset_dir / split / METADATA_NAME))
    listed = {dataset_dir / split / name for name in names} | {dataset_dir / split / METADATA_NAME}
    plan.skipped += [f"{path} (not in {split}/{METADATA_NAME})" for _, path in _visible_files(dataset_dir / split)
                     if path not in listed]


def _add_parquet_shards(plan: Plan, dataset_dir: Path, tables: dict, staging: Path) -> None:
    """Every split as `data/<split>-NNNNN-of-NNNNN.parquet` shards holding the clips' bytes: what
    `Dataset.push_to_hub` writes (same shard names, size bound, writer batch size and
    `embed_table_storage`), written here so that the push goes through the same scrubbed plan,
    bounded commits and dry run as every other file."""
    import datasets
    from datasets.arrow_writer import get_writer_batch_size_from_features
    from datasets.table import embed_table_storage
    from datasets.utils.py_utils import convert_file_size_to_int

    loaded = datasets.load_dataset(str(dataset_dir))  # the card's configs and features, as a user loads it
    max_shard = convert_file_size_to_int(datasets.config.MAX_SHARD_SIZE)
    for split in tables:
        dataset = loaded[split]
        names = tables[split].column("file_name").to_pylist()
        clip_bytes = sum((dataset_dir / split / name).stat().st_size for name in names)
        num_shards = min(len(dataset), clip_bytes // max_shard + 1)
        batch_size = get_writer_batch_size_from_features(dataset.features)
        for index in range(num_shards):
            shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True).with_format("arrow")
            shard = shard.map(embed_table_storage, batched=True, batch_size=batch_size, keep_in_memory=True)
            name = f"data/{split}-{index:05d}-of-{num_shards:05d}.parquet"
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shard.with_format(None).to_parquet(staging / name, batch_size=batch_size)
            plan.add(name, staging / name, f"{dataset_dir / split} (clips embedded as in Dataset.push_to_hub)")


def _parquet_card(readme: str, splits: list[str]) -> bytes:
    """The builder's card with its configs pointing at the Parquet shards instead of the clip folders."""
    from huggingface_hub import DatasetCard

    card = DatasetCard(readme)
    configs = card.data.get("configs") or [{"config_name": "default"}]
    for config in configs:
        config["data_files"] = [{"split": split, "path": f"data/{split}-*"} for split in splits]
    card.data.configs = configs
    return str(card).encode("utf-8")


def plan_dataset(dataset_dir: str | Path, repo_id: str, *, layout: str = "auto",
                 clips_per_folder: int = CLIPS_PER_FOLDER, staging: Path | None = None) -> tuple[Plan, Scrubber]:
    """The repo of a dataset folder of `avlabel build`, in one of two layouts (see DATASET_LAYOUTS).

    `staging` is a folder for the Parquet shards the `parquet` layout writes.
    """
    dataset_dir = _folder(dataset_dir, "dataset")
    tables = _metadata_tables(dataset_dir)
    if not (dataset_dir / "README.md").is_file() or not tables:
        raise PublishError(f"{dataset_dir}: not a dataset folder of `avlabel build` "
                           f"(expected README.md and <split>/{METADATA_NAME})")
    if not 0 < clips_per_folder <= MAX_FOLDER_ENTRIES:
        raise UsageError(f"--clips_per_folder {clips_per_folder}: must be 1 to {MAX_FOLDER_ENTRIES:,} "
                           "(the Hub refuses folders with more entries)")
    scrub = Scrubber([dataset_dir])
    plan = Plan(repo_id, "dataset")
    for name, path in _visible_files(dataset_dir):
        if name.split("/")[0] not in tables:  # the card, its plot, the quarantine report
            plan.add(name, scrub.file(path), str(path))
    clips = sum(table.num_rows for table in tables.values())
    # one file per clip, the metadata files, the files above and .gitattributes
    folder_files = clips + len(tables) + len(plan.files) + 1
    if layout == "auto":
        layout = "folders" if folder_files < MAX_REPO_FILES else "parquet"
    if layout == "folders":
        if folder_files >= MAX_REPO_FILES:
            raise PublishError(f"{dataset_dir}: {clips:,} clips, one file each, do not fit a Hub repository (under "
                               f"{MAX_REPO_FILES:,} files): use --dataset_layout parquet")
        for split, table in tables.items():
            _add_clip_folders(plan, dataset_dir, split, table, clips_per_folder)
    elif layout == "parquet":
        if staging is None:
            raise PublishError("the parquet layout needs a staging folder for its shards")
        _add_parquet_shards(plan, dataset_dir, tables, staging)
        card = plan.files["README.md"]
        text = card.read_text(encoding="utf-8") if isinstance(card, Path) else card.decode("utf-8")
        plan.add("README.md", _parquet_card(text, list(tables)), str(dataset_dir / "README.md"))
    else:
        raise UsageError(f"--dataset_layout {layout}: must be one of {', '.join(DATASET_LAYOUTS)}")
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


METRIC_APP = """import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load("{repo_id}")
launch_gradio_widget(module)
"""


def plan_metric(repo_id: str, metric_dir: str | Path | None = None) -> tuple[Plan, Scrubber]:
    """The Space `evaluate.load("<namespace>/<name>")` reads: `<name>.py` (the metric's module,
    renamed after the repo, since evaluate fetches `<name>.py`) and the files beside it, with a
    card that makes it a Space and the widget app that `evaluate-cli create` would add."""
    from huggingface_hub import SpaceCard

    folder = _folder(metric_dir or METRIC_DIR, "evaluate metric")
    name = repo_id.split("/")[-1]
    if not name.isidentifier():
        raise UsageError(f"--metric_repo {repo_id}: evaluate imports the metric as a module named after the repo, "
                           f"so the name must be a Python identifier, e.g. {repo_id.split('/')[0]}/av_label_metric")
    module = folder / f"{folder.name}.py"
    if not module.is_file():
        raise PublishError(f"{folder}: no {module.name} (an evaluate metric folder <name>/ holds <name>.py)")
    scrub = Scrubber([folder])
    plan = Plan(repo_id, "space")
    for relative, path in _visible_files(folder):
        if "__pycache__" not in path.parts:
            plan.add(f"{name}.py" if path == module else relative, scrub.file(path), str(path))
    readme = plan.files.get("README.md", b"")
    card = SpaceCard(readme.read_text(encoding="utf-8") if isinstance(readme, Path) else readme.decode("utf-8"))
    card.data.sdk = card.data.get("sdk") or "gradio"
    card.data.app_file = card.data.get("app_file") or "app.py"
    tags = list(card.data.get("tags") or [])
    card.data.tags = tags + [tag for tag in ("evaluate", "metric") if tag not in tags]
    # the folder's card loads the metric from the folder; the Space's visitors load it by its repo id
    card.text = re.sub(r'evaluate\.load\("[^"]*"\)([ \t]*#[^\n]*)?', f'evaluate.load("{repo_id}")', card.text)
    plan.add("README.md", str(card).encode("utf-8"), str(folder / "README.md"))
    if "app.py" not in plan.files:
        plan.add("app.py", METRIC_APP.format(repo_id=repo_id).encode())
    requirements = plan.files.get("requirements.txt", b"")
    lines = (requirements.read_text(encoding="utf-8") if isinstance(requirements, Path)
             else requirements.decode()).splitlines()
    missing = [pip for pip in _metric_requirements(module) if _project_name(pip) not in map(_project_name, lines)]
    if missing:
        plan.add("requirements.txt", "\n".join([*missing, *lines]).encode() + b"\n", str(folder / "requirements.txt"))
    return plan, scrub


def _metric_requirements(module: Path) -> list[str]:
    """What the Space must install: evaluate for its widget, and the pip names of the packages the metric's
    import lines name, as `evaluate.load` reads them (it refuses to run the metric without them)."""
    from evaluate.loading import get_imports

    return ["evaluate", *(pip for kind, name, pip, _ in get_imports(str(module))
                          if kind == "library" and name not in sys.stdlib_module_names and name != "evaluate")]


def _project_name(requirement: str) -> str:
    """A requirement line's project name, normalised as pip compares them ('' for comments and options)."""
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", found.group(1)).lower() if found else ""


# ----------------------------------------------------------------------------- writing and pushing


def _checked(plan: Plan, scrub: Scrubber) -> Plan:
    for name, content in plan.files.items():
        scrub.check(name, content, plan.sources[name])
    return plan


COPY_BELOW_BYTES = 2**20


def write_folder(plan: Plan, root: str | Path) -> Path:
    """Write the plan to `<root>/<models|datasets|spaces>/<repo id>/`, exactly: stale files there are an error."""
    folder = Path(root) / f"{plan.repo_type}s" / plan.repo_id
    if folder.exists():
        stale = sorted(name for name, _ in _visible_files(folder) if name not in plan.files)
        if stale:
            raise PublishError(f"{folder}: already holds files this publish would not write ({', '.join(stale[:5])}); "
                               "remove the folder or choose another --dry_run_dir")
    for name, content in plan.files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.unlink(missing_ok=True)  # an earlier run's link: write a new file, not through it
            target.write_bytes(content)
        else:
            # weights and clips are linked (gigabytes); a small file is copied, since a dry run is there to be read
            # and edited, and an edit through a link would change its source (the installed metric's code, say)
            link_or_copy(content, target, copy=Path(content).stat().st_size < COPY_BELOW_BYTES)
    return folder


def _describes_others(name: str) -> bool:
    """Cards and metadata: committed last, so that the repo names no row before its clip is there."""
    return Path(name).name in ("README.md", METADATA_NAME)


def _unchanged(operation, remote: dict) -> bool:
    """Whether the branch already holds this file as it is: the library checks that too, a commit at a
    time; one listing up front spares a rerun the upload round trips of every batch already committed."""
    from huggingface_hub.utils.sha import git_hash

    entry = remote.get(operation.path_in_repo)
    if entry is None or entry.size != operation.upload_info.size:
        return False
    if entry.lfs is not None:
        return entry.lfs.sha256 == operation.upload_info.sha256.hex()
    with operation.as_file() as file:
        return entry.blob_id == git_hash(file.read())


def push(plan: Plan, *, private: bool = False, revision: str = "main", create_repo: bool = True,
         create_branch: bool = True, commit_message: str | None = None,
         files_per_commit: int = FILES_PER_COMMIT) -> tuple[str, bool]:
    """Commit the plan as the branch's whole content, `files_per_commit` files a commit; returns the last commit's URL
    and whether anything was committed."""
    from huggingface_hub import (
        CommitOperationAdd,
        CommitOperationDelete,
        HfApi,
        RepoFile,
        constants,
        get_token,
    )
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from tqdm.auto import tqdm

    if get_token() is None:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry_run)")
    if files_per_commit < 1:
        raise UsageError(f"--files_per_commit {files_per_commit}: must be at least 1")
    api = HfApi()
    where = f"{plan.repo_type} repo '{plan.repo_id}' on {api.endpoint}"
    try:
        if create_repo:
            api.create_repo(plan.repo_id, repo_type=plan.repo_type, private=private, exist_ok=True,
                            space_sdk="gradio" if plan.repo_type == "space" else None)
        if private and not api.repo_info(plan.repo_id, repo_type=plan.repo_type).private:
            # exist_ok leaves an existing repo as it was: say so rather than push "private" files publicly unnoticed
            print(f"warning: {where} already exists and is public; --private applies to new repos only", file=sys.stderr)
        if revision != "main" and create_branch:
            api.create_branch(plan.repo_id, repo_type=plan.repo_type, branch=revision, exist_ok=True)
        remote = {entry.path: entry for entry in api.list_repo_tree(plan.repo_id, repo_type=plan.repo_type,
                                                                    revision=revision, recursive=True)
                  if isinstance(entry, RepoFile)}
        names = sorted(plan.files, key=lambda name: (_describes_others(name), name))
        additions = [CommitOperationAdd(name, plan.files[name] if isinstance(plan.files[name], bytes)
                                        else str(plan.files[name])) for name in names]
        operations = [operation for operation in additions if not _unchanged(operation, remote)]
        operations += [CommitOperationDelete(name) for name in sorted(remote.keys() - plan.files.keys() - {".gitattributes"})]
        if len(operations) < len(additions):
            print(f"{where}: {len(additions) - len(operations)} of {len(additions)} files are there already",
                  file=sys.stderr)
        if not operations:  # the branch is the plan already: its head commit, as huggingface_hub answers then
            head = api.repo_info(plan.repo_id, repo_type=plan.repo_type, revision=revision).sha
            prefix = constants.REPO_TYPES_URL_PREFIXES.get(plan.repo_type, "")
            return f"{api.endpoint}/{prefix}{plan.repo_id}/commit/{head}", False
        batches = [operations[start:start + files_per_commit] for start in range(0, len(operations), files_per_commit)]
        message = commit_message or f"Publish {plan.repo_type} with avlabel"
        file_bars = not are_progress_bars_disabled()
        disable_progress_bars()  # one bar over the whole push rather than one per file
        try:
            with tqdm(total=len(operations), unit="file", desc=f"{plan.repo_type} {plan.repo_id}") as bar:
                for number, batch in enumerate(batches, 1):
                    part = f" ({number}/{len(batches)})" if len(batches) > 1 else ""
                    info = api.create_commit(plan.repo_id, batch, repo_type=plan.repo_type, revision=revision,
                                             commit_message=message + part)
                    bar.update(len(batch))
        finally:
            if file_bars:
                enable_progress_bars()
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
    return info.commit_url, True


def _run(plan: Plan, scrub: Scrubber, revision: str, dry_run_dir, **push_args) -> Published:
    _checked(plan, scrub)
    published = Published(plan.repo_id, plan.repo_type, revision, sorted(plan.files), plan.skipped)
    if dry_run_dir is not None:
        published.folder = write_folder(plan, dry_run_dir)
    else:
        published.url, committed = push(plan, revision=revision, **push_args)
        published.up_to_date = not committed
    return published


def publish_model(output_dir: str | Path, repo_id: str, *, weights: str = "merged", base_model: str | None = None,
                  license: str | None = None, dataset_repo: str | None = None, eval_dir: str | Path | None = None,
                  eval_run: str | None = None, revision: str = "main", dry_run_dir: str | Path | None = None,
                  **push_args) -> Published:
    """Publish a training output (and optionally its evaluation run under eval/); `dry_run_dir` pushes nothing.

    `push_args`: `push`'s private, create_repo, create_branch, commit_message, files_per_commit.
    """
    plan, scrub = plan_model(output_dir, repo_id, weights=weights, base_model=base_model, license=license,
                             dataset_repo=dataset_repo, eval_dir=eval_dir, eval_run=eval_run)
    return _run(plan, scrub, revision, dry_run_dir, **push_args)


def publish_dataset(dataset_dir: str | Path, repo_id: str, *, layout: str = "auto",
                    clips_per_folder: int = CLIPS_PER_FOLDER, revision: str = "main",
                    dry_run_dir: str | Path | None = None, **push_args) -> Published:
    """Publish a dataset folder of `avlabel build` (its card included) in the folders or the parquet layout."""
    with tempfile.TemporaryDirectory(prefix="avlabel-parquet-") as staging:
        plan, scrub = plan_dataset(dataset_dir, repo_id, layout=layout, clips_per_folder=clips_per_folder,
                                   staging=Path(staging))
        return _run(plan, scrub, revision, dry_run_dir, **push_args)


def publish_eval(eval_dir: str | Path, repo_id: str, *, model_repo: str | None = None, eval_run: str | None = None,
                 revision: str = "main", dry_run_dir: str | Path | None = None, **push_args) -> Published:
    """Publish an `avlabel compare` folder to a dataset repo of its own, with an evaluation-run card."""
    plan, scrub = plan_eval(eval_dir, repo_id, model_repo=model_repo, eval_run=eval_run)
    return _run(plan, scrub, revision, dry_run_dir, **push_args)


def publish_metric(repo_id: str, *, metric_dir: str | Path | None = None, revision: str = "main",
                   dry_run_dir: str | Path | None = None, **push_args) -> Published:
    """Publish the `evaluate` metric to a Space, so that `evaluate.load(repo_id)` loads it."""
    plan, scrub = plan_metric(repo_id, metric_dir)
    return _run(plan, scrub, revision, dry_run_dir, **push_args)


# ----------------------------------------------------------------------------- CLI


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    if subparsers is not None:
        return subparsers.add_parser(NAME, dataclass_types=[PublishArguments])
    return ArgumentParser(dataclass_types=[PublishArguments], prog=f"avlabel {NAME}")


def check_repo_id(repo_id: str | None, option: str) -> None:
    """Refuse, before anything is written, a repo id the Hub would refuse (huggingface_hub's own rules), or one
    without its owner: the cards tell others to load the repo by this id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id is None:
        return
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        rule = str(err).split(": '")[0]  # huggingface_hub's rule, without the id it repeats
        raise UsageError(f"{option} {repo_id}: not a Hub repo id ({rule})") from None
    if "/" not in repo_id:
        raise UsageError(f"{option} {repo_id}: give owner/name (e.g. your user or organisation/{repo_id}), the id "
                         "others load it by")


def publish(args: PublishArguments) -> list[Published]:
    from avlabel.core.parser import check_path

    if not (args.model_dir or args.dataset_dir or args.eval_dir or args.metric_repo):
        raise UsageError("nothing to publish: give --model_dir, --dataset_dir, --eval_dir and/or --metric_repo")
    for folder, repo, option in ((args.model_dir, args.model_repo, "model"), (args.dataset_dir, args.dataset_repo, "dataset")):
        if folder and not repo:
            raise UsageError(f"--{option}_dir needs --{option}_repo (the Hub repo to publish it to)")
    if args.eval_dir and not (args.eval_repo or args.model_dir):
        raise UsageError("--eval_dir needs --eval_repo, or --model_dir to publish it with the model")
    for option in ("model_repo", "dataset_repo", "eval_repo", "metric_repo"):
        check_repo_id(getattr(args, option), f"--{option}")
    for option in ("model_dir", "dataset_dir", "eval_dir"):  # a path that is not there: a command-line mistake
        if getattr(args, option):
            check_path(getattr(args, option), f"--{option} {getattr(args, option)}")
    if args.dry_run:
        from avlabel.core.parser import check_output_dir

        check_output_dir(args.dry_run_dir, "--dry_run_dir")
    common = dict(private=args.private, revision=args.revision, create_repo=args.create_repo,
                  create_branch=args.create_branch, commit_message=args.commit_message,
                  files_per_commit=args.files_per_commit, dry_run_dir=args.dry_run_dir if args.dry_run else None)
    done = []
    if args.dataset_dir:
        done.append(publish_dataset(args.dataset_dir, args.dataset_repo, layout=args.dataset_layout,
                                    clips_per_folder=args.clips_per_folder, **common))
    if args.model_dir:
        done.append(publish_model(args.model_dir, args.model_repo, weights=args.weights, base_model=args.base_model,
                                  license=args.license, dataset_repo=args.dataset_repo,
                                  eval_dir=None if args.eval_repo else args.eval_dir, eval_run=args.eval_run, **common))
    if args.eval_dir and args.eval_repo:
        done.append(publish_eval(args.eval_dir, args.eval_repo, model_repo=args.model_repo, eval_run=args.eval_run, **common))
    if args.metric_repo:
        done.append(publish_metric(args.metric_repo, **common))
    return done


def main(args: PublishArguments) -> list[Published]:
    done = publish(args)
    for published in done:
        print(published.describe())
        for skipped in published.skipped:
            print(f"  not published: {skipped}")
    if args.dry_run:
        print("dry run: nothing was pushed", file=sys.stderr)
    return done


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("publish")
