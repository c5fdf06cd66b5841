"""Figures as PNG bytes: one way to render a matplotlib figure, with no pyplot state.

Every figure embedpipe draws (report plots, explain panels, galleries, training curves)
is a ``matplotlib.figure.Figure`` rendered by the Agg canvas here: nothing touches
pyplot's global figure registry, so threads and long-running services draw safely and
nothing leaks.
"""

from __future__ import annotations

import io
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: dots per inch of every PNG: sizes in inches times DPI are pixels
DPI = 100

#: the look of every HTML page embedpipe writes (reports, galleries): one column at most
#: 1200 px wide, figures scaled down to fit it
PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222;
       line-height: 1.45; padding: 0 1rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
.warning { background: #fff4e5; border-left: 4px solid #e8590c; padding: 0.6rem 1rem; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-style: italic; color: #555; }
"""


def png(fig: Figure, *, dpi: int = DPI) -> bytes:
    """``fig`` rendered as PNG bytes (no software tag, so equal figures give equal bytes)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def text_width(text: str, fontsize: float) -> float:
    """Width of ``text`` in inches, as the Agg renderer will draw it."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    width, _, _ = RendererAgg(1, 1, DPI).get_text_width_height_descent(
        text, FontProperties(size=fontsize), ismath=False
    )
    return width / DPI


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """Break a title into lines that fit ``width_in`` inches: at " · " separators first,
    inside a part (a long checkpoint path) only when the part alone is too long."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for part in paragraph.split(" · "):
            candidate = f"{line} · {part}" if line else part
            if text_width(candidate, fontsize) <= width_in:
                line = candidate
                continue
            if line:
                lines.append(line)
            chars = max(10, int(len(part) * width_in / max(text_width(part, fontsize), 1e-6)))
            chunks = textwrap.wrap(part, chars, break_long_words=True) or [""]
            lines.extend(chunks[:-1])
            line = chunks[-1]
        lines.append(line)
    return "\n".join(lines)


def titled_figure(
    width: float, body: float, title: str, *, fontsize: float = 10, footer: float = 0.0
) -> Figure:
    """A figure ``width`` inches wide, titled ``title`` (wrapped to fit), tall enough for
    the title, a body ``body`` inches tall and a footer under it."""
    text = wrap(title, width - 0.2, fontsize)
    head = 0.12 + (text.count("\n") + 1) * fontsize * 1.35 / 72
    fig = Figure(figsize=(width, head + body + footer + 0.1))
    fig.suptitle(text, fontsize=fontsize, y=1 - 0.06 / fig.get_figheight(), va="top")
    return fig


def show_pixels(ax, pixels: np.ndarray) -> None:
    """uint8 (H, W, 1|3) or (H, W) pixels, grey when single-channel, without axes."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255)
    ax.set_axis_off()


def shorten(text: str, width: int = 26) -> str:
    """Keep the end of a long id (the file name), which tells neighbours apart."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def robust_limits(points: np.ndarray, *, percentile: float = 1.0, pad: float = 0.08):
    """Axis limits ``((x_lo, y_lo), (x_hi, y_hi))`` spanning the 1st-99th percentile of
    ``points`` (n, 2) plus a margin, and the (n,) bool mask of points outside them: one
    stray point no longer squashes a scatter into a stripe."""
    lo, hi = np.percentile(points, [percentile, 100 - percentile], axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    lo, hi = lo - pad * span, hi + pad * span
    outside = ((points < lo) | (points > hi)).any(axis=1)
    return (lo, hi), outside
