"""The sensitivity table: building it, writing it, importing a user's, and caching it.

One row per (layer, format) with columns ``layer, param, format, error, numel, bytes, tie,
method`` (DESIGN §6): ``error`` is the method's loss estimate (>= 0, lower is better), ``bytes``
the exact stored size of the layer's matrix in that format
(:func:`bitplan.sensitivity.formats.tensor_bytes`), ``tie`` the tie group's name or empty, and
``method`` what scored the row (empty in imported tables). A tie
group's error is the sum of its members' rows and its bytes count once. Pinned layers have a row for
their pinned format only.

The cache keeps tables under ``<cache_dir>/sensitivity/<key>.csv``, keyed by the content of
everything that changes the numbers (:func:`cache_key`), so a new budget re-solves without
re-measuring. Files are written to a temporary name and renamed, so a crash or a concurrent
worker never leaves a half-written table behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from bitplan.sensitivity.atomic import write_text_atomic
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat, parse_format, tensor_bytes
from bitplan.sensitivity.layers import QuantLayer

__all__ = [
    "TABLE_COLUMNS",
    "build_table",
    "cache_key",
    "load_cached",
    "read_layers",
    "read_table",
    "store_cached",
    "write_table",
]

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ("layer", "param", "format", "error", "numel", "bytes", "tie", "method")
_USER_COLUMNS = "layer, format, error[, bytes][, numel][, tie][, group][, rounding]"
# Read from a user's table, never measured: ``group`` names share groups (DESIGN §6).
# ``rounding`` is how the row's weights were rounded (rtn when absent): in a written table
# ``format`` is the storage format and ``rounding`` a column of its own, while in memory a
# row's ``format`` is the planning option's name (``int4-g128+gptq``, see QuantFormat).
_USER_ONLY_COLUMNS = ("group", "rounding")
# Bump when a method's numbers change for the same inputs, so stale cached tables are not reused.
_CACHE_VERSION = 2  # 2: the method column


def build_table(
    layers: Sequence[QuantLayer],
    scores: Mapping[str, Mapping[str, float]],
    *,
    method: str = "",
    scored_by: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The table from per-layer scores ``{layer: {format: error}}``, in layer order.

    ``method`` fills the ``method`` column; ``scored_by`` names another method for the
    layers it scored instead (see :func:`bitplan.sensitivity.analyzer.analyze`).
    """
    scored_by = scored_by or {}
    records = []
    for lay in layers:
        rows, cols = lay.shape
        for name, err in scores[lay.name].items():
            records.append(
                (
                    lay.name,
                    lay.param,
                    name,
                    float(err),
                    lay.numel,
                    tensor_bytes(parse_format(name), rows, cols),
                    lay.tie or "",
                    scored_by.get(lay.name, method),
                )
            )
    return _typed(pd.DataFrame.from_records(records, columns=list(TABLE_COLUMNS)))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Canonical dtypes, so built, cached and written tables compare equal."""
    return df.astype(
        {
            "layer": str,
            "param": str,
            "format": str,
            "error": "float64",
            "numel": "int64",
            "bytes": "int64",
            "tie": str,
            "method": str,
        }
    ).reset_index(drop=True)


def write_table(df: pd.DataFrame, out_dir: Path | str, layers: Sequence[QuantLayer]) -> None:
    """Write ``sensitivity.csv`` (the table, one row per layer, format and rounding) and
    ``layers.json`` (the planned layers)."""
    out = Path(out_dir)
    parsed = {name: parse_format(name) for name in df["format"].unique()}
    written = df.copy()
    written["format"] = df["format"].map({n: f.base_name for n, f in parsed.items()})
    written.insert(3, "rounding", df["format"].map({n: f.rounding for n, f in parsed.items()}))
    write_text_atomic(out / "sensitivity.csv", written.to_csv(index=False))
    write_text_atomic(out / "layers.json", json.dumps([asdict(lay) for lay in layers], indent=1))


def read_layers(path: Path | str) -> list[QuantLayer]:
    """The layer list that :func:`write_table` wrote to ``layers.json``."""
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    return [QuantLayer(**{**item, "shape": tuple(item["shape"])}) for item in items]


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(
            f"sensitivity table {path} does not exist; give a CSV file with columns {_USER_COLUMNS}"
        )
    try:
        # Cells stay text until checked: "" is a valid tie, and a bad number gets our message.
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path} is not a readable CSV ({exc.__class__.__name__}); give columns {_USER_COLUMNS}"
        ) from exc


def _numbers(df: pd.DataFrame, column: str, *, integer: bool) -> pd.Series:
    values = pd.to_numeric(df[column].str.strip(), errors="coerce")
    bad = values.isna() | ~values.map(math.isfinite) | (values < 0)
    if integer:
        bad |= values != values.round()
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        kind = "a non-negative integer" if integer else "a finite number >= 0"
        raise InputError(
            f"row {i + 2}: {column} {df[column].iloc[i]!r} for layer "
            f"{df['layer'].iloc[i]} is not {kind}"
        )
    return values.astype("int64") if integer else values.astype("float64")


def _one_per_layer(df: pd.DataFrame, column: str) -> None:
    counts = df.groupby("layer", sort=False)[column].nunique()
    bad = counts[counts > 1]
    if len(bad):
        layer = bad.index[0]
        seen = sorted(map(str, df.loc[df["layer"] == layer, column].unique()))
        raise InputError(f"layer {layer} has different {column} values {seen}; a layer has one")


def read_table(path: Path | str) -> pd.DataFrame:
    """Read and validate a user-supplied table (CSV: ``layer, format, error[, bytes][, numel]
    [, tie][, group]``; a ``param`` column, as :func:`write_table` writes, is kept too).

    Format names are canonicalised; unknown ones raise the format parser's error. Raises
    :class:`InputError` for missing columns, empty layer names, errors that are negative, NaN
    or not numbers, duplicate (layer, format) rows, and numel or tie that differ within a layer.
    """
    path = Path(path)
    df = _read_csv(path)
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("layer", "format", "error") if c not in df.columns]
    if missing:
        raise InputError(
            f"{path} lacks column(s) {', '.join(missing)}; columns accepted: {_USER_COLUMNS}"
        )
    known = (*TABLE_COLUMNS, *_USER_ONLY_COLUMNS)
    extra = [c for c in df.columns if c not in known]
    if extra:
        logger.warning("ignoring unknown column(s) %s of %s", ", ".join(extra), path)
    df = df[[c for c in known if c in df.columns]].copy()
    if df.empty:
        raise InputError(f"{path} has no rows; give one row per (layer, format)")
    df["layer"] = df["layer"].str.strip()
    if (df["layer"] == "").any():
        i = int((df["layer"] == "").to_numpy().nonzero()[0][0])
        raise InputError(f"row {i + 2} of {path} has an empty layer name")
    if "rounding" in df.columns:  # back to option names: int4-g128 + gptq -> int4-g128+gptq
        df["format"] = [
            parse_format(f).with_rounding(r.strip().lower() or "rtn").name
            for f, r in zip(df["format"], df.pop("rounding"), strict=True)
        ]
    df["format"] = df["format"].map({f: parse_format(f).name for f in df["format"].unique()})
    df["error"] = _numbers(df, "error", integer=False)
    for column in ("numel", "bytes"):
        if column in df.columns:
            df[column] = _numbers(df, column, integer=True)
    for column in ("tie", "group"):
        if column in df.columns:
            df[column] = df[column].str.strip()
    dupes = df[df.duplicated(["layer", "format"])]
    if len(dupes):
        raise InputError(
            f"{path} has two rows for layer {dupes['layer'].iloc[0]} in "
            f"{dupes['format'].iloc[0]}; keep one row per (layer, format)"
        )
    for column in ("numel", "tie", "group", "param"):
        if column in df.columns:
            _one_per_layer(df, column)
    return df.reset_index(drop=True)


def cache_key(
    *,
    model_sha256: str,
    calib_sha256: str | None,
    method: str,
    formats: Sequence[QuantFormat],
    layers: Sequence[QuantLayer],
    settings: Mapping[str, Any] | None = None,
) -> str:
    """Content key of a table: model and data hashes, method, formats, planned layers.

    The layer list carries exclusions and pins (they change which rows exist). ``calib_sha256``
    is None for data-free methods, so their tables survive a change of data; ``settings`` holds
    method options that change the numbers (e.g. the fisher seed).
    """
    payload = {
        "version": _CACHE_VERSION,
        "model": model_sha256,
        "calib": calib_sha256,
        "method": method,
        "formats": sorted(f.name for f in formats),
        "layers": [[lay.name, lay.param, lay.tie, lay.pinned] for lay in layers],
        "settings": dict(sorted((settings or {}).items())),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_path(cache_dir: Path | str, key: str) -> Path:
    return Path(cache_dir) / "sensitivity" / f"{key}.csv"


def load_cached(cache_dir: Path | str, key: str) -> pd.DataFrame | None:
    """The cached table for ``key``, or None when absent or unreadable."""
    path = _cache_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(
            path,
            keep_default_na=False,
            dtype={"tie": str, "layer": str, "param": str, "format": str, "method": str},
        )
        return _typed(df[list(TABLE_COLUMNS)])
    except (ValueError, KeyError, pd.errors.ParserError) as exc:
        logger.warning("ignoring unreadable cached table %s: %s", path, exc)
        return None


def store_cached(cache_dir: Path | str, key: str, df: pd.DataFrame) -> Path:
    """Store ``df`` under ``key`` atomically; returns the file's path."""
    path = _cache_path(cache_dir, key)
    write_text_atomic(path, df.to_csv(index=False))
    return path
