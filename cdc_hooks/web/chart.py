"""A small bar chart of the last hour, drawn on the server as inline SVG: no
JavaScript charting library, nothing to fetch, and it prints as it shows."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

from ..rows import Minute

WIDTH, HEIGHT = 720, 160
LEFT, BOTTOM, TOP = 44, 22, 8  # room for the axis labels


def svg(minutes: Sequence[Minute]) -> Markup:
    """Delivered (green) and failed attempts (red) per minute, stacked."""
    if not minutes:
        return Markup("")
    peak = max(1, *(m.delivered + m.failed for m in minutes))
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - BOTTOM - TOP
    step = plot_w / len(minutes)
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="Deliveries per minute over the last hour" xmlns="http://www.w3.org/2000/svg">',
             _axes(peak, plot_w, plot_h, len(minutes))]
    for i, minute in enumerate(minutes):
        x = LEFT + i * step + step * 0.1
        parts.append(_bar(minute, x, step * 0.8, plot_h / peak))
    parts.append("</svg>")
    return Markup("".join(parts))


def _bar(minute: Minute, x: float, width: float, scale: float) -> str:
    base = HEIGHT - BOTTOM
    ok_h, failed_h = minute.delivered * scale, minute.failed * scale
    label = escape(f"{minute.at:%H:%M}: {minute.delivered} delivered, {minute.failed} failed")
    rects = [f'<rect class="{kind}" x="{x:.1f}" y="{top:.1f}" width="{width:.1f}" height="{h:.1f}"/>'
             for kind, top, h in (("ok", base - ok_h, ok_h), ("failed", base - ok_h - failed_h, failed_h))
             if h > 0]
    # An empty minute still gets a (transparent) bar to hover for its tooltip.
    hover = f'<rect class="hover" x="{x:.1f}" y="{TOP}" width="{width:.1f}" height="{base - TOP}"/>'
    return f"<g><title>{label}</title>{hover}{''.join(rects)}</g>"


def _axes(peak: int, plot_w: float, plot_h: float, count: int) -> str:
    base = HEIGHT - BOTTOM
    return (f'<line class="axis" x1="{LEFT}" y1="{base}" x2="{WIDTH}" y2="{base}"/>'
            f'<line class="grid" x1="{LEFT}" y1="{TOP}" x2="{WIDTH}" y2="{TOP}"/>'
            f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">{peak}</text>'
            f'<text x="{LEFT - 6}" y="{base}" text-anchor="end">0</text>'
            f'<text x="{LEFT}" y="{HEIGHT - 6}">-{count} min</text>'
            f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle">'
            f"-{count // 2} min</text>"
            f'<text x="{WIDTH}" y="{HEIGHT - 6}" text-anchor="end">now</text>')
