"""The dashboard's plots, drawn on the server as inline SVG (no script, no chart library).

Each function takes what the board folded and returns SVG markup that scales to its
box (a viewBox; the stylesheet sets colours by class). Every mark carries a <title>, so
hovering it says the numbers it stands for.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from markupsafe import Markup, escape

from roam.control.dashboard.board import Evacuation, Finished

WIDTH, HEIGHT = 400, 230
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 26, 30
LABELLED = 12
"""Marks up to this many carry their value as text too (more would crowd the plot)."""


def ticks(high: float, count: int = 4) -> list[float]:
    """Round values from 0 to at least `high`, about `count` steps."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(at))


def _frame(body: list[str], label: str, y_ticks: list[float], y_of: float,
           x_labels: Sequence[tuple[float, str, str]], unit: str) -> Markup:
    """Axes, grid and labels around `body`; y_of is pixels per unit of y."""
    bottom = HEIGHT - BOTTOM
    parts = [f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(label)}">']
    for tick in y_ticks:
        y = bottom - tick * y_of
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/><text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{_number(tick)}</text>')
    parts.append(f'<text class="unit" x="{LEFT - 6}" y="{TOP - 12}" text-anchor="end">'
                 f'{escape(unit)}</text>')
    for x, text, anchor in x_labels:
        parts.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" '
                     f'text-anchor="{anchor}">{escape(text)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{bottom}" '
                 f'y2="{bottom}"/>')
    parts.extend(body)
    parts.append("</svg>")
    return Markup("".join(parts))


def _empty(text: str) -> Markup:
    return Markup(f'<div class="plot-empty">{escape(text)}</div>')


def downtime(history: Sequence[Finished]) -> Markup:
    """Downtime of each completed migration against when it ended."""
    done = [f for f in history if f.outcome.downtime_ms is not None]
    if not done:
        return _empty("No completed migration yet")
    first, last = done[0].at, done[-1].at
    span = max(last - first, 1.0)
    y_ticks = ticks(max(f.outcome.downtime_ms or 0 for f in done) * 1.1)
    y_of = (HEIGHT - BOTTOM - TOP) / y_ticks[-1]
    inner = WIDTH - LEFT - RIGHT - 24

    def x(at: float) -> float:
        return LEFT + 12 + (at - first) / span * inner if len(done) > 1 else LEFT + 12 + inner / 2

    body = []
    points = [(x(f.at), HEIGHT - BOTTOM - (f.outcome.downtime_ms or 0) * y_of, f) for f in done]
    if len(points) > 1:
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in points)
        body.append(f'<polyline class="line" points="{path}"/>')
    for px, py, f in points:
        body.append(f'<circle class="dot" cx="{px:.1f}" cy="{py:.1f}" r="4.5"><title>'
                    f'{escape(f.vm)} {escape(f.source)} → {escape(f.target)} at {clock(f.at)}: '
                    f'{f.outcome.downtime_ms:.0f} ms</title></circle>')
        if len(points) <= LABELLED:
            body.append(f'<text class="value" x="{px:.1f}" y="{py - 9:.1f}" '
                        f'text-anchor="middle">{f.outcome.downtime_ms:.0f}</text>')
    labels = ([(x(first), clock(first), "middle")] if len(done) == 1 else
              [(LEFT, clock(first), "start"), (WIDTH - RIGHT, clock(last), "end")])
    return _frame(body, "downtime per migration over time", y_ticks, y_of, labels, "ms")


