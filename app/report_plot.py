"""The report's frontier plot: every coordinate, tick, marker and label position, computed here.

The page draws the plot from these numbers alone (``templates/frontier.svg.j2``), so it renders
without JavaScript and a test can check the geometry. The x axis is the total size in MB
(linear), the y axis the held-out error, linear or, once the errors span more than two decades,
log10. Point labels are placed greedily (frontier points first, then the uniform baselines):
each takes the first spot beside, above or below its marker that stays inside the plot and
clear of every marker and earlier label, with a leader line when it had to move further away;
a label with no free spot is left out (the marker's tooltip still names the plan). The text
metrics are those of Chromium with DejaVu Sans (see the constants). Linear ticks step by 1, 2 or
5 times a power of ten, after Heckbert, "Nice numbers for graph labels", Graphics Gems (1990).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bitplan.search.plans import FrontierPoint

__all__ = ["frontier_plot", "holdout_error", "size_text"]

# Plot geometry in SVG user units; the SVG scales to the page width.
_W, _H = 820, 440
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 24, 20, 56
# Log axis once the errors span more than two decades: a linear axis would flatten them all.
_LOG_SPAN = 100.0
# Point labels: 11-unit text is about 0.6 em a character wide, reaches 10.5 units above its
# baseline and 3.5 below (measured in Chromium with DejaVu Sans, plus 1 unit to spare); markers
# reach 9 units from their centre (the diamond's half-diagonal).
_CHAR_W, _ASCENT, _DESCENT, _MARK_R = 6.6, 10.5, 3.5, 9.0
_LINE = 14.0  # label line spacing: ascent + descent


def holdout_error(point: FrontierPoint) -> float:
    """The point's held-out error; NaN when it was not measured (then it is not plotted)."""
    return float(point.metrics.get("holdout", {}).get("error", math.nan))


def _mb(nbytes: float) -> float:
    return nbytes / 1e6  # MB = 10^6 bytes, the unit budgets like "60MB" use


def size_text(nbytes: float) -> str:
    """A size as people read it: kB below a megabyte, MB from there."""
    return f"{nbytes / 1e3:,.1f} kB" if nbytes < 1e6 else f"{_mb(nbytes):,.2f} MB"


def _nice_step(span: float, count: int) -> float:
    raw = span / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw)


class _Axis:
    """Maps data values to SVG coordinates, linear or log10, and picks readable ticks."""

    def __init__(
        self, values: list[float], lo_px: float, hi_px: float, *, log: bool, from_zero: bool = False
    ) -> None:
        self.log, self.lo_px, self.hi_px = log, lo_px, hi_px
        self.lo: float
        self.hi: float
        self.step = 1.0  # a decade on a log axis
        if log:
            lo, hi = math.log10(min(values)), math.log10(max(values))
            self.lo, self.hi = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
        else:
            lo, hi = (0.0 if from_zero else min(values)), max(values)
            pad = (hi - lo) * 0.06 or abs(hi) * 0.1 or 1.0  # room so no point sits on a border
            step = _nice_step(hi - lo + 2 * pad, 6)
            self.lo = math.floor((lo - (0 if from_zero else pad)) / step) * step
            if min(values) >= 0:  # sizes and errors: no axis into negative values
                self.lo = max(self.lo, 0.0)
            self.hi, self.step = math.ceil((hi + pad) / step) * step, step

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return round(
            self.lo_px + (v - self.lo) / (self.hi - self.lo) * (self.hi_px - self.lo_px), 1
        )

    def ticks(self) -> list[_Tick]:
        if self.log:
            return [_Tick(self(10.0**e), f"1e{e}") for e in range(int(self.lo), int(self.hi) + 1)]
        count = round((self.hi - self.lo) / self.step)
        values = [self.lo + i * self.step for i in range(count + 1)]
        return [_Tick(self(v), f"{v:.4g}") for v in values]


@dataclass(frozen=True)
class _Tick:
    pos: float
    label: str


@dataclass(frozen=True)
class _Label:
    text: str
    x: float
    y: float  # the text's baseline
    anchor: str  # SVG text-anchor
    leader: bool  # placed away from its marker: a line joins them


@dataclass(frozen=True)
class _Marker:
    plan_id: str
    x: float
    y: float
    uniform: bool
    tooltip: str
    label: _Label | None

    @property
    def diamond(self) -> str:
        r = _MARK_R
        x, y = self.x, self.y
        return f"M{x:.1f} {y - r:.1f}L{x + r:.1f} {y:.1f}L{x:.1f} {y + r:.1f}L{x - r:.1f} {y:.1f}Z"


@dataclass(frozen=True)
class _Plot:
    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    x_ticks: list[_Tick]
    y_ticks: list[_Tick]
    y_title: str
    budget: _Tick | None
    line: str
    markers: list[_Marker]  # frontier points first, uniform ones last: drawn on top


