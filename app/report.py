"""The HTML report of a finished job: one self-contained page a person can open offline.

A frontier is judged by looking at it: where the uniform formats sit, how much a mixed plan
saves at equal quality, which layers keep their bits. The page is the Jinja2 template
``templates/report.html.j2`` with the package's ``static/report.css`` and ``static/report.js``
inlined (no CDN, no external file: it works from a downloaded folder and from the API alike).
This module only prepares data: it reads the job folder and computes every table cell and link,
and :mod:`bitplan.app.report_plot` every plot coordinate and label position, so the plot, the
layers x plans heatmap and the tables render without JavaScript; the script adds the selected
plan's layer table.

Autoescape is on, so every job string (model refs, layer names, formats) is escaped by the
template; the embedded JSON goes through Jinja2's ``tojson``, which escapes ``<``, ``>``, ``&``
and ``'`` so no value can close its script element.

Links: in a job folder (``links_base=None``) they are relative, and the plan exports (those of
:data:`bitplan.search.exports.EXPORTS` that are not the plan file itself) are written beside the
report under ``exports/`` so the offline page offers the same downloads as the served one, whose
links are the API's export routes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup

from bitplan.app.report_plot import frontier_plot, holdout_error, size_text
from bitplan.search.budgets import Budget
from bitplan.search.exports import EXPORTS
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
    numel = sum({lay.tensor_key: lay.numel for lay in plan.layers}.values())
    cap = Budget(kind=kind, value=value, text=str(value)).planned_cap(
        planned_numel=numel,
        unplanned_bytes=plan.totals.unplanned_bytes,
        fp16_bytes=plan.totals.fp16_bytes,
    )
    label = {"bpw": f"{value:g} bpw", "bytes": size_text(value), "ratio": f"{value:g}x fp16"}[kind]
    return cap + plan.totals.unplanned_bytes, f"budget {label}"


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
    for export in EXPORTS.values():
        if export.render is not None:
            try:
                texts[export.name] = export.render(plan)
            except InputError as error:
                texts[export.name] = error
    return texts


def _write_exports(job_dir: Path, job: _Job) -> _Texts:
    """Write ``exports/<plan_id><suffix>`` for every export a plan has, for an offline report."""
    folder = job_dir / EXPORTS_DIR
    folder.mkdir(exist_ok=True)
    for stale in folder.iterdir():  # an earlier run's exports in a reused folder
        if stale.is_file():
            stale.unlink()
    texts = {plan_id: _export_texts(plan) for plan_id, plan in job.plans.items()}
    for plan_id, per_format in texts.items():
        for export in EXPORTS.values():
            text = per_format.get(export.name)
            if isinstance(text, str):
                (folder / f"{plan_id}{export.suffix}").write_text(text, encoding="utf-8")
    return texts


def _downloads(job: _Job, links_base: str | None, texts: _Texts) -> list[dict[str, Any]]:
    """A row per plan: its figures and a link per export (href None: that export cannot be
    made, with the reason). The same exports offline and served; only the hrefs differ."""
    rows = []
    for p in job.planned_points:
        links = []
        for export in EXPORTS.values():
            made = texts[p.plan_id].get(export.name, "")
            if isinstance(made, InputError):
                links.append({"label": export.label, "href": None, "reason": str(made)})
            elif links_base is None:
                href = (
                    p.plan if export.render is None else f"{EXPORTS_DIR}/{p.plan_id}{export.suffix}"
                )
                links.append({"label": export.label, "href": href})
            else:
                base = f"{links_base.rstrip('/')}/plans/{p.plan_id}"
                links.append({"label": export.label, "href": f"{base}?format={export.name}"})
        rows.append(
            {
                "plan_id": p.plan_id,
                "source": p.source,
                "size": size_text(p.total_bytes),
                "bpw": f"{p.bpw:.2f}",
                "error": _num(holdout_error(p)),
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
        error = holdout_error(p)
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
            "sub": f"at most {size_text(budget[0])} in total" if budget else "",
        },
    ]
    if best is not None:
        holdout = best.metrics.get("holdout", {})
        # The *_ref values are the fp model's own: the card shows the plan's.
        shown = ", ".join(
            f"{k} {v:.4g}" for k, v in holdout.items() if k != "error" and not k.endswith("_ref")
        )
        ratio = job.plans[best.plan_id].totals.ratio_vs_fp16
        # What the held-out figures measure (a job's frontier says; older ones do not).
        scope = (job.frontier.scope or {}).get("holdout")
        cards += [
            {
                "key": "best plan (held-out)",
                "value": best.plan_id,
                "sub": f"error {_num(holdout_error(best))}; {shown}"
                + (f"; measured {scope}" if scope else ""),
            },
            {
                "key": "size",
                "value": size_text(best.total_bytes),
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
            plot=frontier_plot(job.points, job.uniform, job.budget),
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
