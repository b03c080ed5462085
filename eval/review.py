"""`avlabel review`: choose the clips a person should check, under a budget, and bring their corrections back.

A queue is chosen from one caption run (`--captions`) in one of three orders:
  confidence     the clips with the most expected wrong fields first (the sum of 1 - p over the fields the
                 record gives a confidence for): the lowest confidence first. Used when records carry
                 `confidence` ({field: p}) and no --other run is given.
  disagreement   with `--other <run2>` (base and fine-tuned, or two samples): the clips where the two runs
                 differ on the most closed fields first (free-text fields break ties: two runs rarely word
                 them alike, so they can't rank on their own).
  catalog        `--where` filters of `avlabel search` (e.g. `weather=Heavy rain`, `difficulty>=3`) keep only
                 the matching clips; either order above then applies, or clip id order when there is none.
The budget is a count (`--budget 50`) or a share of the candidates (`--budget 5%`). The command prints how
many wrong fields the queue is expected to hold (from confidence) and writes, under --output_dir:
  queue.jsonl                 one line per clip, most urgent first: the model's answer, its confidence, why chosen
  labelstudio/config.xml      a Label Studio labeling configuration generated from the schema
  labelstudio/tasks.json      the queue as Label Studio tasks, the model's answer as a scored pre-annotation
With `--label_studio URL` (the access token in LABEL_STUDIO_API_KEY) it also makes a project of those tasks
on that server. Back: with `--annotations <Label Studio JSON export>`, or `--label_studio URL --project N` to
read the project's annotations from the server, and `--labels_dir <folder>`, it instead writes the submitted
annotations as label files in the recipe layout (`metas/<id>.label.json`, the clip under `videos/`), each
marked with a `review` key; `avlabel build` on that folder makes the next dataset version, and its card counts
the labels that came from review.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avlabel.core import schema
from avlabel.core.errors import UsageError
from avlabel.core.problems import Problem, warn
from avlabel.core.records import latest_per_clip, read_located, run_files, succeeded

NAME = "review"
QUEUE_NAME = "queue.jsonl"
DEFAULT_BUDGET = "50"


@dataclass
class ReviewArguments:
    captions: str | None = field(
        default=None, metadata={"help": "The run to review: an `avlabel caption` output folder or its captions.jsonl."}
    )
    other: str | None = field(
        default=None, metadata={"help": "A second run of the same clips: order by disagreement with it."}
    )
    where: list[str] = field(
        default_factory=list,
        metadata={"help": "Catalog filters the clips must match (as `avlabel search --where`), e.g. 'difficulty>=3'."},
    )
    budget: str | None = field(
        default=None, metadata={"help": f"Clips to review: a count ({DEFAULT_BUDGET}) or a share of the candidates (5%%)."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the queue and the Label Studio files go (default: <captions>/review)."}
    )
    media_url: str | None = field(
        default=None,
        metadata={"help": "URL prefix the clips are served under, for Label Studio; default: Label Studio's local "
                  "files (start it with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and "
                  "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=--media_root)."},
    )
    media_root: str = field(default="/", metadata={"help": "The folder clip paths are made relative to in the tasks."})
    label_studio: str | None = field(
        default=None,
        metadata={"help": "URL of a Label Studio server: make a project of the queue there, or with --project read "
                  "its annotations back. The access token comes from LABEL_STUDIO_API_KEY."},
    )
    project: int | None = field(
        default=None, metadata={"help": "Import instead: the project on --label_studio whose annotations to read."}
    )
    annotations: str | None = field(
        default=None, metadata={"help": "Import instead: a Label Studio JSON export of the reviewed tasks."}
    )
    labels_dir: str | None = field(
        default=None, metadata={"help": "Import: the recipe-layout folder (videos/ + metas/) the labels are written to."}
    )

    def __post_init__(self):
        from avlabel.core.parser import check_output_dir, check_path

        for flag, value in (("--captions", self.captions), ("--other", self.other)):
            if value:
                check_path(value, f"{flag} {value}")
        if self.labels_dir:
            check_output_dir(self.labels_dir, "--labels_dir")
        if self.captions and not self.output_dir and not (self.annotations or self.project is not None):
            check_output_dir(str(self.queue_dir()), "the default --output_dir")

    def queue_dir(self) -> Path:
        """--output_dir, else review/ beside the run's captions."""
        if self.output_dir:
            return Path(self.output_dir)
        captions = Path(self.captions)
        return (captions if captions.is_dir() else captions.parent) / NAME


