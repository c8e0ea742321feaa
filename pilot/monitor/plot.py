"""A picture of a payload's memory and CPU use, as one self-contained SVG file.

Shifters and users open the job's log tarball in a browser; an SVG needs no plotting
library on the worker node (the pilot has no such dependency) and no viewer on their
side.  It is written by hand: two panels over wall time, memory (RSS, PSS, VMEM, swap,
in MB) and CPU (cores in use), with axes, tick labels and a legend.  Every value is
clamped to a finite range first, so a garbage sample (or a petabyte) cannot make the
file invalid; the title is escaped, so a job name cannot inject markup.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from pilot.monitor.sample import Sample
from pilot.util.files import write_text_atomically
from pilot.util.records import record

PLOT_NAME = "memory_monitor_plot.svg"

SVG_NAMESPACE = "http://www.w3.org/2000/svg"

WIDTH = 960
HEIGHT = 700
_LEFT = 80  # room for the y tick labels and the axis title
_PLOT_WIDTH = 720
_LEGEND_X = _LEFT + _PLOT_WIDTH + 20
_MEMORY_TOP, _MEMORY_HEIGHT = 70, 250
_CPU_TOP, _CPU_HEIGHT = 400, 210
_TICKS = 5
#: Beyond this many points per pixel column a series is thinned (keeping each column's extremes).
_POINTS_PER_COLUMN = 4
#: Values are clamped to +-this, far beyond anything real, so that arithmetic stays finite.
_LIMIT = 1e300

#: Memory series: Sample field, legend label, colour.
MEMORY_SERIES: tuple[tuple[str, str, str], ...] = (
    ("rss", "RSS", "#1f77b4"),
    ("pss", "PSS", "#ff7f0e"),
    ("vmem", "VMEM", "#2ca02c"),
    ("swap", "swap", "#d62728"),
)
CPU_SERIES: tuple[str, str, str] = ("cpu", "cores used", "#9467bd")

_SI_PREFIXES = ((24, "Y"), (21, "Z"), (18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k"))

# Characters XML 1.0 does not allow at all (escaping cannot help): removed from text.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _finite(value: float | int) -> float:
    """``value`` as a float within +-``_LIMIT`` (NaN as 0): arbitrary ints overflow floats."""
    try:
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number):
        return 0.0
    return max(-_LIMIT, min(_LIMIT, number))


def _text(value: str) -> str:
    """``value`` safe as XML character data or attribute value."""
    return html.escape(_NOT_XML.sub("", value), quote=True)


def cores_used(samples: Sequence[Sample]) -> list[tuple[float, float]]:
    """(wall time, cores in use) between consecutive samples: d(utime + stime) / d(wtime).

    Plotted at the end of each interval.  Intervals without elapsed wall time are
    skipped, and a CPU counter that went down (a lost process) counts as no use rather
    than negative use.
    """
    ordered = sorted(samples, key=lambda sample: _finite(sample.wtime))
    points: list[tuple[float, float]] = []
    for before, after in zip(ordered, ordered[1:], strict=False):
        elapsed = _finite(after.wtime) - _finite(before.wtime)
        if elapsed <= 0:
            continue
        used = _finite(after.utime) + _finite(after.stime) - _finite(before.utime) - _finite(before.stime)
        points.append((_finite(after.wtime), _finite(max(0.0, used) / elapsed)))
    return points


@record(frozen=True)
class _Scale:
    """A linear axis from ``low`` to ``high`` (data units) with its tick values."""

    low: float
    high: float
    ticks: tuple[float, ...]

    def fraction(self, value: float) -> float:
        return (value - self.low) / (self.high - self.low)


def _nice_scale(low: float, high: float) -> _Scale:
    """An axis covering ``low``..``high`` with about ``_TICKS`` steps of 1, 2, 2.5 or 5 x 10^n."""
    if not high - low > abs(high) * 1e-12 + 1e-12:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / _TICKS
    magnitude = math.pow(10.0, math.floor(math.log10(raw)))
    step = magnitude * 10
    for multiple in (1.0, 2.0, 2.5, 5.0):
        if multiple * magnitude >= raw:
            step = multiple * magnitude
            break
    first = math.floor(low / step)
    last = math.ceil(high / step)
    ticks = tuple(index * step for index in range(first, last + 1))
    return _Scale(ticks[0], ticks[-1], ticks)


def _label(value: float) -> str:
    """A short tick label: 3 significant digits, SI prefixes from ten thousand on."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude < 1e4:
        return f"{value:.4g}"
    if magnitude >= 1e27:  # beyond the prefixes: plain scientific notation
        return f"{value:.3g}"
    for exponent, prefix in _SI_PREFIXES:
        if magnitude >= 10.0**exponent:
            return f"{value / 10.0**exponent:.4g}{prefix}"
    return f"{value:.4g}"


def _time_unit(span: float) -> tuple[float, str]:
    """Seconds per unit and its name, for a wall time axis spanning ``span`` seconds."""
    if span >= 3 * 86400:
        return 86400.0, "d"
    if span >= 3 * 3600:
        return 3600.0, "h"
    if span >= 3 * 60:
        return 60.0, "min"
    return 1.0, "s"


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """At most a few points per pixel column: each column's first, lowest, highest and last.

    A two-day job sampled every second would otherwise make a file of megabytes, and
    averaging would hide the peaks the plot is for.
    """
    if len(points) <= _POINTS_PER_COLUMN * _PLOT_WIDTH:
        return points
    columns: dict[int, list[int]] = {}
    for index, (x, _y) in enumerate(points):
        columns.setdefault(int(x), []).append(index)
    kept: set[int] = set()
    for indexes in columns.values():
        kept.update(
            (
                indexes[0],
                indexes[-1],
                min(indexes, key=lambda i: points[i][1]),
                max(indexes, key=lambda i: points[i][1]),
            )
        )
    return [points[index] for index in sorted(kept)]


