"""One sensitivity table in parts: split a model's layers into shards, merge the shards' tables.

Several processes can compute one model's table together (app/sensitivity_shards.py): each
scores a shard of the planned layers (:func:`bitplan.sensitivity.analyzer.analyze` with
``layers``) and the parts are put back together in the whole table's row order. A shard holds
whole *units*: the layers of one tie group (one tensor, whose score is split over its modules)
and of one share group (one decision of the plan) never land in two shards. Shards are balanced
by weight count with the longest-processing-time rule (the largest unit goes to the lightest
shard; Graham, "Bounds on multiprocessing timing anomalies", 1969): a method's per-layer work,
quantizing and scoring the weight in every format, grows with its size.

The parts travel as files written atomically by the table cache's own writer and read back by
its reader (:func:`~bitplan.sensitivity.table.store_cached`, :func:`load_cached`): same columns,
same dtypes as a table that was never split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bitplan.sensitivity.layers import QuantLayer
from bitplan.sensitivity.table import load_cached, store_cached

__all__ = ["merge_tables", "read_shard_table", "split_layers", "write_shard_table"]


def _units(layers: Sequence[QuantLayer]) -> list[list[QuantLayer]]:
    """``layers`` grouped into units that stay together (tie or share group, linked through
    any member), each in layer order, units in order of their first layer."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    for lay in layers:
        links = [f"tensor:{lay.tensor_key}"] + ([f"share:{lay.share}"] if lay.share else [])
        for link in links:
            parent[root(link)] = root(lay.name)
    units: dict[str, list[QuantLayer]] = {}
    for lay in layers:
        units.setdefault(root(lay.name), []).append(lay)
    return list(units.values())


def split_layers(layers: Sequence[QuantLayer], count: int) -> list[list[QuantLayer]]:
    """At most ``count`` non-empty shards of ``layers`` (whole tie and share groups, balanced
    by weight count), each in layer order; shards ordered by their first layer. Fewer when
    there are fewer units than ``count``."""
    if count < 1:
        raise ValueError(f"a table splits into at least one shard, not {count}")
    units = _units(layers)
    shards: list[list[QuantLayer]] = [[] for _ in range(min(count, len(units)))]
    loads = [0] * len(shards)
    # sorted() is stable: units of one size keep the layer order, so the split is reproducible
    for unit in sorted(units, key=lambda u: -sum(lay.numel for lay in u)):
        lightest = loads.index(min(loads))
        shards[lightest] += unit
        loads[lightest] += sum(lay.numel for lay in unit)
    order = {lay.name: i for i, lay in enumerate(layers)}
    for shard in shards:
        shard.sort(key=lambda lay: order[lay.name])
    return sorted(shards, key=lambda shard: order[shard[0].name])


def _file_key(index: int) -> str:
    return f"shard-{index}"


def write_shard_table(folder: Path, index: int, table: pd.DataFrame) -> Path:
    """Write shard ``index``'s table under ``folder`` atomically; returns its path."""
    return store_cached(folder, _file_key(index), table)


def read_shard_table(folder: Path, index: int) -> pd.DataFrame | None:
    """Shard ``index``'s table as written, or None when it is missing or unreadable."""
    return load_cached(folder, _file_key(index))


def merge_tables(tables: Sequence[pd.DataFrame], layers: Sequence[QuantLayer]) -> pd.DataFrame:
    """The shards' tables as one table of ``layers``, in their order (rows of one layer keep
    theirs): the table :func:`~bitplan.sensitivity.analyzer.analyze` gives for all of them."""
    merged = pd.concat(tables, ignore_index=True)
    order = {lay.name: i for i, lay in enumerate(layers)}
    found = set(merged["layer"])
    missing = [name for name in order if name not in found]
    extra = sorted(found - order.keys())
    twice = merged[merged.duplicated(["layer", "format"])]["layer"].unique().tolist()
    if missing or extra or twice:
        raise ValueError(
            "shard tables do not cover the planned layers once each: "
            f"missing {missing[:3]}, extra {extra[:3]}, twice {twice[:3]}"
        )
    position = merged["layer"].map(order)
    return merged.iloc[position.to_numpy().argsort(kind="stable")].reset_index(drop=True)
