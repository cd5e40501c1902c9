"""How close a CUDA result must come to the CPU's, and why it is not bitwise equal.

Both devices run the same arithmetic, but not the same floating-point operations:

- Sums and matrix products add in another order (cuBLAS and cuDNN pick their own blocking):
  float32 rounding, about 1e-6 relative. Quantization itself is elementwise and correctly
  rounded on both (division, ``round`` half-to-even, the float16 scale), so the codes agree and
  the data-free ``weight`` method differs by that rounding only.
- cuDNN runs float32 convolutions in TF32 by default on Ampere and later GPUs
  (``torch.backends.cudnn.allow_tf32``; cuBLAS matrix products stay float32, its ``allow_tf32``
  is off by default): a convolution's outputs move by about 1e-3 relative (TF32 keeps 10
  mantissa bits), and so do the inputs every later layer sees. ``builtin:digits-cnn`` is
  convolutional; ``builtin:tiny-lm`` and the tiny LLaMA are not. Input statistics and measured
  errors of small perturbations (int8) move by the same relative amount or more.
- GPTQ sweeps columns from the input Gram matrix: a weight that lies next to a rounding boundary
  can round the other way once the matrix moved by float noise, and the error moves with it.
- ``fisher`` samples labels with a generator on the model's device: CUDA's generator is not the
  CPU's, so the two tables are two Monte-Carlo estimates of one Fisher. Estimates with two seeds
  on the CPU differ up to 14x in one layer's magnitude on ``builtin:digits-cnn`` (a rare
  sampled label with a large gradient) while ranking the rows alike (Spearman 0.975 to 0.999
  between seeds on the three models here): the rows' ranking is compared, not their values.

A row passes when ``|cuda - cpu| <= rtol * |cpu| + floor * max|cpu|``: the floor, a share of the
table's largest error, keeps float noise on errors many orders below the table's range (an int8
row next to int2 rows) from failing a comparison it cannot inform.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

__all__ = [
    "FISHER_MIN_SPEARMAN",
    "GPTQ",
    "TOLERANCES",
    "Tolerance",
    "assert_same_ranking",
    "assert_tables_close",
    "worst_deviation",
]


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    floor: float


# Per method, for tables of round-to-nearest rows (module docstring for the reasons).
TOLERANCES = {
    "weight": Tolerance(rtol=1e-4, floor=1e-6),  # reduction order only
    "layer": Tolerance(rtol=2e-2, floor=1e-4),  # TF32 convolutions upstream of a layer's inputs
    "e2e": Tolerance(rtol=5e-2, floor=1e-3),  # the model's whole output through TF32
}
# Rows rounded by GPTQ: codes next to a boundary may flip.
GPTQ = Tolerance(rtol=5e-2, floor=1e-3)
# Two seeds of fisher on the CPU rank rows with Spearman >= 0.975 on these models.
FISHER_MIN_SPEARMAN = 0.9


def _merged(cpu: pd.DataFrame, cuda: pd.DataFrame) -> pd.DataFrame:
    """The two tables side by side (``*_cpu``, ``*_cuda``), checked to hold the same rows with
    the same bytes and the same scoring method."""
    keys = ["layer", "format"]
    merged = cpu.merge(cuda, on=keys, suffixes=("_cpu", "_cuda"), validate="one_to_one")
    assert len(merged) == len(cpu) == len(cuda), "the tables hold different (layer, format) rows"
    for column in ("bytes", "numel", "method"):
        if f"{column}_cpu" in merged:
            differ = merged[merged[f"{column}_cpu"] != merged[f"{column}_cuda"]]
            assert differ.empty, f"{column} differs:\n{differ[keys].to_string()}"
    return merged


def worst_deviation(cpu: pd.DataFrame, cuda: pd.DataFrame) -> float:
    """The largest ``|cuda - cpu| / |cpu|`` over rows with a non-zero CPU error."""
    merged = _merged(cpu, cuda)
    nonzero = merged[merged.error_cpu != 0]
    return float(((nonzero.error_cuda - nonzero.error_cpu).abs() / nonzero.error_cpu.abs()).max())


def assert_tables_close(cpu: pd.DataFrame, cuda: pd.DataFrame, tolerance: Tolerance) -> None:
    """Every row of the CUDA table within ``tolerance`` of the CPU's (module docstring)."""
    merged = _merged(cpu, cuda)
    scale = float(merged.error_cpu.abs().max())
    allowed = tolerance.rtol * merged.error_cpu.abs() + tolerance.floor * scale
    off = merged[(merged.error_cuda - merged.error_cpu).abs() > allowed]
    assert off.empty, (
        f"{len(off)} of {len(merged)} rows differ by more than {tolerance}:\n"
        + off[["layer", "format", "error_cpu", "error_cuda"]].to_string()
    )


def assert_same_ranking(cpu: pd.DataFrame, cuda: pd.DataFrame, min_spearman: float) -> None:
    """The rows ranked alike (Spearman correlation of the errors), with errors that are finite
    and non-negative on both."""
    merged = _merged(cpu, cuda)
    for side in ("error_cpu", "error_cuda"):
        values = merged[side]
        assert values.notna().all() and (values >= 0).all(), f"{side}: {values.describe()}"
    rho = float(merged.error_cpu.rank().corr(merged.error_cuda.rank()))
    assert rho >= min_spearman, f"Spearman {rho:.4f} < {min_spearman}"
