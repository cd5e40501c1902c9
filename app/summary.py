"""Human summary tables of a job's results, for the terminal (CLI and demo)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from rich.table import Table

from search.outputs import PointRecord

__all__ = ["frontier_table", "sensitivity_table"]

# The metric shown beside the error, per task family, in order of preference.
_HEADLINE = ("accuracy", "agreement", "perplexity", "cosine", "sqnr_db")


def _headline(metrics: dict[str, float]) -> str:
    for key in _HEADLINE:
        if key in metrics:
            return f"{key} {metrics[key]:.4g}"
    return ""


def frontier_table(points: Sequence[PointRecord], uniform: Sequence[PointRecord]) -> Table:
    """Frontier points (smallest first), then the uniform-format baselines, dimmed."""
    table = Table("plan", "MB", "bpw", "calib err", "held-out err", "held-out",
                  title="Pareto frontier (held-out: data the search never saw)")
    for p in points:
        table.add_row(p.plan_id or "", f"{p.total_bytes / 1e6:.3f}", f"{p.bpw:.3f}",
                      f"{p.calibration['error']:.4g}", f"{p.holdout['error']:.4g}",
                      _headline(p.holdout))
    for p in uniform:
        table.add_row(p.plan_id or p.source, f"{p.total_bytes / 1e6:.3f}", f"{p.bpw:.3f}",
                      f"{p.calibration['error']:.4g}", f"{p.holdout['error']:.4g}",
                      _headline(p.holdout), style="dim")
    return table


def sensitivity_table(table: pd.DataFrame, *, top: int = 5) -> Table:
    """The most and least sensitive layers, ranked by their error in the smallest format,
    with their error in every format (columns from smallest to largest)."""
    formats = (table.groupby("format")["bytes"].sum().sort_values().index.tolist())
    wide = table.pivot_table(index="layer", columns="format", values="error", aggfunc="first")
    ranked = wide.sort_values(formats[0], ascending=False, na_position="last")
    shown = ranked.index.tolist()
    if len(shown) > 2 * top:
        shown = shown[:top] + [None] + shown[-top:]
    out = Table("rank", "layer", *formats,
                title=f"Layer sensitivity (error; ranked by {formats[0]}, most sensitive first)")
    for name in shown:
        if name is None:
            out.add_row("…", "…", *["" for _ in formats])
            continue
        rank = ranked.index.get_loc(name) + 1
        out.add_row(str(rank), str(name),
                    *[("" if pd.isna(ranked.at[name, f]) else f"{ranked.at[name, f]:.3g}")
                      for f in formats])
    return out
