"""The HTML report of a finished job: one self-contained page a person can open offline.

A frontier is judged by looking at it: where the uniform formats sit, how much a mixed plan
saves at equal quality, which layers keep their bits. The page draws the size/quality frontier
as inline SVG (Python computes every coordinate, so it renders without JavaScript), a
layers x plans precision heatmap and the selected plan's layer table (built by a small inline
script from the plans embedded as JSON), the sensitivity table, and a link to every download.
No CDN, no external CSS or JS: the file works from a downloaded folder and from the API alike.

Every string from the job (model refs, layer names, formats) is escaped with
:func:`html.escape`; the embedded JSON escapes ``<`` so no value can close its script tag.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bitplan.search.budgets import Budget
from bitplan.search.plans import FrontierFile, FrontierPoint, Plan, read_frontier, read_plan
from bitplan.sensitivity.errors import InputError

__all__ = ["REPORT_NAME", "render_report"]

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
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
# Plot geometry in SVG user units; the SVG scales to the page width.
_W, _H = 820, 440
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 24, 20, 56
# Log axis once the errors span more than two decades: a linear axis would flatten them all.
_LOG_SPAN = 100.0


@dataclass
class _Job:
    """What the report shows, read from a job folder."""

    frontier: FrontierFile  # its points smallest first: the plot's line and the tables' order
    plans: dict[str, Plan]  # plan_id -> plan, for the points whose plan file exists
    budget: tuple[float, str] | None  # the budget in total bytes and its label, when placeable
    sensitivity: pd.DataFrame | None
    extra_files: list[str]  # downloadable files present besides the plans


def _load(job_dir: Path) -> _Job:
    frontier = read_frontier(job_dir / "frontier.json")
    frontier.points = sorted(frontier.points, key=lambda p: p.total_bytes)
    plans = {}
    for point in frontier.points + frontier.uniform:
        if point.plan and (job_dir / point.plan).is_file():
            plans[point.plan_id] = read_plan(job_dir / point.plan)
    sens_path = job_dir / "sensitivity.csv"
    sensitivity = pd.read_csv(sens_path) if sens_path.is_file() else None
    if sensitivity is not None and not {"layer", "format", "error"} <= set(sensitivity.columns):
        raise InputError(f"{sens_path} needs the columns layer, format, error")
    extra = [
        name
        for name in ("frontier.json", "frontier.csv", "sensitivity.csv", "layers.json")
        if (job_dir / name).is_file()
    ]
    budget = _budget_total(frontier.budget, next(iter(plans.values()), None))
    return _Job(
        frontier=frontier, plans=plans, budget=budget, sensitivity=sensitivity, extra_files=extra
    )


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _holdout_error(point: FrontierPoint) -> float:
    return float(point.metrics.get("holdout", {}).get("error", math.nan))


def _mb(nbytes: float) -> float:
    return nbytes / 1e6  # MB = 10^6 bytes, the unit budgets like "60MB" use


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e3:,.1f} kB" if nbytes < 1e6 else f"{_mb(nbytes):,.2f} MB"


def _num(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3g}"


# --- the frontier plot (inline SVG) -------------------------------------------------------------


def _nice_step(span: float, count: int) -> float:
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


class _Axis:
    """Maps data values to SVG coordinates, linear or log10, and picks readable ticks."""

    def __init__(
        self, values: list[float], lo_px: float, hi_px: float, *, log: bool, from_zero: bool = False
    ) -> None:
        self.log, self.lo_px, self.hi_px = log, lo_px, hi_px
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
        return self.lo_px + (v - self.lo) / (self.hi - self.lo) * (self.hi_px - self.lo_px)

    def ticks(self) -> list[tuple[float, str]]:
        if self.log:
            return [(10.0**e, f"1e{e}") for e in range(int(self.lo), int(self.hi) + 1)]
        count = round((self.hi - self.lo) / self.step)
        return [
            (self.lo + i * self.step, f"{self.lo + i * self.step:.4g}") for i in range(count + 1)
        ]


def _budget_total(budget: dict[str, Any] | None, plan: Plan | None) -> tuple[float, str] | None:
    """The budget as total bytes (the plot's x) and its label, when it can be placed."""
    if budget is None or plan is None:
        return None
    kind, value = budget["kind"], float(budget["value"])
    numel = sum({lay.group: lay.numel for lay in plan.layers}.values())
    parsed = Budget(kind=kind, value=value, text=str(value))
    cap = parsed.planned_cap(
        planned_numel=numel,
        unplanned_bytes=plan.totals.unplanned_bytes,
        fp16_bytes=plan.totals.fp16_bytes,
    )
    label = {"bpw": f"{value:g} bpw", "bytes": _size(value), "ratio": f"{value:g}x fp16"}[kind]
    return cap + plan.totals.unplanned_bytes, f"budget {label}"


def _plot_svg(job: _Job) -> str:
    points, budget = job.frontier.points, job.budget
    shown = [p for p in points + job.frontier.uniform if not math.isnan(_holdout_error(p))]
    if not shown:
        return '<p class="empty">No measured points to plot.</p>'
    xs = [_mb(p.total_bytes) for p in shown] + ([_mb(budget[0])] if budget else [])
    ys = [_holdout_error(p) for p in shown]
    positive = [y for y in ys if y > 0]
    log = bool(positive) and max(positive) / min(positive) > _LOG_SPAN
    floor = min(positive) if log else 0.0  # on a log axis an error of 0 sits on the bottom
    x = _Axis(xs, _LEFT, _W - _RIGHT, log=False)
    y = _Axis([max(v, floor) for v in ys], _H - _BOTTOM, _TOP, log=log, from_zero=True)

    def xy(p: FrontierPoint) -> tuple[float, float]:
        return x(_mb(p.total_bytes)), y(max(_holdout_error(p), floor))

    out = [
        f'<svg id="frontier-plot" viewBox="0 0 {_W} {_H}" role="img" '
        'aria-label="Pareto frontier: total size against held-out error">'
    ]
    for value, label in x.ticks():
        px = x(value)
        out.append(
            f'<line class="grid" x1="{px:.1f}" x2="{px:.1f}" y1="{_TOP}" '
            f'y2="{_H - _BOTTOM}"/><text class="tick" x="{px:.1f}" '
            f'y="{_H - _BOTTOM + 18}" text-anchor="middle">{_esc(label)}</text>'
        )
    for value, label in y.ticks():
        py = y(value)
        out.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{py:.1f}" '
            f'y2="{py:.1f}"/><text class="tick" x="{_LEFT - 8}" y="{py + 4:.1f}" '
            f'text-anchor="end">{_esc(label)}</text>'
        )
    out.append(
        f'<text class="axis" x="{(_LEFT + _W - _RIGHT) / 2}" y="{_H - 12}" '
        'text-anchor="middle">total size (MB)</text>'
        f'<text class="axis" transform="translate(18 {(_TOP + _H - _BOTTOM) / 2}) '
        f'rotate(-90)" text-anchor="middle">held-out error{" (log)" if log else ""}'
        "</text>"
    )
    if budget is not None:
        bx = x(_mb(budget[0]))
        out.append(
            f'<line class="budget" x1="{bx:.1f}" x2="{bx:.1f}" y1="{_TOP}" '
            f'y2="{_H - _BOTTOM}"/><text class="budget-label" x="{bx - 6:.1f}" '
            f'y="{_TOP + 14}" text-anchor="end">{_esc(budget[1])}</text>'
        )
    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in map(xy, points) if not math.isnan(b))
    out.append(f'<polyline class="frontier" points="{line}"/>')
    for p in job.frontier.uniform:
        if math.isnan(_holdout_error(p)):
            continue
        px, py = xy(p)
        name = p.source.partition(":")[2] or p.plan_id
        out.append(
            f'<g class="pt uniform" data-plan="{_esc(p.plan_id)}"><title>'
            f'{_esc(_tooltip(p))}</title><rect x="{px - 5:.1f}" y="{py - 5:.1f}" '
            f'width="10" height="10" transform="rotate(45 {px:.1f} {py:.1f})"/>'
            f'<text x="{px + 9:.1f}" y="{py - 8:.1f}">{_esc(name)}</text></g>'
        )
    for p in points:
        if not math.isnan(_holdout_error(p)):
            px, py = xy(p)
            out.append(
                f'<g class="pt point" data-plan="{_esc(p.plan_id)}"><title>'
                f'{_esc(_tooltip(p))}</title><circle cx="{px:.1f}" cy="{py:.1f}" '
                'r="6"/></g>'
            )
    out.append("</svg>")
    return "".join(out)


