"""The PNG charts of the cards and reports (loss curve, dataset statistics, compare's and calibration's charts).

Each is drawn on a `matplotlib.figure.Figure` made directly, without pyplot: no global figure state to
close, and no GUI backend to switch off on machines without a display."""

from __future__ import annotations

import io


def png_bytes(figure, dpi: int) -> bytes:
    """`figure` as PNG bytes at `dpi`, without matplotlib's version stamp: the same data give the same bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()