class ReviewError(ValueError):
    """A run the review can't order (exit 1; a wrong argument is a UsageError, exit 2)."""


@dataclass
class Candidate:
    """One clip that may be reviewed: the run's record, and what ranks it."""

    clip_id: str
    record: dict[str, Any]
    expected_wrong: float | None = None  # sum of 1 - p over the fields with a confidence, + unanswered fields
    differing: list[str] = field(default_factory=list)  # fields where --other answers differently

    @property
    def label(self) -> dict[str, Any]:
        return self.record.get("label") or {} if succeeded(self.record) else {}

    @property
    def confidence(self) -> dict[str, float]:
        return self.record.get("confidence") or {}

    def to_json(self, rank: int, reason: str) -> dict[str, Any]:
        return {
            "rank": rank, "clip_id": self.clip_id, "video": self.record.get("video"), "reason": reason,
            "label": self.label, "confidence": self.confidence, "clip_confidence": self.record.get("clip_confidence"),
            "expected_wrong": None if self.expected_wrong is None else round(self.expected_wrong, 4),
            "differing": self.differing,
        }


# ----------------------------------------------------------------------------- reading runs


def read_run(path: str | Path, problems: list[Problem]) -> dict[str, dict[str, Any]]:
    """clip id -> the record the core's merge rule picks, from a caption folder or a captions.jsonl."""
    files = run_files(Path(path))
    return latest_per_clip((pair for file in files for pair in read_located(file, problems)), problems)


def expected_wrong(record: dict[str, Any]) -> float | None:
    """Wrong fields a record is expected to hold: 1 - p summed over its field confidences, plus each field it
    did not answer or that constrained decoding cut (certainly to fix). None when the record has no confidence."""
    confidence = record.get("confidence")
    if not succeeded(record):
        return float(len(schema.FIELDS))
    if confidence is None:  # captioned before records carried confidence ({} is a record that answered no closed field)
        return None
    answered = record.get("label") or {}
    missing = {f for f in schema.FIELD_NAMES if f not in answered} | set(record.get("errors") or ()) | set(record.get("cut_fields") or ())
    return sum(1.0 - float(p) for name, p in confidence.items() if name not in missing) + len(missing & set(schema.FIELD_NAMES))


def same_answer(spec: schema.LabelField, mine: Any, theirs: Any) -> bool:
    """Two normalised answers of a field agree (a list as a set; free text up to case and spacing)."""
    if spec.kind == "multi_category":
        return set(mine or ()) == set(theirs or ())
    if spec.kind == "text" and isinstance(mine, str) and isinstance(theirs, str):
        return schema.clean_text(mine).casefold() == schema.clean_text(theirs).casefold()
    return mine == theirs


