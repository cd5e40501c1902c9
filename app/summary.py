"""Human summary tables of a job's results, for the terminal (CLI and demo)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from search.outputs import PointRecord

__all__ = ["frontier_table"]

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
