# -*- test-case-name: tests.test_traffic -*-
"""A line chart as inline SVG, drawn on the server: no JavaScript, no chart library, no CDN.

The admin pages are strict about what they load (``Content-Security-Policy``
in L{twistmail.web.admin}); an SVG element in the page needs nothing else.
Every text is escaped by markupsafe.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup

#: The span drawn: the last day.
SPAN = 24 * 3600


def svgChart(points: Sequence[dict], series: Sequence[tuple[str, str, str]], now: float,
             width: int = 720, height: int = 160) -> Markup:
    """Lines of C{points[i][key]} over the last day, one per C{(key, label, colour)}.

    Each line is a ``polyline`` with ``id="chart-<key>"`` and ``data-total`` (the
    sum over the day), which the legend shows too.
    """
    left, right, top, bottom = 40, width - 10, 10, height - 40
    peak = max([p.get(key, 0) for p in points for key, _, _ in series] + [1])

    def x(t: float) -> float:
        return left + (right - left) * max(0.0, min(1.0, 1 - (now - t) / SPAN))

    def y(v: float) -> float:
        return bottom - (bottom - top) * v / peak

    parts = [Markup('<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{w}" '
                    'height="{h}" viewBox="0 0 {w} {h}" role="img">').format(w=width, h=height),
             Markup('<line x1="{l}" y1="{b}" x2="{r}" y2="{b}" stroke="#999"/>'
                    '<line x1="{l}" y1="{t}" x2="{l}" y2="{b}" stroke="#999"/>').format(
                        l=left, r=right, t=top, b=bottom),
             Markup('<text x="{x}" y="{y}" font-size="11" text-anchor="end">{v}</text>').format(
                 x=left - 4, y=top + 8, v=peak),
             Markup('<text x="{x}" y="{y}" font-size="11" text-anchor="end">0</text>').format(
                 x=left - 4, y=bottom)]
    for hours, anchor in ((24, "start"), (12, "middle"), (0, "end")):
        parts.append(Markup('<text x="{x:.0f}" y="{y}" font-size="11" text-anchor="{a}">{t}'
                            '</text>').format(x=x(now - hours * 3600), y=bottom + 14, a=anchor,
                                              t=f"{hours} h ago" if hours else "now"))
    for i, (key, label, colour) in enumerate(series):
        coords = " ".join(f"{x(p['time']):.1f},{y(p.get(key, 0)):.1f}" for p in points)
        total = sum(p.get(key, 0) for p in points)
        parts.append(Markup('<polyline id="chart-{k}" data-total="{n}" fill="none" '
                            'stroke="{c}" stroke-width="2" points="{pts}"/>').format(
                                k=key, n=total, c=colour, pts=coords))
        # A dot on every non-zero point: a line through one point draws nothing.
        parts.extend(Markup('<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{c}"/>').format(
            x=x(p["time"]), y=y(p[key]), c=colour) for p in points if p.get(key, 0))
        parts.append(Markup('<text x="{x}" y="{y}" font-size="12" fill="{c}">{label}: {n}</text>')
                     .format(x=left + i * 170, y=height - 6, c=colour, label=label, n=total))
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)