def differing_fields(one: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The fields two labels answer differently, after the schema's normalisation (a field either one lacks
    or gets wrong differs)."""
    a, b = schema.check_label(one)[0], schema.check_label(other)[0]
    return [f.name for f in schema.FIELDS if f.name not in a or f.name not in b or not same_answer(f, a[f.name], b[f.name])]


def parse_budget(budget: str, candidates: int) -> int:
    text = str(budget).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return math.ceil(candidates * share / 100)
        count = int(text)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise UsageError(f"--budget {budget!r}: expected a clip count (50) or a share of the clips (5%)") from None


def catalog_matches(captions: str | Path, where: list[str]) -> set[str]:
    """The clip ids of the run that match the catalog filters (the catalog's own parser and search)."""
    from avlabel.catalog.index import index_run
    from avlabel.catalog.query import QueryError, search

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "catalog.sqlite"
        index_run(db, captions, run="review")
        try:
            result = search(db, where=where, runs=["review"], limit=None)
        except QueryError as err:
            raise UsageError(f"--where: {err}") from None
    return set(result.clip_ids())


# ----------------------------------------------------------------------------- the queue


@dataclass
class Queue:
    order: str  # confidence | disagreement | catalog
    candidates: int
    chosen: list[Candidate]
    problems: list[Problem]
    short_of_budget: bool = False  # a count --budget asked for more clips than there are

    @property
    def expected_wrong(self) -> float | None:
        values = [c.expected_wrong for c in self.chosen if c.expected_wrong is not None]
        return sum(values) if values else None

    @property
    def with_confidence(self) -> int:
        return sum(c.expected_wrong is not None for c in self.chosen)


def choose(args: ReviewArguments) -> Queue:
    if not args.captions:
        raise UsageError("--captions: give the caption run to review (an `avlabel caption` output folder)")
    problems: list[Problem] = []
    run = read_run(args.captions, problems)
    if not run:
        raise ReviewError(f"{args.captions}: no caption records to review; caption the clips first (`avlabel caption`)")
    candidates = {clip_id: Candidate(clip_id, record, expected_wrong(record)) for clip_id, record in run.items()}
    if args.where:
        keep = catalog_matches(args.captions, args.where)
        candidates = {c: candidate for c, candidate in candidates.items() if c in keep}
    if args.other:
        other = read_run(args.other, problems)
        missing = [c for c in candidates if c not in other]
        problems += [Problem(c, "read", f"not in --other {args.other}; left out of the queue") for c in missing]
        for clip_id in missing:
            del candidates[clip_id]
        for clip_id, candidate in candidates.items():
            theirs = other[clip_id].get("label") or {} if succeeded(other[clip_id]) else {}
            candidate.differing = differing_fields(candidate.label, theirs)

        def key(c: Candidate):
            closed_differing = sum(name in schema.CLOSED_FIELD_NAMES for name in c.differing)
            return (-closed_differing, -len(c.differing), -(c.expected_wrong or 0), c.clip_id)

        order = "disagreement"
    elif any(c.expected_wrong is not None and succeeded(c.record) for c in candidates.values()):
        def key(c: Candidate):
            return (-(c.expected_wrong if c.expected_wrong is not None else math.inf), c.clip_id)

        order = "confidence"
    elif args.where:
        def key(c: Candidate):
            return c.clip_id

        order = "catalog"
    else:
        raise ReviewError(f"{args.captions}: the records carry no `confidence`; give --other <run> to order by "
                          "disagreement, or --where <filter> to choose by a catalog query")
    ranked = sorted(candidates.values(), key=key)
    budget = parse_budget(args.budget or DEFAULT_BUDGET, len(ranked))
    return Queue(order, len(ranked), ranked[:budget], problems, short_of_budget=bool(args.budget) and budget > len(ranked))


def write_queue(queue: Queue, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for rank, candidate in enumerate(queue.chosen, 1):
        if queue.order == "disagreement":
            reason = f"{len(candidate.differing)} field(s) differ from --other"
        elif candidate.expected_wrong is not None:
            reason = f"{candidate.expected_wrong:.2f} expected wrong field(s)"
        elif queue.order == "catalog":
            reason = "matches --where"
        else:
            reason = "no confidence recorded"
        lines.append(json.dumps(candidate.to_json(rank, reason), ensure_ascii=False) + "\n")
    path.write_text("".join(lines), encoding="utf-8")


def read_queue(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- command line


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    if subparsers is not None:
        return subparsers.add_parser(NAME, dataclass_types=[ReviewArguments])
    return ArgumentParser(dataclass_types=[ReviewArguments], prog=f"avlabel {NAME}")


def _import(args: ReviewArguments):
    from avlabel.hub.labelstudio import connect, export_tasks, import_annotations, server_errors

    given = "--annotations" if args.annotations else "--project"
    if args.annotations and args.project is not None:
        raise UsageError("--annotations and --project: give one, the export file or the project to read it from")
    # these choose a queue; an import writes back what reviewers submitted, so they would silently do nothing
    ignored = [flag for flag, value in (("--captions", args.captions), ("--other", args.other), ("--where", args.where),
                                        ("--budget", args.budget), ("--output_dir", args.output_dir)) if value]
    if ignored:
        raise UsageError(f"{', '.join(ignored)} with {given}: these choose a queue, and {given} imports the "
                         "reviewed annotations; run the two separately")
    if not args.labels_dir:
        raise UsageError(f"{given} needs --labels_dir: the recipe-layout folder to write the label files to")
    if args.annotations:
        result = import_annotations(args.annotations, args.labels_dir)
    else:
        if not args.label_studio:
            raise UsageError(f"--project {args.project} needs --label_studio: the URL of the server that holds it")
        client = connect(args.label_studio)
        with server_errors(args.label_studio, f"exporting project {args.project}"):
            tasks = export_tasks(client, args.project)
        result = import_annotations(tasks, args.labels_dir, source=f"Label Studio project {args.project}")
    warn(result.problems)
    metas = Path(args.labels_dir) / "metas"
    print(f"Wrote {len(result.written)} reviewed label(s) to {metas} ({result.corrected_fields} field(s) corrected).")
    # a build's input is the whole dataset: a folder of reviewed labels alone would build a dataset of them alone
    if len(list(metas.glob("*.json"))) > len(result.written):
        print(f"Run the build of {args.labels_dir} again (`avlabel build --input {args.labels_dir} --output_dir "
              "<dataset>`): the next version holds them.")
    else:
        print(f"{args.labels_dir} holds only these labels, so a build of it would hold only these clips: give "
              "--labels_dir the folder the dataset is built from, or copy metas/ and videos/ into it, then build it again.")
    return result


def main(args: ReviewArguments):
    from avlabel.hub.labelstudio import labeling_config, queue_to_tasks

    if args.annotations or args.project is not None:
        return _import(args)
    queue = choose(args)
    warn(queue.problems)
    captions = Path(args.captions)
    out = args.queue_dir()
    write_queue(queue, out / QUEUE_NAME)
    entries = read_queue(out / QUEUE_NAME)
    studio = out / "labelstudio"
    studio.mkdir(parents=True, exist_ok=True)
    (studio / "config.xml").write_text(labeling_config(), encoding="utf-8")
    tasks = queue_to_tasks(entries, media_url=args.media_url, media_root=args.media_root, model_version=captions.name)
    (studio / "tasks.json").write_text(json.dumps(tasks, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"Review queue: {len(queue.chosen)} of {queue.candidates} clip(s), by {queue.order} -> {out / QUEUE_NAME}"
          + (f" (--budget {args.budget} is more than the {queue.candidates} candidate(s): all are queued)"
             if queue.short_of_budget else ""))
    if queue.expected_wrong is not None:
        print(f"Expected wrong fields in the queue: {queue.expected_wrong:.1f} "
              f"(sum of 1 - confidence over {queue.with_confidence} clip(s) with a confidence; unanswered fields count 1)")
    else:
        print("Expected wrong fields: unknown (the records carry no confidence)", file=sys.stderr)
    print(f"Label Studio: labeling config {studio / 'config.xml'}, {len(tasks)} task(s) {studio / 'tasks.json'}")
    if args.label_studio:
        _push(args, captions.name, tasks)
    return queue


def _push(args: ReviewArguments, run_name: str, tasks: list[dict[str, Any]]) -> int:
    """The queue as a project on the --label_studio server; the clips' folders become its local storages
    unless --media_url serves them."""
    from avlabel.hub.labelstudio import connect, push_tasks, server_errors

    folders = [] if args.media_url else [Path(t["data"]["path"]).parent for t in tasks if t["data"]["path"]]
    client = connect(args.label_studio)
    with server_errors(args.label_studio, "making the review project"):
        project = push_tasks(client, f"avlabel review: {run_name}", tasks, folders)
    print(f"Label Studio project {project}: {args.label_studio.rstrip('/')}/projects/{project}/ ({len(tasks)} task(s)); "
          f"bring the annotations back with `avlabel review --label_studio {args.label_studio} --project {project} "
          "--labels_dir <folder>`")
    return project


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command(NAME)
