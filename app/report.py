"""The HTML report of a finished job: one self-contained page a person can open offline.

A frontier is judged by looking at it: where the uniform formats sit, how much a mixed plan
saves at equal quality, which layers keep their bits. The page is the Jinja2 template
``templates/report.html.j2`` with the package's ``static/report.css`` and ``static/report.js``
inlined (no CDN, no external file: it works from a downloaded folder and from the API alike).
This module only prepares data: it reads the job folder and computes every plot coordinate,
label position, table cell and link, so the plot, the layers x plans heatmap and the tables
render without JavaScript; the script adds the selected plan's layer table.

Autoescape is on, so every job string (model refs, layer names, formats) is escaped by the
template; the embedded JSON goes through Jinja2's ``tojson``, which escapes ``<``, ``>``, ``&``
and ``'`` so no value can close its script element.

Links: in a job folder (``links_base=None``) they are relative, and the plan exports (CSV,
torchao, llama.cpp) are written beside the report under ``exports/`` so the offline page
offers the same downloads as the served one, whose links are the API's export routes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup

from bitplan.search.budgets import Budget
from bitplan.search.exports import plan_to_csv, plan_to_llamacpp, plan_to_torchao
from bitplan.search.plans import FrontierFile, FrontierPoint, Plan, read_frontier, read_plan
from bitplan.sensitivity.errors import InputError

__all__ = ["EXPORTS_DIR", "REPORT_NAME", "render_report"]

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
EXPORTS_DIR = "exports"  # plan exports of an offline report, beside it
# One colour per bit width, warm = aggressive (few bits) to cool = safe (many bits), from
# ColorBrewer's colour-blind-safe RdYlBu scheme.
BIT_COLOURS = {
    2: "#d73027",
    3: "#f46d43",
    4: "#fdae61",
    5: "#fee090",
    6: "#e0f3f8",
    8: "#abd9e9",
    16: "#74add1",
    32: "#4575b4",
}
_UNKNOWN_COLOUR = "#cccccc"
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


@dataclass(frozen=True)
class _Export:
    """One download of a plan: the API's ``?format=`` and the offline file's suffix."""

    label: str
    api_format: str
    suffix: str
    render: Callable[[Plan], str] | None  # None: the plan file itself


_EXPORTS = (
    _Export("JSON", "json", ".json", None),
    _Export("CSV", "csv", ".csv", plan_to_csv),
    _Export("torchao", "torchao", ".torchao.json", plan_to_torchao),
    _Export("llama.cpp", "llamacpp", ".llamacpp.txt", plan_to_llamacpp),
)
# Job files and their API routes ("" : the API does not serve it, so a served report omits it).
_JOB_FILES = {
    "frontier.json": "/frontier",
    "frontier.csv": "",
    "sensitivity.csv": "/sensitivity",
    "layers.json": "",
}


# plan_id -> export format -> its text, or why that plan has no such export
_Texts = dict[str, dict[str, str | InputError]]


@dataclass
class _Job:
    """What the report shows, read from a job folder."""

    frontier: FrontierFile
    points: list[FrontierPoint]  # smallest first: the plot's line and the tables' order
    uniform: list[FrontierPoint]  # the uniform baselines
    plans: dict[str, Plan]  # plan_id -> plan, for the points whose plan file exists
    budget: tuple[float, str] | None  # the budget in total bytes and its label, when placeable
    sensitivity: pd.DataFrame | None
    files: list[str]  # downloadable job files present besides the plans

    @property
    def planned_points(self) -> list[FrontierPoint]:
        """Frontier points, then uniform ones, that have a plan file: the tables' rows."""
        return [p for p in self.points + self.uniform if p.plan_id in self.plans]

    def is_uniform(self, point: FrontierPoint) -> bool:
        return point.plan_id in {u.plan_id for u in self.uniform}


def _load(job_dir: Path) -> _Job:
    frontier = read_frontier(job_dir / "frontier.json")
    points = sorted(frontier.points, key=lambda p: p.total_bytes)
    plans = {
        p.plan_id: read_plan(job_dir / p.plan)
        for p in [*points, *frontier.uniform]
        if p.plan and (job_dir / p.plan).is_file()
    }
    sens_path = job_dir / "sensitivity.csv"
    sensitivity = pd.read_csv(sens_path) if sens_path.is_file() else None
    if sensitivity is not None and not {"layer", "format", "error"} <= set(sensitivity.columns):
        raise InputError(f"{sens_path} needs the columns layer, format, error")
    return _Job(
        frontier=frontier,
        points=points,
        uniform=list(frontier.uniform),
        plans=plans,
        budget=_budget_total(frontier.budget, next(iter(plans.values()), None)),
        sensitivity=sensitivity,
        files=[name for name in _JOB_FILES if (job_dir / name).is_file()],
    )


