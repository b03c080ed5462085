"""The Markdown tables of the cards and reports (dataset card, model card, `avlabel compare`'s report.md)."""

from __future__ import annotations

from typing import Any, Sequence


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table, every cell kept in its column ('|' escaped, line breaks flattened)."""
    # by hand: tabulate (which sacrebleu pulls in) pads cells and leaves '|' unescaped
    def row(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    return "\n".join([row(header), "|" + "---|" * len(header), *map(row, rows)])
