"""Looking at search results: a self-contained HTML gallery and a terminal table.

The gallery is one HTML file with everything inline (CSS, thumbnails as base64 JPEG), so it
can be mailed, attached to an issue or opened offline. Each clip shows a strip of frames
taken by the project's own sampler (`data_builder.sampling.sample_frames`, the frames the
model sees, at thumbnail size), the caption's fields with full-text matches marked, the
human label beside it where the catalog has one, and the closed fields on which the two
disagree highlighted. Free text is not flagged: a different wording is not a disagreement
(the eval package's text metrics measure that).
"""

from __future__ import annotations

import base64
import html
import io
import sys
from pathlib import Path
from typing import Any

from avlabel.core.sampling import SamplingConfig, VideoError, sample_frames
from avlabel.core.schema import FIELDS

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


def _value(value: Any, missing: bool = False) -> str:
    if missing:
        return '<span class="missing">(no answer)</span>'
    if value is None:
        return '<span class="null">null</span>'
    if isinstance(value, list):
        return "<br>".join(html.escape(v) for v in value)
    return html.escape(str(value)).replace("\n", "<br>")


def _marked(text: str) -> str:
    """FTS5 highlight marks (\\x02 \\x03) as <mark>, the rest escaped."""
    return html.escape(text).replace("\x02", "<mark>").replace("\x03", "</mark>").replace("\n", "<br>")


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;background:#f6f7f9;color:#1d2330}
h1{font-size:22px;margin:0 0 4px} .query{color:#4a5468;margin:0 0 16px;font-size:14px}
.query code{background:#e8ebf0;padding:1px 5px;border-radius:3px}
.notes{color:#8a5300;font-size:13px}
.counts{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:20px}
.count{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:8px 10px;font-size:12px;min-width:200px}
.count h3{font-size:12px;margin:0 0 4px;color:#4a5468}
.bar{display:flex;align-items:center;gap:6px;margin:2px 0}
.bar span.fill{display:inline-block;height:8px;background:#4f7cff;border-radius:2px}
.clip{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:0 0 18px;padding:12px 14px}
.clip header{display:flex;gap:14px;align-items:baseline;flex-wrap:wrap;font-size:14px;margin-bottom:8px}
.clip header .id{font-weight:600;font-size:16px}
.badge{background:#e8ebf0;border-radius:10px;padding:1px 8px;font-size:12px}
.badge.bad{background:#ffd9d4;color:#9b1c0c}.badge.good{background:#d8f5df;color:#14662a}
.strip{display:flex;gap:4px;overflow-x:auto;margin-bottom:10px}
.strip img{height:96px;border-radius:3px;display:block}
.novideo{background:#fff4e0;color:#8a5300;padding:8px;font-size:12px;border-radius:4px;margin-bottom:10px}
table.fields{border-collapse:collapse;width:100%;font-size:13px}
table.fields th,table.fields td{border-top:1px solid #eceef2;padding:4px 8px;text-align:left;vertical-align:top}
table.fields th{width:190px;color:#4a5468;font-weight:500}
table.fields thead th{border-top:none;color:#1d2330;font-weight:600}
tr.disagree td,tr.disagree th{background:#ffe3de}
tr.disagree th::after{content:" \\2260";color:#c0260e;font-weight:700}
mark{background:#ffe566;padding:0 1px}
.null,.missing{color:#8a93a6;font-style:italic}
"""


def _counts_html(counts: dict[str, dict[str, int]], total: int) -> str:
    boxes = []
    for name, values in counts.items():
        if not values:
            continue
        rows = "".join(
            f'<div class="bar"><span class="fill" style="width:{max(2, round(90 * n / max(total, 1)))}px"></span>'
            f"{html.escape(value)} <b>{n}</b></div>"
            for value, n in values.items()
        )
        boxes.append(f'<div class="count"><h3>{html.escape(name)}</h3>{rows}</div>')
    return f'<section class="counts">{"".join(boxes)}</section>'


def _clip_html(rank: int, hit: Hit, frames: list[str], why_no_frames: str | None) -> str:
    disagreements = set(hit.disagreements)
    badges = [f'<span class="badge">{html.escape(hit.source)}</span>']
    if hit.model:
        badges.append(f'<span class="badge">{html.escape(hit.model)}{" + " + html.escape(hit.adapter) if hit.adapter else ""}</span>')
    badges.append(f'<span class="badge">score {hit.score:.3g}</span>')
    if hit.similarity is not None:
        badges.append(f'<span class="badge">cosine {hit.similarity:.2f}</span>')
    if hit.status != "ok":
        badges.append('<span class="badge bad">caption failed</span>')
    elif not hit.valid:
        badges.append('<span class="badge bad">invalid fields</span>')
    if hit.human is not None:
        badges.append(f'<span class="badge {"bad" if disagreements else "good"}">'
                      f'{len(disagreements)} disagreement{"s" * (len(disagreements) != 1)} with human</span>')
    if frames:
        strip = '<div class="strip">' + "".join(f'<img class="thumb" alt="frame {i + 1}" src="{uri}">' for i, uri in enumerate(frames)) + "</div>"
    else:
        strip = f'<div class="novideo">no thumbnails: {html.escape(why_no_frames or "")}</div>'
    heading = "caption" if hit.kind == "model" else "human label"
    columns = f"<th>{heading}</th>" + (f"<th>human ({html.escape(hit.human_source or '')})</th>" if hit.human is not None else "")
    rows = []
    for spec in FIELDS:
        mine = _marked(hit.highlights[spec.name]) if spec.name in hit.highlights else \
            _value(hit.label.get(spec.name), missing=spec.name in hit.errors)
        theirs = f"<td>{_value(hit.human.get(spec.name))}</td>" if hit.human is not None else ""
        css = ' class="disagree"' if spec.name in disagreements else ""
        rows.append(f'<tr{css} data-field="{spec.name}"><th>{spec.name}</th><td>{mine}</td>{theirs}</tr>')
    return (f'<article class="clip" id="clip-{rank}" data-clip="{html.escape(hit.clip_id)}">'
            f'<header><span class="id">#{rank} {html.escape(hit.clip_id)}</span>{"".join(badges)}</header>'
            f'{strip}<table class="fields"><thead><tr><th>field</th>{columns}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></article>')


def _query_html(query: dict[str, Any]) -> str:
    parts = [f"<code>{html.escape(w)}</code>" for w in query.get("where") or []]
    if query.get("text"):
        parts.append(f"text <code>{html.escape(query['text'])}</code>")
    if query.get("semantic"):
        parts.append(f"meaning <code>{html.escape(query['semantic'])}</code>")
    if query.get("runs"):
        parts.append("runs " + ", ".join(f"<code>{html.escape(r)}</code>" for r in query["runs"]))
    return " · ".join(parts) or "everything"


def write_gallery(result: SearchResult, path: str | Path, title: str = "Clip catalog", progress: bool = False) -> Path:
    """Write the self-contained HTML gallery of `result`'s hits; returns the file."""
    path = Path(path)
    hits = result.hits
    if progress and hits:
        from tqdm.auto import tqdm

        hits = tqdm(hits, desc="thumbnails", unit="clip")
    articles = [_clip_html(rank, hit, *thumbnails(hit.video)) for rank, hit in enumerate(hits, 1)]
    shown = f"showing the best {len(result.hits)}" if len(result.hits) < result.total else "all shown"
    notes = "".join(f'<p class="notes">{html.escape(note)}</p>' for note in result.notes)
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}: {result.total} matching clip{'s' * (result.total != 1)}</h1>"
        f'<p class="query">{_query_html(result.query)} — {shown}</p>{notes}'
        f"{_counts_html(result.counts, result.total)}{''.join(articles)}</body></html>"
    )
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
        fields = " · ".join(_short(hit.label.get(name)) for name in
                            ("weather", "lighting", "driving_difficulty", "interactive_expanded_metaaction"))
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
