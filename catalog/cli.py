"""`avlabel search`: index captions and human labels, then find, look at and use clips.

    # index a caption run and the human labels of a dataset (incremental; embeddings too)
    avlabel search --db catalog.db --index runs/sft --labels data/synthetic
    # find clips: filters, full text and meaning in one query; a gallery, a dataset, a table
    avlabel search --db catalog.db --where "weather=Heavy rain" "lighting=Night*" \\
        --text "pedestrian crossing" --semantic "someone steps onto the road in the dark" \\
        --html hits.html --export data/hard_cases
    # the eval metrics per slice of a run
    avlabel search --db catalog.db --run sft --slice "night: human.lighting=Night*" "day: human.lighting=Daytime*"
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .use import LabelChoice

NAME = "search"


@dataclass
class SearchArguments:
    db: str = field(default="catalog.db", metadata={"help": "The catalog, one SQLite file; created by the first --index."})
    index: list[str] = field(
        default_factory=list,
        metadata={"help": "Caption runs to index: `avlabel caption` output folders or captions.jsonl files; "
                          "NAME=PATH names the run (default: the folder's name). Re-indexing only applies changes."},
    )
    labels: list[str] = field(
        default_factory=list,
        metadata={"help": "Builder datasets (folder or Hub id) whose human labels to index; NAME=PATH names them."},
    )
    embed: bool = field(
        default=True,
        metadata={"help": "After indexing, embed the texts that have no vector yet (slow on a CPU; resumable)."},
    )
    where: list[str] = field(
        default_factory=list,
        metadata={"help": 'Filters, all of which must hold: "weather=Heavy rain", "lighting=Night*", '
                          '"metaaction=Yield to VRUs", "difficulty>=3", "interesting=true", "road_type~collector", '
                          '"run=sft", "human.lighting=Night*", "confidence<0.5", "lighting.confidence<0.6". '
                          'See `catalog/query.py` for the full syntax.'},
    )
    text: str | None = field(
        default=None, metadata={"help": 'Full-text query over the free-text fields: words, "phrases", OR, NOT, prefix*, field:word.'}
    )
    semantic: str | None = field(default=None, metadata={"help": "Rank by meaning: a sentence describing the situation."})
    min_similarity: float = field(default=0.25, metadata={"help": "Semantic: the least cosine similarity that matches."})
    neighbours: int = field(
        default=1000, metadata={"help": "Semantic: the matching set is at most this many annotations, the nearest in meaning."}
    )
    sort: str | None = field(
        default=None,
        metadata={"help": 'Order the hits by the model\'s confidence, least confident first: "confidence" (the clip\'s), '
                          '"lighting.confidence" (a field\'s); "-confidence" for the most confident first.'},
    )
    run: list[str] = field(default_factory=list, metadata={"help": "Only these caption runs (default: all)."})
    human: bool = field(default=False, metadata={"help": "Search the human labels instead of the captions."})
    limit: int = field(default=20, metadata={"help": "Hits to show and put in the gallery (counts cover all matches)."})
    html: str | None = field(default=None, metadata={"help": "Write the self-contained HTML gallery of the hits here."})
    json_out: str | None = field(default=None, metadata={"help": "Write the result (hits, counts, query) as JSON here."})
    export: str | None = field(
        default=None,
        metadata={"help": "Build a dataset of every matching clip into this folder (through `avlabel build`; the "
                  "manifest it read stays there as .export_manifest.jsonl)."},
    )
    export_labels: LabelChoice = field(
        default="prefer_human",
        metadata={"help": "Export labels: the human label where there is one, else the caption (prefer_human); "
                          "only clips with human labels (human); the captions (caption)."},
    )
    export_test_size: float = field(default=0.1, metadata={"help": "Export: held-out fraction, or a clip count from 1 up."})
    slice: list[str] = field(
        default_factory=list,
        metadata={"help": 'Per-slice eval metrics of each --run: "NAME: filter && filter", e.g. '
                          '"night: human.lighting=Night*". Slice on human.* fields to slice by the truth.'},
    )

    def __post_init__(self):
        from avlabel.core.parser import check_output_dir, check_output_file, check_path, check_source

        for spec in self.index:
            check_path(_named(spec)[1], f"--index {spec}")
        for spec in self.labels:
            check_source(_named(spec)[1], "--labels", "dataset")
        if self.index or self.labels:  # written; otherwise only read
            check_output_file(self.db, "--db")
        for flag, value in (("--html", self.html), ("--json_out", self.json_out)):
            if value:
                check_output_file(value, flag)
        if self.export:
            check_output_dir(self.export, "--export")


def _named(spec: str) -> tuple[str | None, str]:
    """NAME=PATH or PATH."""
    name, eq, path = spec.partition("=")
    if eq and name and "/" not in name:
        return name, path
    return None, spec


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    if subparsers is not None:
        return subparsers.add_parser(NAME, dataclass_types=[SearchArguments])
    return ArgumentParser(dataclass_types=[SearchArguments], prog=f"avlabel {NAME}")


def _print_report(report) -> None:
    print(report.summary())
    for problem in report.problems:
        print(f"  set aside: {problem}", file=sys.stderr)


def _index(args: SearchArguments) -> None:
    from . import embed_pending, index_dataset, index_run

    for name, path in map(_named, args.index):
        _print_report(index_run(args.db, path, run=name))
    for name, path in map(_named, args.labels):
        _print_report(index_dataset(args.db, path, name=name))
    if args.embed:
        print(embed_pending(args.db, progress=True).summary())


def main(args: SearchArguments):
    from . import search
    from .use import export_dataset, parse_slice, print_slices, slice_metrics
    from .view import print_result, write_gallery

    wants_query = any([args.where, args.text, args.semantic, args.html, args.json_out, args.export])
    if args.index or args.labels:
        _index(args)
    result = None
    if wants_query or not (args.index or args.labels or args.slice):
        common = dict(where=args.where, text=args.text, semantic=args.semantic, runs=args.run,
                      kind="human" if args.human else "model", min_similarity=args.min_similarity,
                      neighbours=args.neighbours, sort=args.sort)
        result = search(args.db, limit=args.limit, **common)
        print_result(result)
        if args.html:
            print(f"wrote {write_gallery(result, args.html, progress=True)}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(
                {"query": result.query, "total": result.total, "counts": result.counts, "notes": result.notes,
                 "hits": [asdict(hit) | {"disagreements": hit.disagreements} for hit in result.hits]},
                indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"wrote {args.json_out}")
        if args.export:
            everything = result if result.total <= len(result.hits) else search(args.db, limit=None, **common)
            exported = export_dataset(everything.hits, args.export, labels=args.export_labels,
                                      test_size=args.export_test_size)
            from avlabel.data_builder.build import print_summary

            print_summary(exported.build)
            print(f"exported {exported.clips} clips ({exported.human_labels} human labels, "
                  f"{exported.caption_labels} caption labels) via {exported.manifest}")
            for reason in exported.skipped:
                print(f"  left out: {reason}", file=sys.stderr)
    if args.slice:
        from .store import connect

        slices = dict(parse_slice(text) for text in args.slice)
        con = connect(args.db, create=False)
        runs = args.run or [row[0] for row in con.execute("SELECT name FROM sources WHERE kind = 'model' ORDER BY name")]
        con.close()
        for run in runs:
            print_slices(slice_metrics(args.db, slices, run, where=args.where), run)
    return result


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("search")
