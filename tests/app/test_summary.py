"""Terminal summaries: which layers a fallback method scored is visible, marked and named."""

from __future__ import annotations

import pandas as pd
from rich.console import Console

from bitplan.app.summary import FALLBACK_MARK, fallback_note, sensitivity_table


def _table(methods: dict[str, str]) -> pd.DataFrame:
    rows = [
        {"layer": name, "format": fmt, "error": err * (i + 1), "bytes": size, "method": how}
        for i, (name, how) in enumerate(methods.items())
        for fmt, err, size in (("int8", 0.01, 100), ("int4", 0.1, 50))
    ]
    return pd.DataFrame(rows)


def _render(table: object) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_fallback_layers_are_marked_and_named() -> None:
    table = _table({"a": "fisher", "pooler": "layer", "unused": "weight", "b": "fisher"})
    note = fallback_note(table, method="fisher")
    assert note is not None
    assert note.startswith(f"{FALLBACK_MARK} fisher could not score 2 layers")
    assert "by layer: pooler; by weight: unused" in note
    shown = _render(sensitivity_table(table, method="fisher"))
    assert f"pooler {FALLBACK_MARK}" in shown and f"unused {FALLBACK_MARK}" in shown
    assert f"a {FALLBACK_MARK}" not in shown and f"b {FALLBACK_MARK}" not in shown
    assert "by layer: pooler" in shown  # the caption under the table


def test_no_mark_when_the_method_scored_every_layer() -> None:
    table = _table({"a": "fisher", "b": "fisher"})
    assert fallback_note(table, method="fisher") is None
    assert fallback_note(table.drop(columns="method"), method="fisher") is None  # a user table
    assert FALLBACK_MARK not in _render(sensitivity_table(table, method="fisher"))


def test_ranked_by_the_smallest_format_every_layer_has() -> None:
    # q4_k fits only the 256-weight rows of "wide"; the others have q5_0 rows instead
    rows = [
        {"layer": "wide", "format": "q4_k", "error": 0.5, "bytes": 10, "method": "weight"},
        {"layer": "wide", "format": "q4_0", "error": 0.1, "bytes": 12, "method": "weight"},
        {"layer": "a", "format": "q5_0", "error": 0.2, "bytes": 20, "method": "weight"},
        {"layer": "a", "format": "q4_0", "error": 0.3, "bytes": 12, "method": "weight"},
        {"layer": "b", "format": "q5_0", "error": 0.1, "bytes": 20, "method": "weight"},
        {"layer": "b", "format": "q4_0", "error": 0.2, "bytes": 12, "method": "weight"},
    ]
    shown = _render(sensitivity_table(pd.DataFrame(rows), method="weight"))
    assert "ranked by q4_0" in " ".join(shown.split())  # the title may wrap
    order = [line.split()[3] for line in shown.splitlines() if line.lstrip("│ ")[:1].isdigit()]
    assert order == ["a", "b", "wide"]