def _budget_total(budget: Mapping[str, Any] | None, plan: Plan | None) -> tuple[float, str] | None:
    """The budget as total bytes (the plot's x) and its label, when it can be placed."""
    if budget is None or plan is None:
        return None
    kind, value = budget["kind"], float(budget["value"])
    numel = sum({lay.group: lay.numel for lay in plan.layers}.values())
    cap = Budget(kind=kind, value=value, text=str(value)).planned_cap(
        planned_numel=numel,
        unplanned_bytes=plan.totals.unplanned_bytes,
        fp16_bytes=plan.totals.fp16_bytes,
    )
    label = {"bpw": f"{value:g} bpw", "bytes": _size(value), "ratio": f"{value:g}x fp16"}[kind]
    return cap + plan.totals.unplanned_bytes, f"budget {label}"


def _holdout_error(point: FrontierPoint) -> float:
    return float(point.metrics.get("holdout", {}).get("error", math.nan))


def _mb(nbytes: float) -> float:
    return nbytes / 1e6  # MB = 10^6 bytes, the unit budgets like "60MB" use


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e3:,.1f} kB" if nbytes < 1e6 else f"{_mb(nbytes):,.2f} MB"


def _num(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3g}"


def _text_colour(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    # Rec. 709 luma: dark text on light cells, white on dark ones.
    return "#1b1f24" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else "#ffffff"


def _bit_colours(bits: int) -> tuple[str, str]:
    """(background, text colour) of a bit width."""
    bg = BIT_COLOURS.get(bits, _UNKNOWN_COLOUR)
    return bg, _text_colour(bg)


# --- the frontier plot --------------------------------------------------------------------------


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
    return f"{p.plan_id} ({p.source}): {_size(p.total_bytes)}, {p.bpw:.2f} bpw; held-out {metrics}"


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


def _plot(job: _Job) -> _Plot | None:
    points, uniform = job.points, job.uniform
    shown = [p for p in points + uniform if not math.isnan(_holdout_error(p))]
    if not shown:
        return None
    budget = job.budget
    xs = [_mb(p.total_bytes) for p in shown] + ([_mb(budget[0])] if budget else [])
    ys = [_holdout_error(p) for p in shown]
    positive = [v for v in ys if v > 0]
    log = bool(positive) and max(positive) / min(positive) > _LOG_SPAN
    floor = min(positive) if log else 0.0  # on a log axis an error of 0 sits on the bottom
    x = _Axis(xs, _LEFT, _W - _RIGHT, log=False)
    y = _Axis([max(v, floor) for v in ys], _H - _BOTTOM, _TOP, log=log, from_zero=True)
    centres = {p.plan_id: (x(_mb(p.total_bytes)), y(max(_holdout_error(p), floor))) for p in shown}
    r = _MARK_R
    taken: list[_Box] = [(cx - r, cy - r, cx + r, cy + r) for cx, cy in centres.values()]
    budget_at = _Tick(x(_mb(budget[0])), budget[1]) if budget else None
    if budget_at is not None:  # its label sits left of the line's top: keep point labels off it
        right = budget_at.pos - 6
        taken.append((right - len(budget_at.label) * _CHAR_W, _TOP, right, _TOP + 18))
    markers = []
    for p in shown:  # frontier points first: they get the first pick of label spots
        cx, cy = centres[p.plan_id]
        is_uniform = job.is_uniform(p)
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


# --- heatmap, sensitivity, downloads ------------------------------------------------------------


def _layer_order(job: _Job) -> list[str]:
    """Layers as the first plan lists them (the model's order)."""
    first = next(iter(job.plans.values()), None)
    return [lay.name for lay in first.layers] if first is not None else []


def _heatmap(job: _Job) -> dict[str, Any]:
    """Columns: the frontier's plans, smallest first; rows: layers; a cell: bits and colours."""
    columns = [p for p in job.points if p.plan_id in job.plans]
    formats = {p.plan_id: {lay.name: lay for lay in job.plans[p.plan_id].layers} for p in columns}
    rows = []
    for name in _layer_order(job):
        cells = []
        for p in columns:
            lay = formats[p.plan_id].get(name)  # None: a plan without that layer (not planned)
            bg, fg = _bit_colours(lay.bits if lay else 0)
            fmt, bits = (lay.format.name, str(lay.bits)) if lay else ("not planned", "–")
            cells.append({"plan_id": p.plan_id, "bits": bits, "format": fmt, "bg": bg, "fg": fg})
        rows.append({"layer": name, "cells": cells})
    return {
        "columns": [{"plan_id": p.plan_id, "label": f"{p.bpw:.2f}"} for p in columns],
        "rows": rows,
    }


def _sensitivity(job: _Job) -> dict[str, Any] | None:
    """The error table, formats from most to fewest bytes, shaded by log error."""
    table = job.sensitivity
    if table is None or table.empty:
        return None
    if "bytes" in table:
        formats = list(table.groupby("format")["bytes"].sum().sort_values(ascending=False).index)
    else:
        formats = sorted(table["format"].unique())
    grid = table.pivot_table(index="layer", columns="format", values="error", aggfunc="first")
    order = _layer_order(job)
    layers = [n for n in order if n in grid.index] + sorted(set(grid.index) - set(order))
    values = grid.to_numpy()
    positive = values[values > 0]
    lo, hi = (math.log10(positive.min()), math.log10(positive.max())) if positive.size else (0, 1)
    rows = []
    for layer in layers:
        cells = []
        for fmt in formats:
            err = float(grid.at[layer, fmt]) if fmt in grid.columns else math.nan
            # Shade by log error within the table's range: the eye compares orders of magnitude.
            share = (math.log10(err) - lo) / ((hi - lo) or 1.0) if err > 0 else 0.0
            shade = f"background:rgba(215,48,39,{0.06 + 0.8 * share:.2f})" if err > 0 else ""
            cells.append({"format": fmt, "text": _num(err), "style": shade, "dark": share > 0.6})
        rows.append({"layer": layer, "cells": cells})
    return {"formats": formats, "rows": rows}


def _export_texts(plan: Plan) -> dict[str, str | InputError]:
    """Each export's text, or the reason the plan has none (llama.cpp names few models)."""
    texts: dict[str, str | InputError] = {}
    for export in _EXPORTS:
        if export.render is not None:
            try:
                texts[export.api_format] = export.render(plan)
            except InputError as error:
                texts[export.api_format] = error
    return texts


def _write_exports(job_dir: Path, job: _Job) -> _Texts:
    """Write ``exports/<plan_id><suffix>`` for every export a plan has, for an offline report."""
    folder = job_dir / EXPORTS_DIR
    folder.mkdir(exist_ok=True)
    texts = {plan_id: _export_texts(plan) for plan_id, plan in job.plans.items()}
    for plan_id, per_format in texts.items():
        for export in _EXPORTS:
            text = per_format.get(export.api_format)
            if isinstance(text, str):
                (folder / f"{plan_id}{export.suffix}").write_text(text, encoding="utf-8")
    return texts


def _downloads(job: _Job, links_base: str | None, texts: _Texts) -> list[dict[str, Any]]:
    """A row per plan: its figures and a link per export (href None: that export cannot be
    made, with the reason). The same exports offline and served; only the hrefs differ."""
    rows = []
    for p in job.planned_points:
        links = []
        for export in _EXPORTS:
            made = texts[p.plan_id].get(export.api_format, "")
            if isinstance(made, InputError):
                links.append({"label": export.label, "href": None, "reason": str(made)})
            elif links_base is None:
                href = (
                    p.plan if export.render is None else f"{EXPORTS_DIR}/{p.plan_id}{export.suffix}"
                )
                links.append({"label": export.label, "href": href})
            else:
                base = f"{links_base.rstrip('/')}/plans/{p.plan_id}"
                links.append({"label": export.label, "href": f"{base}?format={export.api_format}"})
        rows.append(
            {
                "plan_id": p.plan_id,
                "source": p.source,
                "size": _size(p.total_bytes),
                "bpw": f"{p.bpw:.2f}",
                "error": _num(_holdout_error(p)),
                "links": links,
            }
        )
    return rows


def _files(job: _Job, links_base: str | None) -> list[dict[str, str]]:
    """Job files: relative in a folder, the API route when served (files it does not serve are
    left out rather than linked dead)."""
    if links_base is None:
        return [{"label": name, "href": name} for name in job.files]
    base = links_base.rstrip("/")
    return [{"label": n, "href": f"{base}{_JOB_FILES[n]}"} for n in job.files if _JOB_FILES[n]]


# --- cards and the embedded data ----------------------------------------------------------------


def _best(job: _Job) -> FrontierPoint | None:
    """The preselected plan: the frontier point (else any point) with the lowest held-out error."""
    planned = job.planned_points
    frontier = [p for p in planned if not job.is_uniform(p)] or planned

    def key(p: FrontierPoint) -> float:
        error = _holdout_error(p)
        return math.inf if math.isnan(error) else error

    return min(frontier, key=key, default=None)


def _cards(job: _Job, best: FrontierPoint | None) -> list[dict[str, str]]:
    model, budget = job.frontier.model, job.budget
    cards = [
        {
            "key": "model",
            "value": model.get("ref", "?"),
            "sub": f"sha256 {model.get('sha256', '')[:12]}",
        },
        {
            "key": "budget",
            "value": budget[1].removeprefix("budget ") if budget else "none",
            "sub": f"at most {_size(budget[0])} in total" if budget else "",
        },
    ]
    if best is not None:
        holdout = best.metrics.get("holdout", {})
        # The *_ref values are the fp model's own: the card shows the plan's.
        shown = ", ".join(
            f"{k} {v:.4g}" for k, v in holdout.items() if k != "error" and not k.endswith("_ref")
        )
        ratio = job.plans[best.plan_id].totals.ratio_vs_fp16
        cards += [
            {
                "key": "best plan (held-out)",
                "value": best.plan_id,
                "sub": f"error {_num(_holdout_error(best))}; {shown}",
            },
            {
                "key": "size",
                "value": _size(best.total_bytes),
                "sub": f"{best.bpw:.2f} bpw, {ratio:.1%} of fp16",
            },
        ]
    cards.append(
        {
            "key": "frontier",
            "value": f"{len(job.points)} points",
            "sub": f"{len(job.uniform)} uniform baselines",
        }
    )
    return cards


def _finite(data: Any) -> Any:
    """NaN/inf (JSON has neither) become null."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return data


def _script_data(job: _Job, best: FrontierPoint | None) -> dict[str, Any]:
    """What report.js needs: every plan's layers, the sensitivity lookup, the colours."""
    plans = [
        {
            "id": p.plan_id,
            "source": p.source,
            "total_bytes": p.total_bytes,
            "bpw": p.bpw,
            "holdout": p.metrics.get("holdout", {}),
            "layers": [
                [lay.name, lay.format.name, lay.bits, lay.bytes, lay.numel]
                for lay in job.plans[p.plan_id].layers
            ],
        }
        for p in job.planned_points
    ]
    sens: dict[str, dict[str, float]] = {}
    if job.sensitivity is not None:
        for row in job.sensitivity.itertuples(index=False):
            sens.setdefault(str(row.layer), {})[str(row.format)] = float(row.error)
    data: dict[str, Any] = _finite(
        {
            "plans": plans,
            "selected": best.plan_id if best else None,
            "colours": {str(b): list(_bit_colours(b)) for b in BIT_COLOURS},
            "sensitivity": sens,
        }
    )
    return data


# --- the page -----------------------------------------------------------------------------------


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("bitplan.app", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails loudly, not as blank text
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _static(name: str) -> Markup:
    """A static file of the package, trusted text to inline in a style or script element."""
    return Markup(resources.files("bitplan.app").joinpath("static", name).read_text("utf-8"))


def _page(job: _Job, links_base: str | None, texts: _Texts) -> str:
    best = _best(job)
    used_bits = sorted({lay.bits for plan in job.plans.values() for lay in plan.layers})
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            model={"ref": job.frontier.model.get("ref", "?")},
            cards=_cards(job, best),
            plot=_plot(job),
            selected=best.plan_id if best else None,
            bit_chips=[
                {"bits": b, "bg": bg, "fg": fg} for b in used_bits for bg, fg in [_bit_colours(b)]
            ],
            heatmap=_heatmap(job),
            sensitivity=_sensitivity(job),
            files=_files(job, links_base),
            downloads=_downloads(job, links_base, texts),
            data=_script_data(job, best),
            css=_static("report.css"),
            js=_static("report.js"),
        )
    )


def render_report(job_dir: Path | str, *, links_base: str | None = None) -> Path:
    """Write ``job_dir/report.html`` from the job's frontier, plans and sensitivity table.

    Links point at the files beside the report, and every plan's exports are written to
    ``job_dir/exports/`` for them; with ``links_base`` (e.g. ``/v1/jobs/<id>``) they point at
    the API's download routes instead and nothing but the report is written. Raises
    :class:`InputError` when ``job_dir`` holds no readable ``frontier.json``.
    """
    job_dir = Path(job_dir)
    job = _load(job_dir)
    if links_base is None:
        texts = _write_exports(job_dir, job)
    else:
        texts = {plan_id: _export_texts(plan) for plan_id, plan in job.plans.items()}
    path = job_dir / REPORT_NAME
    path.write_text(_page(job, links_base, texts), encoding="utf-8")
    logger.info("wrote %s (%d plans)", path, len(job.plans))
    return path