def throughput(history: Sequence[Finished], bars: int = 16) -> Markup:
    """Average throughput of each of the last `bars` migrations (bytes over duration)."""
    done = [f for f in history if f.throughput is not None][-bars:]
    if not done:
        return _empty("No migration with a byte count yet")
    rates = [(f.throughput or 0) / 2**20 for f in done]
    y_ticks = ticks(max(rates) * 1.1)
    y_of = (HEIGHT - BOTTOM - TOP) / y_ticks[-1]
    slot = (WIDTH - LEFT - RIGHT) / max(len(done), 4)
    body, labels = [], []
    for i, (f, rate) in enumerate(zip(done, rates, strict=True)):
        height = rate * y_of
        left = LEFT + i * slot + slot * 0.2
        body.append(f'<rect class="bar" x="{left:.1f}" y="{HEIGHT - BOTTOM - height:.1f}" '
                    f'width="{slot * 0.6:.1f}" height="{height:.1f}" rx="2"><title>'
                    f'{escape(f.vm)} at {clock(f.at)}: {rate:.1f} MiB/s</title></rect>')
        labels.append((left + slot * 0.3, f.vm, "middle"))
        if len(done) <= LABELLED:
            body.append(f'<text class="value" x="{left + slot * 0.3:.1f}" '
                        f'y="{HEIGHT - BOTTOM - height - 5:.1f}" text-anchor="middle">'
                        f'{_number(rate)}</text>')
    return _frame(body, "throughput per migration", y_ticks, y_of, labels, "MiB/s")


def evacuation(drain: Evacuation) -> Markup:
    """When each VM of a drain arrived, against the time since the drain began (a spot
    notice's deadline drawn across it is **(planned)**: the control plane has no notices
    yet)."""
    if not drain.arrivals:
        return _empty(f"Draining {drain.node}: no VM moved yet")
    ends = [a.ended for a in drain.arrivals]
    horizon = max([*ends, drain.finished or 0]) - drain.started
    x_ticks = ticks(max(horizon, 1.0) * 1.05, 5)
    inner = WIDTH - LEFT - RIGHT - 14  # room for the last tick's label
    per_second = inner / x_ticks[-1]
    row = min(28.0, (HEIGHT - BOTTOM - TOP) / len(drain.arrivals))
    body = []
    for i, arrival in enumerate(drain.arrivals):
        y = TOP + i * row
        begin = (arrival.started or drain.started) - drain.started
        end = arrival.ended - drain.started
        kind = "bar" if arrival.ok else "bar failed"
        body.append(f'<text class="tick" x="{LEFT - 6}" y="{y + row / 2 + 4:.1f}" '
                    f'text-anchor="end">{escape(arrival.vm)}</text>'
                    f'<rect class="{kind}" x="{LEFT + begin * per_second:.1f}" '
                    f'y="{y + row * 0.2:.1f}" width="{max((end - begin) * per_second, 2):.1f}" '
                    f'height="{row * 0.6:.1f}" rx="2"><title>{escape(arrival.vm)}: '
                    f'{"arrived" if arrival.ok else "failed"} {end:.1f} s after the drain '
                    'began</title></rect>')
    labels = [(LEFT + t * per_second, f"{_number(t)} s") for t in x_ticks]
    if drain.finished is not None:
        fx = LEFT + (drain.finished - drain.started) * per_second
        body.append(f'<line class="finish" x1="{fx:.1f}" x2="{fx:.1f}" y1="{TOP - 8}" '
                    f'y2="{HEIGHT - BOTTOM}"/><text class="unit" x="{fx:.1f}" y="{TOP - 12}" '
                    'text-anchor="middle">drained</text>')
    body.append(f'<text class="unit" x="{WIDTH - RIGHT}" y="{HEIGHT - 2}" text-anchor="end">'
                'since the drain began</text>')
    parts = [f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="evacuation of {escape(drain.node)}">']
    for t in x_ticks:
        gx = LEFT + t * per_second
        parts.append(f'<line class="grid" x1="{gx:.1f}" x2="{gx:.1f}" y1="{TOP}" '
                     f'y2="{HEIGHT - BOTTOM}"/>')
    for lx, text in labels:
        parts.append(f'<text class="tick" x="{lx:.1f}" y="{HEIGHT - BOTTOM + 16}" '
                     f'text-anchor="middle">{escape(text)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT + inner}" y1="{HEIGHT - BOTTOM}" '
                 f'y2="{HEIGHT - BOTTOM}"/>')
    parts.extend(body)
    parts.append("</svg>")
    return Markup("".join(parts))
