"""The sensitivity table: building, writing, user-table validation, and the content cache."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import FormatError, parse_formats, tensor_bytes
from bitplan.sensitivity.layers import apply_pins, find_quant_layers
from bitplan.sensitivity.table import (
    TABLE_COLUMNS,
    build_table,
    cache_key,
    load_cached,
    read_layers,
    read_table,
    store_cached,
    write_table,
)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight


def _table(pins: dict[str, str] | None = None) -> tuple[pd.DataFrame, list]:
    layers = apply_pins(find_quant_layers(Tied()), pins or {})
    scores = {
        lay.name: ({lay.pinned: 0.5} if lay.pinned else {"int8": 0.1, "int4-g4": 0.3})
        for lay in layers
    }
    return build_table(layers, scores, method="layer", scored_by={"proj": "weight"}), layers


def test_build_table_rows_columns_bytes_and_ties() -> None:
    df, layers = _table({"proj": "int6"})
    assert tuple(df.columns) == TABLE_COLUMNS
    assert list(df["layer"]) == ["emb", "emb", "proj", "head", "head"]
    assert list(df.loc[df["layer"] == "proj", "format"]) == ["int6"]
    assert set(df.loc[df["layer"] == "head", "tie"]) == {"emb.weight"}
    assert set(df.loc[df["layer"] == "proj", "tie"]) == {""}
    assert set(df.loc[df["layer"] == "head", "param"]) == {"emb.weight"}
    row = df[(df["layer"] == "emb") & (df["format"] == "int4-g4")].iloc[0]
    # 80 weights x 4 bits + 20 groups x 16-bit scales = 640 bits
    assert row["bytes"] == tensor_bytes(parse_formats("int4-g4")[0], 10, 8) == 80
    assert row["numel"] == 80 and row["error"] == 0.3
    assert set(df.loc[df["layer"] == "proj", "method"]) == {"weight"}
    assert set(df.loc[df["layer"] != "proj", "method"]) == {"layer"}


def test_write_table_round_trips_through_read_table_and_read_layers(tmp_path: Path) -> None:
    df, layers = _table({"proj": "int6"})
    write_table(df, tmp_path, layers)
    back = read_table(tmp_path / "sensitivity.csv")
    pd.testing.assert_frame_equal(back[list(TABLE_COLUMNS)].astype(df.dtypes.to_dict()), df)
    assert read_layers(tmp_path / "layers.json") == layers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "user.csv"
    path.write_text(text)
    return path


def test_read_table_accepts_minimal_and_canonicalises_formats(tmp_path: Path) -> None:
    df = read_table(_csv(tmp_path, "Layer, Format, Error\nfc1, INT8, 0.01\nfc1,int4-g128,2e-1\n"))
    assert list(df.columns) == ["layer", "format", "error"]
    assert list(df["format"]) == ["int8", "int4-g128"]
    assert list(df["error"]) == [0.01, 0.2]


@pytest.mark.parametrize(
    "text, message",
    [
        ("layer,error\nfc1,0.1\n", "lacks column"),
        ("layer,format,error\n", "no rows"),
        ("layer,format,error\nfc1,int8,-0.5\n", "not a finite number >= 0"),
        ("layer,format,error\nfc1,int8,nan\n", "not a finite number >= 0"),
        ("layer,format,error\nfc1,int8,\n", "not a finite number >= 0"),
        ("layer,format,error\nfc1,int8,inf\n", "not a finite number >= 0"),
        ("layer,format,error\nfc1,int8,abc\n", "not a finite number >= 0"),
        ("layer,format,error\nfc1,int8,0.1\nfc1,INT8,0.2\n", "two rows for layer fc1 in int8"),
        ("layer,format,error,numel\nfc1,int8,0.1,64\nfc1,int4,0.2,65\n", "different numel"),
        ("layer,format,error,numel\nfc1,int8,0.1,6.5\n", "non-negative integer"),
        ("layer,format,error,bytes\nfc1,int8,0.1,-3\n", "non-negative integer"),
        ("layer,format,error,tie\nfc1,int8,0.1,a\nfc1,int4,0.2,\n", "different tie"),
        ("layer,format,error\n,int8,0.1\n", "empty layer name"),
    ],
)
def test_read_table_rejects_bad_tables(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        read_table(_csv(tmp_path, text))


def test_read_table_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="unknown format 'int4-x'"):
        read_table(_csv(tmp_path, "layer,format,error\nfc1,int4-x,0.1\n"))
    with pytest.raises(InputError, match="does not exist"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="not a readable CSV"):
        read_table(tmp_path / "empty.csv")


def test_cache_key_tracks_everything_that_changes_rows() -> None:
    layers = find_quant_layers(Tied())
    fmts = parse_formats("int8,int4")
    base = dict(model_sha256="m", calib_sha256="c", method="layer", formats=fmts, layers=layers)
    key = cache_key(**base)
    assert cache_key(**{**base, "formats": list(reversed(fmts))}) == key  # order-free
    changed = [
        {"model_sha256": "m2"},
        {"calib_sha256": "c2"},
        {"method": "fisher"},
        {"formats": fmts[:1]},
        {"layers": layers[1:]},
        {"layers": apply_pins(layers, {"proj": "int8"})},
        {"settings": {"seed": 1}},
    ]
    keys = {cache_key(**{**base, **change}) for change in changed}
    assert key not in keys and len(keys) == len(changed)


def test_cache_store_load_and_corrupt_file(tmp_path: Path) -> None:
    df, _ = _table()
    assert load_cached(tmp_path, "k") is None
    path = store_cached(tmp_path, "k", df)
    assert path == tmp_path / "sensitivity" / "k.csv"
    pd.testing.assert_frame_equal(load_cached(tmp_path, "k"), df)
    path.write_text("layer,format\nx,int8\n")
    assert load_cached(tmp_path, "k") is None