def _tooltip(p: FrontierPoint) -> str:
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in p.metrics.get("holdout", {}).items())
    return f"{p.plan_id} ({p.source}): {_size(p.total_bytes)}, {p.bpw:.2f} bpw; held-out {metrics}"


# --- tables -------------------------------------------------------------------------------------


def _sensitivity_html(job: _Job, layer_order: list[str]) -> str:
    table = job.sensitivity
    if table is None or table.empty:
        return '<p class="empty">This job has no sensitivity table.</p>'
    ranked = table.groupby("format")["bytes"].sum() if "bytes" in table else None
    formats = (
        list(ranked.sort_values(ascending=False).index)
        if ranked is not None
        else sorted(table["format"].unique())
    )
    grid = table.pivot_table(index="layer", columns="format", values="error", aggfunc="first")
    layers = [n for n in layer_order if n in grid.index] + sorted(
        set(grid.index) - set(layer_order)
    )
    positive = grid.to_numpy()[grid.to_numpy() > 0]
    lo, hi = (math.log10(positive.min()), math.log10(positive.max())) if positive.size else (0, 1)
    head = "".join(f"<th>{_esc(f)}</th>" for f in formats)
    rows = []
    for layer in layers:
        cells = []
        for fmt in formats:
            err = grid.at[layer, fmt] if fmt in grid.columns else math.nan
            # Shade by log error within the table's range: the eye compares orders of magnitude.
            share = 0.0 if not err > 0 else (math.log10(err) - lo) / ((hi - lo) or 1.0)
            style = f"background:rgba(215,48,39,{0.06 + 0.8 * share:.2f})" if err > 0 else ""
            dark = " dark" if share > 0.6 else ""
            cells.append(
                f'<td class="num{dark}" style="{style}" data-layer="{_esc(layer)}" '
                f'data-format="{_esc(fmt)}">{_num(err)}</td>'
            )
        rows.append(f"<tr><th>{_esc(layer)}</th>{''.join(cells)}</tr>")
    return (
        f'<table id="sensitivity" class="grid-table"><thead><tr><th>layer</th>{head}</tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _href(links_base: str | None, file_name: str, api_path: str) -> str | None:
    """A file's link: relative in a job folder, the API path when served (None: not served)."""
    if links_base is None:
        return file_name
    return f"{links_base.rstrip('/')}{api_path}" if api_path else None


def _downloads_html(job: _Job, links_base: str | None) -> str:
    api = {"frontier.json": "/frontier", "sensitivity.csv": "/sensitivity"}
    files = [(name, _href(links_base, name, api.get(name, ""))) for name in job.extra_files]
    file_links = " ".join(f'<a class="file" href="{_esc(h)}">{_esc(n)}</a>' for n, h in files if h)
    rows = []
    for p in job.frontier.points + job.frontier.uniform:
        if p.plan_id not in job.plans:
            continue
        if links_base is None:
            links = [("JSON", p.plan)]
        else:
            base = f"{links_base.rstrip('/')}/plans/{p.plan_id}"
            links = [
                (label, f"{base}?format={fmt}")
                for label, fmt in (
                    ("JSON", "json"),
                    ("CSV", "csv"),
                    ("torchao", "torchao"),
                    ("llama.cpp", "llamacpp"),
                )
            ]
        anchors = " ".join(f'<a href="{_esc(h)}">{_esc(label)}</a>' for label, h in links)
        rows.append(
            f'<tr data-plan="{_esc(p.plan_id)}"><td><code>{_esc(p.plan_id)}</code></td>'
            f"<td>{_esc(p.source)}</td><td class=num>{_size(p.total_bytes)}</td>"
            f"<td class=num>{p.bpw:.2f}</td>"
            f"<td class=num>{_num(_holdout_error(p))}</td><td>{anchors}</td></tr>"
        )
    return (
        f'<p class="files">{file_links}</p><table id="downloads" class="grid-table">'
        "<thead><tr><th>plan</th><th>source</th><th>total size</th><th>bpw</th>"
        "<th>held-out error</th><th>download</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


# --- the embedded data and the page -------------------------------------------------------------


def _text_colour(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    # Rec. 709 luma: dark text on light cells, white on dark ones.
    return "#1b1f24" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else "#ffffff"


def _embedded(job: _Job) -> dict[str, Any]:
    plans = []
    for p in job.frontier.points + job.frontier.uniform:
        plan = job.plans.get(p.plan_id)
        if plan is None:
            continue
        plans.append(
            {
                "id": p.plan_id,
                "source": p.source,
                "total_bytes": p.total_bytes,
                "bpw": p.bpw,
                "uniform": p in job.frontier.uniform,
                "holdout": p.metrics.get("holdout", {}),
                "layers": [
                    [lay.name, lay.format, lay.bits, lay.bytes, lay.numel] for lay in plan.layers
                ],
            }
        )
    frontier = [p for p in plans if not p["uniform"]]
    best = min(frontier or plans, key=lambda p: p["holdout"].get("error", math.inf), default=None)
    sens: dict[str, dict[str, float]] = {}
    if job.sensitivity is not None:
        for row in job.sensitivity.itertuples(index=False):
            sens.setdefault(str(row.layer), {})[str(row.format)] = float(row.error)
    colours = {str(b): [c, _text_colour(c)] for b, c in BIT_COLOURS.items()}
    return {
        "plans": plans,
        "selected": best["id"] if best else None,
        "colours": colours,
        "sensitivity": sens,
    }


def _json_for_script(data: Any) -> str:
    # "<" and ">" as JSON escapes so no layer name can end the script element early.
    return (
        json.dumps(data, allow_nan=False, default=str)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )


def _finite(data: Any) -> Any:
    """NaN/inf (JSON has neither) become null."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return data


def _cards_html(job: _Job, data: dict[str, Any]) -> str:
    model = job.frontier.model
    best = next((p for p in data["plans"] if p["id"] == data["selected"]), None)
    budget = job.budget
    cards = [
        ("model", model.get("ref", "?"), f"sha256 {model.get('sha256', '')[:12]}"),
        (
            "budget",
            budget[1].removeprefix("budget ") if budget else "none",
            f"at most {_size(budget[0])} in total" if budget else "",
        ),
    ]
    if best is not None:
        plan = job.plans[best["id"]]
        holdout = best["holdout"]
        # Two task metrics say enough on a card; the *_ref values are the fp model's own.
        shown = ", ".join(
            f"{k} {v:.4g}" for k, v in holdout.items() if k != "error" and not k.endswith("_ref")
        )
        cards += [
            (
                "best plan (held-out)",
                best["id"],
                f"error {_num(holdout.get('error', math.nan))}; {shown}",
            ),
            (
                "size",
                _size(best["total_bytes"]),
                f"{best['bpw']:.2f} bpw, {plan.totals.ratio_vs_fp16:.1%} of fp16",
            ),
        ]
    cards.append(
        (
            "frontier",
            f"{len(job.frontier.points)} points",
            f"{len(job.frontier.uniform)} uniform baselines",
        )
    )
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{_esc(k)}</div><div class="v">{_esc(v)}</div>'
            f'<div class="s">{_esc(s)}</div></div>'
            for k, v, s in cards
        )
        + "</div>"
    )


def _bits_legend(job: _Job) -> str:
    used = sorted({lay.bits for plan in job.plans.values() for lay in plan.layers})
    return (
        '<div class="legend-bits">bits: '
        + "".join(
            f'<span class="chip" style="background:{BIT_COLOURS.get(b, "#cccccc")};color:'
            f'{_text_colour(BIT_COLOURS.get(b, "#cccccc"))}">{b}</span>'
            for b in used
        )
        + "</div>"
    )


def _page(job: _Job, links_base: str | None) -> str:
    data = _finite(_embedded(job))
    layer_order = [row[0] for row in data["plans"][0]["layers"]] if data["plans"] else []
    ref = job.frontier.model.get("ref", "?")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bitplan report: {_esc(ref)}</title><style>{_CSS}</style></head>
<body><header><h1>bitplan report</h1><p>{_esc(ref)}: per-layer mixed-precision plans and
their measured size/quality frontier</p></header><main>
{_cards_html(job, data)}
<section id="frontier"><h2>Size/quality frontier</h2>
<p class="hint">Held-out error (lower is better; data the search never saw) against total
size. Click a point to inspect its plan.</p><p class="plot-legend"><span class="dot"></span>
mixed-precision frontier <span class="diamond"></span> uniform format <span class="dash"></span>
budget</p>{_plot_svg(job)}</section>
<section id="plan"><h2>Per-layer precision</h2>
<p class="hint">Rows are layers, columns the frontier's plans (smallest first); colour is
bits per weight. <label>Plan <select id="plan-select"></select></label></p>
{_bits_legend(job)}<div class="split"><div id="heatmap-wrap" class="scroll"></div>
<div><div id="plan-metrics"></div><div class="scroll" id="plan-detail"></div></div></div>
</section>
<section id="sensitivity-section"><h2>Sensitivity</h2>
<p class="hint">Error of each layer alone in each format (the solver's input); the selected
plan's choices are outlined.</p><div class="scroll">{_sensitivity_html(job, layer_order)}</div>
</section>
<section id="downloads-section"><h2>Downloads</h2>{_downloads_html(job, links_base)}</section>
</main><script type="application/json" id="report-data">{_json_for_script(data)}</script>
<script>{_JS}</script></body></html>
"""


def render_report(job_dir: Path | str, *, links_base: str | None = None) -> Path:
    """Write ``job_dir/report.html`` from the job's frontier, plans and sensitivity table.

    Links point at the files beside the report; with ``links_base`` (e.g. ``/v1/jobs/<id>``)
    they point at the API's download routes instead, plan exports included. Raises
    :class:`InputError` when ``job_dir`` holds no readable ``frontier.json``.
    """
    job_dir = Path(job_dir)
    job = _load(job_dir)
    path = job_dir / REPORT_NAME
    path.write_text(_page(job, links_base), encoding="utf-8")
    logger.info("wrote %s (%d plans)", path, len(job.plans))
    return path


_CSS = """
:root{--fg:#1b1f24;--muted:#57606a;--line:#d0d7de;--accent:#0b5cad;--hot:#e36209}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,
sans-serif;color:var(--fg);background:#f6f8fa}
header{background:#0d1b2a;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:21px;font-weight:650}header p{margin:4px 0 0;color:#c9d1d9}
main{max-width:1200px;margin:0 auto;padding:18px 32px 48px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 22px;
margin:16px 0}
h2{font-size:16px;margin:0 0 4px}.hint{color:var(--muted);margin:0 0 10px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.card .k{color:var(--muted);font-size:11px;text-transform:uppercase;letter-spacing:.05em}
.card .v{font-size:17px;font-weight:600;margin:2px 0;overflow-wrap:anywhere}
.card .s{color:var(--muted);font-size:12px;overflow-wrap:anywhere}
svg{width:100%;height:auto;font-size:12px;display:block}
.grid{stroke:#eaeef2}.tick{fill:var(--muted)}.axis{fill:var(--fg);font-weight:600}
.frontier{fill:none;stroke:var(--accent);stroke-width:2}
.point circle,.frontier-dot{fill:var(--accent);stroke:#fff;stroke-width:2}
.uniform rect,.uniform-mark{fill:#8c959f;stroke:#fff;stroke-width:1.5}
.uniform text{fill:var(--muted);font-size:11px}.pt{cursor:pointer}
.pt.selected circle{fill:var(--hot);r:8px}.pt.selected rect{fill:var(--hot)}
.budget{stroke:#cf222e;stroke-dasharray:5 4;stroke-width:1.5}.budget-label{fill:#cf222e}
.plot-legend{color:var(--muted);margin:0 0 4px}.plot-legend span{display:inline-block;
margin:0 6px 0 14px;vertical-align:middle}.plot-legend .dot{width:10px;height:10px;
border-radius:50%;background:var(--accent);margin-left:0}.plot-legend .diamond{width:9px;
height:9px;background:#8c959f;transform:rotate(45deg)}.plot-legend .dash{width:18px;
border-top:2px dashed #cf222e}
select{font:inherit;padding:2px 6px;margin-left:4px}
.legend-bits{margin:0 0 10px;color:var(--muted)}
.chip{display:inline-block;min-width:26px;text-align:center;border-radius:3px;
padding:0 5px;margin-left:4px;font-size:12px;font-weight:600}
.split{display:grid;grid-template-columns:minmax(0,auto) minmax(0,1fr);gap:24px;
align-items:start}
.scroll{overflow:auto;max-height:600px}
.grid-table{border-collapse:collapse;width:100%;font-size:13px}#heatmap{width:auto}
.grid-table th,.grid-table td{border-bottom:1px solid #eaeef2;padding:4px 8px;text-align:left;
white-space:nowrap}
.grid-table thead th{position:sticky;top:0;background:#fff;border-bottom:2px solid var(--line);
z-index:1}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.dark{color:#fff}
td.chosen{outline:2px solid var(--fg);outline-offset:-2px;font-weight:700}
tr.selected td{background:#fff8c5}
#plan-detail td:first-child,.grid-table tbody th{max-width:260px;overflow:hidden;
text-overflow:ellipsis}
#heatmap td.cell{text-align:center;font-size:11px;font-weight:600;cursor:pointer;
min-width:34px;border:1px solid #fff}
#heatmap th.col{font-size:11px;font-weight:500;color:var(--muted);cursor:pointer;
text-align:center}
#heatmap .sel{box-shadow:inset 0 0 0 2px var(--fg)}#heatmap th.sel{color:var(--fg);
font-weight:700}
.bar{display:inline-block;height:8px;background:var(--accent);border-radius:2px;
vertical-align:middle;margin-right:6px}
#plan-metrics{margin-bottom:8px}#plan-metrics span{display:inline-block;margin-right:14px}
.files a{margin-right:14px}.empty{color:var(--muted)}code{font-size:12px}
"""

_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var plans = {};
  data.plans.forEach(function (p) { plans[p.id] = p; });
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function colour(bits) { return data.colours[String(bits)] || ["#cccccc", "#1b1f24"]; }
  function fmt(v) { return v === null || v === undefined ? "\\u2013" : Number(v).toPrecision(3); }
  function size(b) { return b < 1e6 ? (b / 1e3).toFixed(1) + " kB" : (b / 1e6).toFixed(2) + " MB"; }
  function paint(td, bits) {
    var c = colour(bits); td.style.background = c[0]; td.style.color = c[1];
  }

  var columns = data.plans.filter(function (p) { return !p.uniform; });
  var layers = data.plans.length ? data.plans[0].layers.map(function (l) { return l[0]; }) : [];
  var table = el("table", "grid-table"); table.id = "heatmap";
  var head = el("tr"); head.appendChild(el("th", "", "layer \\\\ bpw"));
  columns.forEach(function (p) {
    var th = el("th", "col", p.bpw.toFixed(2)); th.dataset.plan = p.id; th.title = p.id;
    head.appendChild(th);
  });
  table.appendChild(el("thead")).appendChild(head);
  var body = table.appendChild(el("tbody"));
  layers.forEach(function (name, i) {
    var tr = body.appendChild(el("tr")); tr.dataset.layer = name;
    tr.appendChild(el("th", "", name));
    columns.forEach(function (p) {
      var l = p.layers[i], td = el("td", "cell", String(l[2]));
      td.dataset.plan = p.id; td.title = p.id + ": " + l[0] + " " + l[1]; paint(td, l[2]);
      tr.appendChild(td);
    });
  });
  document.getElementById("heatmap-wrap").appendChild(table);

  var select = document.getElementById("plan-select");
  data.plans.forEach(function (p) {
    var o = el("option", "", p.id + " (" + p.source + ", " + size(p.total_bytes) + ")");
    o.value = p.id; select.appendChild(o);
  });

  function detail(p) {
    var metrics = document.getElementById("plan-metrics"); metrics.textContent = "";
    metrics.appendChild(el("strong", "", p.id + ": "));
    metrics.appendChild(el("span", "", size(p.total_bytes) + ", " + p.bpw.toFixed(2) + " bpw"));
    Object.keys(p.holdout).forEach(function (k) {
      metrics.appendChild(el("span", "", "held-out " + k + " " + fmt(p.holdout[k])));
    });
    var planned = p.layers.reduce(function (s, l) { return s + l[3]; }, 0) || 1;
    var t = el("table", "grid-table"), hr = el("tr");
    ["layer", "format", "bits", "bytes", "share", "sensitivity"].forEach(function (h) {
      hr.appendChild(el("th", "", h));
    });
    t.appendChild(el("thead")).appendChild(hr);
    var tb = t.appendChild(el("tbody"));
    p.layers.forEach(function (l) {
      var tr = tb.appendChild(el("tr")); tr.appendChild(el("td", "", l[0]));
      var f = tr.appendChild(el("td", "", l[1])); paint(f, l[2]);
      tr.appendChild(el("td", "num", String(l[2])));
      tr.appendChild(el("td", "num", l[3].toLocaleString("en")));
      var share = tr.appendChild(el("td", "num")), bar = el("span", "bar");
      bar.style.width = Math.max(1, Math.round(60 * l[3] / planned)) + "px";
      share.appendChild(bar); share.appendChild(document.createTextNode(
        (100 * l[3] / planned).toFixed(1) + "%"));
      var s = (data.sensitivity[l[0]] || {})[l[1]];
      tr.appendChild(el("td", "num", fmt(s)));
    });
    var box = document.getElementById("plan-detail"); box.textContent = ""; box.appendChild(t);
  }

  function choose(id) {
    var p = plans[id]; if (!p) return;
    select.value = id;
    var chosen = {}; p.layers.forEach(function (l) { chosen[l[0]] = l[1]; });
    document.querySelectorAll("[data-plan]").forEach(function (n) {
      var whole = n.tagName === "TR" || n.tagName === "g";  // a download row, a plot point
      n.classList.toggle(whole ? "selected" : "sel", n.dataset.plan === id);
    });
    document.querySelectorAll("#sensitivity td[data-layer]").forEach(function (td) {
      td.classList.toggle("chosen", chosen[td.dataset.layer] === td.dataset.format);
    });
    detail(p);
  }
  select.addEventListener("change", function () { choose(select.value); });
  document.querySelectorAll("#frontier-plot .pt, #heatmap [data-plan]").forEach(function (n) {
    n.addEventListener("click", function () { choose(n.dataset.plan); });
  });
  if (data.selected) choose(data.selected);
})();
"""
