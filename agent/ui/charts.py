"""Line charts as numbers for an inline SVG the template draws: no JavaScript, nothing fetched.

`line_chart` maps series of (x, y) points into a fixed view box and returns the polyline point
strings, the axis ranges and a few tick labels. Only numbers and the caller's labels come out; the
template escapes the labels like any other text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WIDTH, HEIGHT = 560, 180
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 26
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")


@dataclass(frozen=True)
class Series:
    label: str
    points: str  # "x,y x,y ..." in view-box coordinates
    colour: str
    last: str  # the last y value, formatted


@dataclass(frozen=True)
class Chart:
    title: str
    series: list[Series]
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom: int = HEIGHT - BOTTOM
    right: int = WIDTH - RIGHT
    top: int = TOP


def _format(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def line_chart(
    title: str, series: dict[str, list[tuple[float, float]]], x_labels: dict[float, str] | None = None
) -> Chart | None:
    """The chart of `series` ({label: [(x, y)]}); None when no point is finite."""
    finite = {
        label: [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)] for label, points in series.items()
    }
    everything = [point for points in finite.values() for point in points]
    if not everything:
        return None
    xs, ys = [x for x, _ in everything], [y for _, y in everything]
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    if x_high == x_low:
        x_high = x_low + 1
    if y_high == y_low:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def position(x: float, y: float) -> tuple[float, float]:
        return (
            LEFT + (x - x_low) / (x_high - x_low) * plot_width,
            TOP + (1 - (y - y_low) / (y_high - y_low)) * plot_height,
        )

    drawn = []
    for index, (label, points) in enumerate(finite.items()):
        if not points:
            continue
        coordinates = " ".join(f"{px:.1f},{py:.1f}" for px, py in (position(x, y) for x, y in points))
        drawn.append(Series(label, coordinates, COLOURS[index % len(COLOURS)], _format(points[-1][1])))
    y_ticks = [(position(x_low, value)[1], _format(value)) for value in (y_low, (y_low + y_high) / 2, y_high)]
    if x_labels:
        x_ticks = [(position(x, y_low)[0], text) for x, text in x_labels.items()]
    else:
        x_ticks = [(position(value, y_low)[0], _format(value)) for value in (x_low, (x_low + x_high) / 2, x_high)]
    return Chart(title=title, series=drawn, x_ticks=x_ticks, y_ticks=y_ticks)