def _polyline(series: str, label: str, colour: str, points: Iterable[tuple[float, float]]) -> str:
    coordinates = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return (
        f'<polyline class="series" data-series="{series}" fill="none" stroke="{colour}" '
        f'stroke-width="1.5" stroke-linejoin="round" points="{coordinates}">'
        f"<title>{_text(label)}</title></polyline>"
    )


def _panel(
    *,
    top: int,
    height: int,
    heading: str,
    y_title: str,
    x_scale: _Scale,
    x_unit: tuple[float, str],
    series: Sequence[tuple[str, str, str, list[tuple[float, float]]]],
    has_data: bool,
) -> list[str]:
    """One panel: frame, grid, tick labels, series (data units in, pixels out) and legend."""
    highest = max((y for *_, points in series for _x, y in points), default=0.0) if has_data else 0.0
    y_scale = _nice_scale(0.0, max(highest, 0.0))
    bottom = top + height
    right = _LEFT + _PLOT_WIDTH
    seconds, unit = x_unit

    def x_pixel(wtime: float) -> float:
        return _LEFT + x_scale.fraction(wtime / seconds) * _PLOT_WIDTH

    def y_pixel(value: float) -> float:
        return bottom - y_scale.fraction(value) * height

    parts = [
        f'<g class="panel" data-panel="{_text(heading)}">',
        f'<text x="{_LEFT}" y="{top - 10}" font-size="14" font-weight="bold">{_text(heading)}</text>',
    ]
    for tick in y_scale.ticks:
        y = y_pixel(tick)
        parts.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<line x1="{_LEFT - 5}" y1="{y:.1f}" x2="{_LEFT}" y2="{y:.1f}" stroke="#444444"/>')
        parts.append(
            f'<text class="tick" x="{_LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{_text(_label(tick))}</text>'
        )
    for tick in x_scale.ticks:
        x = _LEFT + x_scale.fraction(tick) * _PLOT_WIDTH
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#f0f0f0"/>')
        parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="#444444"/>')
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{_text(_label(tick))}</text>'
        )
    # The frame goes over the grid lines, which would otherwise hide its edges.
    parts.append(
        f'<rect x="{_LEFT}" y="{top}" width="{_PLOT_WIDTH}" height="{height}" fill="none" stroke="#444444"/>'
    )
    parts.append(
        f'<text x="{_LEFT + _PLOT_WIDTH / 2:.1f}" y="{bottom + 36}" text-anchor="middle">'
        f"wall time [{unit}]</text>"
    )
    middle = top + height / 2
    parts.append(
        f'<text x="{_LEFT - 58}" y="{middle:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 {_LEFT - 58} {middle:.1f})">{_text(y_title)}</text>'
    )
    if has_data:
        for name, label, colour, points in series:
            pixels = _thin([(x_pixel(x), y_pixel(y)) for x, y in points])
            parts.append(_polyline(name, label, colour, pixels))
    else:
        parts.append(
            f'<text class="no-data" x="{_LEFT + _PLOT_WIDTH / 2:.1f}" y="{middle:.1f}" '
            f'text-anchor="middle" font-size="16" fill="#888888">no data</text>'
        )
    for index, (_name, label, colour, _points) in enumerate(series):
        y = top + 12 + index * 20
        parts.append(
            f'<line x1="{_LEGEND_X}" y1="{y}" x2="{_LEGEND_X + 24}" y2="{y}" stroke="{colour}" stroke-width="3"/>'
        )
        parts.append(f'<text class="legend" x="{_LEGEND_X + 30}" y="{y + 4}">{_text(label)}</text>')
    parts.append("</g>")
    return parts


def render_svg(samples: Sequence[Sample], title: str) -> str:
    """The SVG document (a string) for ``samples``, headed by ``title``.

    With fewer than two samples there is nothing to draw a line through (and no CPU
    rate): the panels are drawn empty, saying "no data".
    """
    ordered = sorted(samples, key=lambda sample: _finite(sample.wtime))
    has_data = len(ordered) >= 2
    times = [_finite(sample.wtime) for sample in ordered] if has_data else [0.0, 1.0]
    x_unit = _time_unit(max(times) - min(times))
    x_scale = _nice_scale(min(times) / x_unit[0], max(times) / x_unit[0])

    memory = [
        (field, label, colour, [(_finite(s.wtime), _finite(getattr(s, field)) / 1024) for s in ordered])
        for field, label, colour in MEMORY_SERIES
    ]
    cpu_field, cpu_label, cpu_colour = CPU_SERIES
    cpu = [(cpu_field, cpu_label, cpu_colour, cores_used(ordered))]

    parts = [
        f'<svg xmlns="{SVG_NAMESPACE}" version="1.1" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f"<title>{_text(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text class="title" x="{WIDTH / 2:.0f}" y="28" text-anchor="middle" font-size="16" '
        f'font-weight="bold">{_text(title)}</text>',
    ]
    for top, height, heading, y_title, series in (
        (_MEMORY_TOP, _MEMORY_HEIGHT, "Memory", "memory [MB]", memory),
        (_CPU_TOP, _CPU_HEIGHT, "CPU", "CPU [cores]", cpu),
    ):
        parts += _panel(
            top=top,
            height=height,
            heading=heading,
            y_title=y_title,
            x_scale=x_scale,
            x_unit=x_unit,
            series=series,
            has_data=has_data,
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_plot(path: Path, samples: Sequence[Sample], title: str) -> None:
    """Render and write the plot atomically (a reader never sees half a file)."""
    write_text_atomically(path, render_svg(samples, title))
