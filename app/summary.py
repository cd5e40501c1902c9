"""Human summaries of a job's results, for the terminal (CLI and demo).

Counts are taken from the frontier file that was written, never re-counted another way, so what
a command says it wrote is what is on disk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    import pandas as pd

    from bitplan.search.plans import FrontierFile
    from bitplan.search.proxy_fit import ProxyGap

__all__ = [
    "fallback_note",
    "frontier_table",
    "plans_written",
    "proxy_gap_note",
    "sensitivity_table",
]

# The metric shown beside the error, per task family, in order of preference.
_HEADLINE = ("accuracy", "agreement", "perplexity", "cosine", "sqnr_db")
# Marks a layer that another method than the one asked for scored (see fallback_note).
FALLBACK_MARK = "†"


def _fallbacks(table: pd.DataFrame, *, method: str) -> dict[str, str]:
    """``{layer: method that scored it}`` for layers ``method`` could not score itself (the
    table's ``method`` column, e.g. ``fisher`` falls back to ``layer`` or ``weight`` for layers
    no gradient reaches); empty for a table without that column (a user-supplied one)."""
    if "method" not in table.columns:
        return {}
    by_layer = table.drop_duplicates("layer").set_index("layer")["method"]
    return {str(name): str(how) for name, how in by_layer.items() if how != method}


def fallback_note(table: pd.DataFrame, *, method: str) -> str | None:
    """``† fisher could not score 2 layers (no gradient reached them); scored instead by
    layer: pooler; by weight: unused (column 'method' of sensitivity.csv)``, or None when
    ``method`` scored every layer."""
    fallbacks = _fallbacks(table, method=method)
    if not fallbacks:
        return None
    by_method: dict[str, list[str]] = {}
    for name, how in fallbacks.items():
        by_method.setdefault(how, []).append(name)
    scored = "; ".join(f"by {how}: {', '.join(names)}" for how, names in by_method.items())
    layers, them = (
        ("1 layer", "it") if len(fallbacks) == 1 else (f"{len(fallbacks)} layers", "them")
    )
    reason = f" (no gradient reached {them})" if method == "fisher" else ""
    return (
        f"{FALLBACK_MARK} {method} could not score {layers}{reason}; scored instead {scored} "
        "(column 'method' of sensitivity.csv)"
    )


def _headline(metrics: dict[str, float]) -> str:
    for key in _HEADLINE:
        if key in metrics:
            return f"{key} {metrics[key]:.4g}"
    return ""


def frontier_table(frontier: FrontierFile) -> Table:
    """Frontier points (smallest first), then the uniform-format baselines, dimmed."""
    table = Table(title="Pareto frontier (held-out: data the search never saw)")
    # Plan ids are what `download`, `apply` and the API take: never truncated.
    table.add_column("plan", no_wrap=True)
    for name in ("source", "MB", "bpw", "calib err", "held-out err", "held-out"):
        table.add_column(name)
    for point in [*frontier.points, *frontier.uniform]:
        calib = point.metrics.get("calibration", {})
        holdout = point.metrics.get("holdout", {})
        table.add_row(
            point.plan_id,
            point.source.partition(":")[0],
            f"{point.total_bytes / 1e6:.3f}",
            f"{point.bpw:.3f}",
            f"{calib.get('error', float('nan')):.4g}",
            f"{holdout.get('error', float('nan')):.4g}",
            _headline(holdout),
            style="dim" if point in frontier.uniform else None,
        )
    if frontier.scope is not None:  # which figures ran the whole network
        table.caption = (
            f"calib/held-out: {frontier.scope.get('holdout', '?')}; "
            f"plans' predicted_error: {frontier.scope.get('predicted_error', '?')}"
        )
    return table


def plans_written(frontier: FrontierFile, plans_dir: Path, *, best_plan_id: str | None) -> str:
    """``5 frontier plans and 3 uniform baselines in DIR, plus best.json (a copy of ID)
    (9 files)``: what the writer put under ``plans/``, from the frontier file it wrote."""
    from bitplan.search.plans import BEST_PLAN_ID

    points, uniform = len(frontier.points), len(frontier.uniform)
    text = f"{points} frontier plans and {uniform} uniform baselines in {plans_dir}"
    if best_plan_id is not None:
        text += f", plus {BEST_PLAN_ID}.json (a copy of {best_plan_id})"
    return f"{text} ({points + uniform + (best_plan_id is not None)} files)"


def proxy_gap_note(gap: ProxyGap | None) -> str | None:
    """``proxy vs measured over 16 trials: measured/predicted 3.2x (median), rank correlation
    0.91; predictions off by 35% scaled, 12% corrected (groups)``, or None without a gap."""
    if gap is None or gap.trials == 0:
        return None

    def off(log_error: float) -> str:  # a median |log ratio| as a percentage off
        return "n/a" if math.isnan(log_error) else f"{math.expm1(log_error):.0%}"

    return (
        f"proxy vs measured over {gap.trials} trials: measured/predicted "
        f"{gap.median_ratio:.3g}x (median), rank correlation {gap.spearman:.2f}; predictions "
        f"off by {off(gap.scaled_error)} scaled, {off(gap.corrected_error)} corrected "
        f"({gap.correction})"
    )


def sensitivity_table(table: pd.DataFrame, *, method: str, top: int = 5) -> Table:
    """The most and least sensitive layers, ranked by their error in the smallest format,
    with their error in every format (columns from smallest to largest). Layers that
    ``method`` could not score carry a mark, and a caption names what scored them."""
    import pandas as pd

    formats = table.groupby("format")["bytes"].sum().sort_values().index.tolist()
    wide = table.pivot_table(index="layer", columns="format", values="error", aggfunc="first")
    # rank by the smallest format every layer has (a llama.cpp block format fits only some rows)
    rank_by = next((f for f in formats if wide[f].notna().all()), formats[0])
    ranked = wide.sort_values(rank_by, ascending=False, na_position="last")
    fallbacks = _fallbacks(table, method=method)
    shown = ranked.index.tolist()
    if len(shown) > 2 * top:
        shown = shown[:top] + [None] + shown[-top:]
    out = Table(
        "rank",
        "layer",
        *formats,
        title=f"Layer sensitivity (error; ranked by {rank_by}, most sensitive first)",
        caption=fallback_note(table, method=method),
        caption_justify="left",
    )
    for name in shown:
        if name is None:
            out.add_row("…", "…", *["" for _ in formats])
            continue
        rank = ranked.index.get_loc(name) + 1
        out.add_row(
            str(rank),
            f"{name} {FALLBACK_MARK}" if name in fallbacks else str(name),
            *[
                ("" if pd.isna(ranked.at[name, f]) else f"{ranked.at[name, f]:.3g}")
                for f in formats
            ],
        )
    return out
