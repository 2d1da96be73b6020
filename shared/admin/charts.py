"""Server-side SVG charts for the admin page: no JavaScript library, nothing to vendor or build.

One chart kind covers what the page shows (a metric per day, or per app/user): vertical bars
with a labelled scale. Text is escaped; sizes are fixed so the page lays out before it loads.
"""
from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 48


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _format(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    # Small amounts (a request costs fractions of a cent): three significant digits, written out
    # (0.00005, not 5e-05: people read the axis).
    decimals = min(12, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".")


def bar_chart(points: list[tuple[str, float]], title: str, unit: str = "") -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = _nice_max(max((v for _, v in points), default=0.0))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}" font-family="system-ui, sans-serif" font-size="11">',
        f'<title>{escape(title)}</title>',
        f'<text x="{LEFT}" y="16" font-size="13" font-weight="600">{escape(title)}</text>',
    ]
    for i in range(5):  # scale lines
        value = top * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#e3e3e3"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{escape(_format(value) + unit)}</text>')
    if not points:
        parts.append(f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" text-anchor="middle" fill="#777">no data for this range</text>')
    slot = plot_w / max(1, len(points))
    every = max(1, math.ceil(len(points) / 12))  # at most ~12 labels on the axis
    for index, (label, value) in enumerate(points):
        height = plot_h * (value / top) if top else 0
        x = LEFT + index * slot + slot * 0.15
        y = TOP + plot_h - height
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{height:.1f}" fill="#3b6fb6">'
                     f'<title>{escape(label)}: {escape(_format(value) + unit)}</title></rect>')
        if index % every == 0:
            parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" fill="#555">{escape(label[-10:])}</text>')
    parts.append("</svg>")
    return "".join(parts)
