"""Rounding as a search dimension, end to end on the builtin digits CNN: the table has a row per
(layer, format, rounding), plans name each layer's rounding, and the artifact `bitplan apply`
writes carries exactly the integers the search measured (the plan's held-out error, re-measured
on the loaded artifact)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import bitplan
from bitplan.search.artifact import load_artifact
from bitplan.search.exports import plan_to_csv, torchao_config
from bitplan.search.pipeline import load_inputs, run_job
from bitplan.search.plans import Plan, read_plan
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.metrics import collect_reference, measure
from bitplan.sensitivity.models import load_model
from bitplan.sensitivity.table import read_table

FORMATS = ["int8", "int4-g16", "int2-g16-asym"]


def _spec() -> JobSpec:
    return JobSpec(
        model="builtin:digits-cnn",
        budget="3.5bpw",
        trials=6,
        method="layer",
        formats=FORMATS,
        rounding=["rtn", "gptq", "hqq"],
        max_samples=300,
        batch_size=128,
        device="cpu",
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rounding-job")
    run_job(_spec(), out_dir=out)
    return out


def test_the_table_has_a_row_per_layer_format_and_rounding(job: Path) -> None:
    written = pd.read_csv(job / "sensitivity.csv")
    assert set(written["format"]) == set(FORMATS)  # the storage format, as DESIGN §6 names it
    per_layer = written.groupby("layer").size()
    assert (per_layer == 3 * len(FORMATS)).all()
    # GPTQ minimises exactly the layer-output error the `layer` method measures.
    mean = written.groupby(["format", "rounding"])["error"].mean()
    for fmt in ("int4-g16", "int2-g16-asym"):
        assert mean[(fmt, "gptq")] < mean[(fmt, "rtn")]
    # Read back, rows become planning options again (int4-g16+gptq), bytes unchanged.
    table = read_table(job / "sensitivity.csv")
    assert {"int4-g16+gptq", "int4-g16+hqq", "int4-g16"} <= set(table["format"])
    storage = table["format"].str.partition("+")[0]
    assert table.groupby(["layer", storage])["bytes"].nunique().max() == 1


def _with_rounding(plan: Plan, rounding: str) -> Plan:
    data = plan.to_dict()
    for layer in data["layers"]:
        if layer["format"].startswith("int"):
            layer["rounding"] = rounding
    return Plan.from_dict(data)


def test_plan_files_name_the_storage_format_and_the_rounding_apart(job: Path) -> None:
    plan = read_plan(job / "plans" / "best.json")
    raw = json.loads((job / "plans" / "best.json").read_text())
    for layer, written in zip(plan.layers, raw["layers"], strict=True):
        assert written["format"] == layer.format.base_name and "+" not in written["format"]
        assert written["rounding"] == layer.format.rounding == layer.rounding
    gptq = _with_rounding(plan, "gptq")
    assert gptq.totals == plan.totals  # rounding changes values, never bytes
    assert Plan.from_dict(gptq.to_dict()) == gptq


def test_the_artifact_carries_the_integers_the_search_measured(job: Path, tmp_path: Path) -> None:
    """Every frontier plan that rounds some layer by gptq or hqq, applied and loaded back,
    gives the held-out error the job wrote into it (the job measured those very weights)."""
    spec = _spec()
    plans = [read_plan(p) for p in sorted((job / "plans").glob("*bpw-*.json"))]
    rounded = [p for p in plans if any(lay.rounding != "rtn" for lay in p.layers)]
    assert rounded, "no frontier plan picked a data-aware rounding"
    model, _, holdout = load_inputs(spec)
    reference = collect_reference(model, holdout, batch_size=spec.batch_size)
    for i, plan in enumerate(rounded):
        out = tmp_path / f"packed-{i}"
        plan_path = job / "plans" / f"check-{i}.json"
        plan.write(plan_path)
        report = bitplan.apply(model=spec.model, plan=plan_path, out_dir=out)
        assert report.total_bytes == plan.totals.total_bytes
        loaded = load_model(spec.model, device="cpu")
        load_artifact(out, loaded.module)
        with torch.no_grad():
            error = measure(loaded, holdout, reference, batch_size=spec.batch_size)["error"]
        assert error == pytest.approx(plan.metrics["holdout"]["error"], rel=1e-5, abs=1e-9)
        plan_path.unlink()


def test_apply_without_the_jobs_statistics_says_how_to_give_them(job: Path, tmp_path: Path) -> None:
    plan = _with_rounding(read_plan(job / "plans" / "best.json"), "gptq")
    elsewhere = tmp_path / "plans" / "p.json"
    elsewhere.parent.mkdir()
    plan.write(elsewhere)
    with pytest.raises(InputError, match="--rounding-stats"):
        bitplan.apply(model="builtin:digits-cnn", plan=elsewhere, out_dir=tmp_path / "o")
    report = bitplan.apply(
        model="builtin:digits-cnn", plan=elsewhere, out_dir=tmp_path / "o", rounding_stats=job
    )
    assert report.total_bytes == plan.totals.total_bytes


def test_exports_name_each_layers_rounding(job: Path) -> None:
    plan = _with_rounding(read_plan(job / "plans" / "best.json"), "gptq")
    rows = list(csv.DictReader(io.StringIO(plan_to_csv(plan))))
    assert {r["rounding"] for r in rows} == {"gptq"} and all("+" not in r["format"] for r in rows)
    # A torchao config cannot carry integers: quantize_ rounds to nearest, and the note says so.
    note = torchao_config(plan)["note"]["rounding"]
    assert set(note["layers"]) == {lay.name for lay in plan.layers}
    assert "--to torchao" in note["summary"]
    assert "rounding" not in torchao_config(read_plan(job / "plans" / "u-int8.json")).get(
        "note", {}
    )
