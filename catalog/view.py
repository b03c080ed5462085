"""Looking at search results: a self-contained HTML gallery and a terminal table.

The gallery is one HTML file with everything inline (CSS, thumbnails as base64 JPEG), so it
can be mailed, attached to an issue or opened offline. Each clip shows a strip of frames
taken by the project's own sampler (`avlabel.core.sampling.sample_frames`, the frames the
model sees, at thumbnail size), the caption's fields with full-text matches marked, the
human label beside it where the catalog has one, and the closed fields on which the two
disagree highlighted. Free text is not flagged: a different wording is not a disagreement
(the eval package's text metrics measure that).
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
from typing import Any

from avlabel.core.sampling import SamplingConfig, VideoError, sample_frames
from avlabel.core.schema import FIELDS, SUMMARY_FIELDS

from .query import Hit, SearchResult

# small frames, few of them: enough to recognise a scene, cheap to inline
THUMBNAILS = SamplingConfig(fps=1.0, min_frames=4, max_frames=6, min_pixels=32 * 32, max_pixels=176 * 96, factor=8)


def thumbnails(video: str | None, config: SamplingConfig = THUMBNAILS) -> tuple[list[str], str | None]:
    """(JPEG data URIs of sampled frames, None) or ([], why there are none)."""
    from PIL import Image

    if not video:
        return [], "the record names no video file"
    try:
        clip = sample_frames(video, config)
    except (VideoError, OSError) as err:
        return [], str(err)
    uris = []
    for frame in clip.frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, "JPEG", quality=80)
        uris.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris, None


GALLERY_TEMPLATE = Path(__file__).parent / "gallery.html.jinja"
LOW_CONFIDENCE = 0.5  # answers the model gave with less probability than this are outlined


def _cell(value: Any, missing: bool = False, marked: str | None = None) -> dict[str, Any]:
    """What the template shows for one field value: the text (lists one item a line) or the
    pieces of full-text-marked text as (text, is_match), FTS5's marks being \\x02 and \\x03."""
    pieces = None
    if marked is not None:
        pieces = [(piece, bool(index % 2)) for index, piece in enumerate(marked.replace("\x03", "\x02").split("\x02"))]
    if isinstance(value, list):
        value = "\n".join(value)
    return {"value": value, "missing": missing, "pieces": pieces}


def _clip(rank: int, hit: Hit, frames: list[str], why_no_frames: str | None, low_confidence: float | None) -> dict[str, Any]:
    disagreements = hit.disagreements
    rows = []
    for spec in FIELDS:
        name = spec.name
        confidence = hit.confidence.get(name)
        rows.append({
            "name": name,
            "mine": _cell(hit.label.get(name), missing=name in hit.errors, marked=hit.highlights.get(name)),
            "theirs": _cell(hit.human.get(name)) if hit.human is not None else None,
            "disagree": name in disagreements,
            "confidence": confidence,
            "low": low_confidence is not None and confidence is not None and confidence < low_confidence,
        })
    return {"rank": rank, "hit": hit, "frames": frames, "why_no_frames": why_no_frames, "rows": rows,
            "disagreements": disagreements}


def _query_parts(query: dict[str, Any]) -> list[tuple[str, str]]:
    """The query as (label, text) pairs; filters need no label."""
    parts = [("", where) for where in query.get("where") or []]
    if query.get("text"):
        parts.append(("text", query["text"]))
    if query.get("semantic"):
        parts.append(("meaning", query["semantic"]))
    parts += [("run", run) for run in query.get("runs") or []]
    if query.get("sort"):
        parts.append(("sorted by", query["sort"]))
    return parts


def write_gallery(result: SearchResult, path: str | Path, title: str = "Clip catalog", progress: bool = False,
                  low_confidence: float | None = LOW_CONFIDENCE) -> Path:
    """Write the self-contained HTML gallery of `result`'s hits; returns the file.

    Answers whose recorded confidence is under `low_confidence` are outlined (None: none are).
    """
    import jinja2

    path = Path(path)
    hits = result.hits
    if progress and hits:
        from tqdm.auto import tqdm

        hits = tqdm(hits, desc="thumbnails", unit="clip")
    clips = [_clip(rank, hit, *thumbnails(hit.video), low_confidence) for rank, hit in enumerate(hits, 1)]
    counts = {name: [(label, n, max(2, round(90 * n / max(result.total, 1)))) for label, n in values.items()]
              for name, values in result.counts.items() if values}
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.from_string(GALLERY_TEMPLATE.read_text(encoding="utf-8"))
    page = template.render(title=title, result=result, query=_query_parts(result.query), counts=counts, clips=clips,
                           low_confidence=low_confidence, any_confidence=any(hit.confidence for hit in result.hits))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(value)
    return str(value)


def print_result(result: SearchResult, file=None, width: int | None = None) -> None:
    """The hits, then the counts per category of the matching set.

    A hit is two lines, its closed fields then the matched text, so free text wraps at words
    across the whole width (a column of its own in a ten-column table got one word a line at
    80 columns).
    """
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    console = Console(file=file or sys.stdout, width=width, highlight=False)
    console.print(Text(f"{result.total} matching · {_plain_query(result.query)} · {result.seconds * 1000:.0f} ms",
                       style="italic"))
    for rank, hit in enumerate(result.hits, 1):
        fields = " · ".join(_short(hit.label.get(name)) for name in SUMMARY_FIELDS)
        line = Text.assemble((f"{rank:>2}. ", "dim"), (hit.clip_id, "bold"), f"  {hit.source}  {hit.score:.3g}  {fields}")
        if hit.kind != "human":
            disagree = ", ".join(hit.disagreements) if hit.human is not None else "(no human label)"
            if disagree:
                line.append(f"  ≠ human: {disagree}", style="red")
        console.print(line)
        snippet = Text()
        if hit.highlights:
            name, marked = next(iter(hit.highlights.items()))
            start = max(0, marked.index("\x02") - 30)  # the first match with some context
            marked = ("…" if start else "") + marked[start : start + 90]
            for i, piece in enumerate(marked.replace("\x03", "\x02").split("\x02")):
                snippet.append(piece, style="bold yellow" if i % 2 else None)
            snippet = Text(f"{name}: ") + snippet
        else:
            snippet.append((hit.label.get("safety_analysis") or "")[:90])
        if snippet:
            console.print(Padding(snippet, (0, 0, 0, 4)))
    console.print(Text("counts over the matching set", style="italic"))  # a title would wrap to the table's width
    counts = Table(show_header=False)
    counts.add_column("field", style="bold")
    counts.add_column("values", overflow="fold")
    for name, values in result.counts.items():
        counts.add_row(name, " · ".join(f"{value} {n}" for value, n in values.items()) or "-")
    console.print(counts)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def _plain_query(query: dict[str, Any]) -> str:
    parts = list(query.get("where") or [])
    if query.get("text"):
        parts.append(f"text {query['text']!r}")
    if query.get("semantic"):
        parts.append(f"meaning {query['semantic']!r}")
    if query.get("runs"):
        parts.append("runs " + ", ".join(query["runs"]))
    return "; ".join(parts) or "everything"