def _tooltip(p: FrontierPoint) -> str:
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in p.metrics.get("holdout", {}).items())
    size = size_text(p.total_bytes)
    return f"{p.plan_id} ({p.source}): {size}, {p.bpw:.2f} bpw; held-out {metrics}"


def _label_text(p: FrontierPoint, *, uniform: bool) -> str:
    """Uniform points by their format; frontier points by plan id, with bpw unless it says it."""
    if uniform:
        return p.source.partition(":")[2] or p.plan_id
    bpw = f"{p.bpw:.2f}"
    return p.plan_id if f"{bpw}bpw" in p.plan_id else f"{p.plan_id} · {bpw} bpw"


_Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _overlaps(a: _Box, b: _Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_label(text: str, x: float, y: float, taken: list[_Box]) -> _Label | None:
    """The first spot around (x, y) where the label stays in the plot and clear of every marker
    and earlier label: beside the marker, then just above or below it, then one line further
    with a leader line. None when there is none (the point's tooltip still names it)."""
    width = len(text) * _CHAR_W
    gap = _MARK_R + 3
    for dy in (0.0, -_LINE, _LINE, -2 * _LINE, 2 * _LINE):  # text middle minus marker centre
        for side in (1, -1):
            baseline = y + dy + 4  # lower-case letters and digits centre 4 units above it
            x0 = x + gap if side == 1 else x - gap - width
            box = (x0, baseline - _ASCENT, x0 + width, baseline + _DESCENT)
            inside = _LEFT <= box[0] and box[2] <= _W - _RIGHT
            inside = inside and _TOP <= box[1] and box[3] <= _H - _BOTTOM
            if inside and not any(_overlaps(box, t) for t in taken):
                taken.append(box)
                return _Label(
                    text=text,
                    x=round(x + gap * side, 1),
                    y=round(baseline, 1),
                    anchor="start" if side == 1 else "end",
                    leader=abs(dy) > _LINE,
                )
    return None


def frontier_plot(
    points: list[FrontierPoint],
    uniform: list[FrontierPoint],
    budget: tuple[float, str] | None,
) -> _Plot | None:
    """The plot of ``points`` (the frontier, smallest first: its line) and the ``uniform``
    baselines, with the ``budget`` (total bytes, label) as a vertical line; None when no point
    has a held-out error to place."""
    shown = [p for p in points + uniform if not math.isnan(holdout_error(p))]
    if not shown:
        return None
    uniform_ids = {u.plan_id for u in uniform}
    xs = [_mb(p.total_bytes) for p in shown] + ([_mb(budget[0])] if budget else [])
    ys = [holdout_error(p) for p in shown]
    positive = [v for v in ys if v > 0]
    log = bool(positive) and max(positive) / min(positive) > _LOG_SPAN
    floor = min(positive) if log else 0.0  # on a log axis an error of 0 sits on the bottom
    x = _Axis(xs, _LEFT, _W - _RIGHT, log=False)
    y = _Axis([max(v, floor) for v in ys], _H - _BOTTOM, _TOP, log=log, from_zero=True)
    centres = {p.plan_id: (x(_mb(p.total_bytes)), y(max(holdout_error(p), floor))) for p in shown}
    r = _MARK_R
    taken: list[_Box] = [(cx - r, cy - r, cx + r, cy + r) for cx, cy in centres.values()]
    budget_at = _Tick(x(_mb(budget[0])), budget[1]) if budget else None
    if budget_at is not None:  # its label sits left of the line's top: keep point labels off it
        right = budget_at.pos - 6
        taken.append((right - len(budget_at.label) * _CHAR_W, _TOP, right, _TOP + 18))
    markers = []
    for p in shown:  # frontier points first: they get the first pick of label spots
        cx, cy = centres[p.plan_id]
        is_uniform = p.plan_id in uniform_ids
        text = _label_text(p, uniform=is_uniform)
        markers.append(
            _Marker(
                plan_id=p.plan_id,
                x=cx,
                y=cy,
                uniform=is_uniform,
                tooltip=_tooltip(p),
                label=_place_label(text, cx, cy, taken),
            )
        )
    return _Plot(
        width=_W,
        height=_H,
        left=_LEFT,
        right=_W - _RIGHT,
        top=_TOP,
        bottom=_H - _BOTTOM,
        x_ticks=x.ticks(),
        y_ticks=y.ticks(),
        y_title="held-out error (log)" if log else "held-out error",
        budget=budget_at,
        line=" ".join(
            f"{centres[p.plan_id][0]:.1f},{centres[p.plan_id][1]:.1f}" for p in points if p in shown
        ),
        markers=markers,
    )
