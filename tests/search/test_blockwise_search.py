"""``bitplan search --blockwise``: plans measured by passes streamed block by block from disk.

The decoders are the tiny random models of the block-wise analysis tests (hidden 32, 2 blocks),
with padded calibration batches. A streamed measurement runs the whole model's operations on
the same tensors in the same order, so its figures must equal a whole-model measurement of the
same plan; the tolerance only absorbs float64 summation, it is far below any plan's error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bitplan.app.cli import app
from bitplan.search.applier import PlanApplier
from bitplan.search.blockwise_eval import StreamedPlans, streamed_rounder
from bitplan.search.pipeline import UserMetric, _Evaluator, run_job
from bitplan.search.plans import (
    SCOPE_END_TO_END,
    SCOPE_STREAMED,
    metrics_scope,
    read_frontier,
    read_plan,
)
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.analyzer import rounder_for
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat, parse_formats
from bitplan.sensitivity.layers import QuantLayer
from bitplan.sensitivity.lazy_hf import Checkpoint, load_skeleton
from bitplan.sensitivity.models import load_model
from bitplan.sensitivity.rounder import STATS_GLOB, Rounder
from tests.helpers import SENTENCES, write_tiny_hf_model
from tests.sensitivity.test_blockwise import _calib, _write_decoder

INT8, INT4, INT4_GPTQ, INT2 = parse_formats(["int8", "int4-g32", "int4-g32+gptq", "int2-g16-asym"])
TOLERANCE = {"rel": 1e-9, "abs": 1e-12}


def _choices(layers: list[QuantLayer]) -> list[dict[str, QuantFormat]]:
    """Full precision, two uniform plans (one GPTQ-rounded), a mixed one and a partial one."""
    groups = list(dict.fromkeys(lay.group for lay in layers))
    return [
        {},
        dict.fromkeys(groups, INT4),
        dict.fromkeys(groups, INT4_GPTQ),
        {g: (INT8, INT2, INT4_GPTQ)[i % 3] for i, g in enumerate(groups)},
        {g: INT2 for g in groups[::2]},  # every other group stays in full precision
    ]


def _stats(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(folder.glob(STATS_GLOB)) for k, v in load_file(path).items()}


@pytest.mark.parametrize(
    ("model_type", "tie", "dtype"),
    [
        ("llama", False, torch.float32),
        ("llama", True, torch.float32),
        ("llama", False, torch.bfloat16),  # activations pass between blocks in bf16
        ("gpt2", True, torch.float32),
    ],
    ids=["llama", "llama-tied", "llama-bf16", "gpt2-tied"],
)
def test_streamed_measurement_equals_the_whole_model_measurement(
    tmp_path: Path, model_type: str, tie: bool, dtype: torch.dtype
) -> None:
    folder = _write_decoder(tmp_path / "model", model_type, tie=tie, dtype=dtype)
    calib = _calib()
    whole = load_model(str(folder), device="cpu")
    skeleton = load_skeleton(str(folder), device="cpu")
    for sub in ("whole", "streamed"):
        (tmp_path / sub).mkdir()
    whole_rounder = rounder_for(whole, calib, batch_size=4, workdir=tmp_path / "whole")
    rounder = streamed_rounder(skeleton, calib, batch_size=4, workdir=tmp_path / "streamed")
    expected, got = _stats(tmp_path / "whole"), _stats(tmp_path / "streamed")
    assert expected.keys() == got.keys()  # the head's matrix is the tied tensor's
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    choices = _choices(whole.layers)
    with PlanApplier(whole.module, whole.layers, workdir=tmp_path, rounder=whole_rounder) as ap:
        evaluator = _Evaluator(whole, ap, calib, batch_size=4)
        reference = [evaluator.measure(c) for c in choices]
    with StreamedPlans(skeleton, skeleton.layers, rounder=rounder) as plans:
        evaluator = _Evaluator(skeleton, plans, calib, batch_size=4)
        streamed = [evaluator.measure(c) for c in choices]

    assert reference[0]["error"] == streamed[0]["error"] == 0.0  # the reference itself
    assert len({round(m["error"], 9) for m in reference}) == len(choices)  # plans differ
    for want, have in zip(reference, streamed, strict=True):
        assert have.keys() == want.keys() >= {"error", "kl", "agreement", "perplexity"}
        assert have == {k: pytest.approx(v, **TOLERANCE) for k, v in want.items()}
    assert all(p.is_meta for p in skeleton.module.parameters())  # every stage released


def _calib_file(path: Path) -> Path:
    data = _calib(n=8)
    save_file({k: v.contiguous() for k, v in data.inputs.items()}, path)
    return path


def _spec(folder: Path, calib: Path, **extra: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "model": str(folder),
        "calib": str(calib),
        "budget": "5bpw",
        "formats": ["int8", "int4-g32", "int2-g16-asym"],
        "method": "layer",
        "trials": 4,
        "device": "cpu",
        "batch_size": 4,
        **extra,
    }
    return JobSpec(**fields)


def test_blockwise_search_finds_and_measures_what_the_whole_model_search_does(
    tmp_path: Path,
) -> None:
    folder = _write_decoder(tmp_path / "model", "llama", tie=True)
    spec = _spec(folder, _calib_file(tmp_path / "calib.safetensors"), rounding=["rtn", "gptq"])
    streamed = run_job(spec, out_dir=tmp_path / "streamed", blockwise=True)
    whole = run_job(spec, out_dir=tmp_path / "whole")

    assert streamed.plan_ids == whole.plan_ids  # every measurement agreed, so did the search
    assert len(streamed.points) >= 2 and streamed.uniform
    for mine, theirs in zip(
        streamed.points + streamed.uniform, whole.points + whole.uniform, strict=True
    ):
        for split in ("calibration", "holdout"):
            want = theirs.metrics[split]
            assert mine.metrics[split] == {
                k: pytest.approx(v, **TOLERANCE) for k, v in want.items()
            }
        assert mine.metrics["holdout"]["error"] > 0
    # The gptq statistics sit beside the plans, as a whole-model job leaves them.
    assert (tmp_path / "streamed" / "sensitivity.csv").read_text() == (
        tmp_path / "whole" / "sensitivity.csv"
    ).read_text()
    assert _stats(tmp_path / "streamed").keys() == _stats(tmp_path / "whole").keys()
    assert Rounder.from_folder(tmp_path / "streamed") is not None

    for result, scope in ((streamed, SCOPE_STREAMED), (whole, SCOPE_END_TO_END)):
        frontier = read_frontier(result.frontier_path)
        assert frontier.scope == metrics_scope(streamed=result is streamed)
        assert frontier.scope["holdout"] == frontier.scope["calibration"] == scope
        for point in frontier.points + frontier.uniform:
            plan = read_plan(result.out_dir / point.plan)
            assert plan.metrics["scope"] == frontier.scope
            assert plan.metrics["predicted_error"] == point.predicted_error


def test_no_two_blocks_of_weights_are_ever_in_memory_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _write_decoder(tmp_path / "model", "llama", tie=False)
    blocks = ["model.layers.0.", "model.layers.1."]
    seen: list[tuple[int, set[str]]] = []
    total = sum(p.numel() for p in load_model(str(folder), device="cpu").module.parameters())
    materialize = Checkpoint.materialize

    def watched(self: Checkpoint, root: torch.nn.Module, slots: Any, device: Any) -> None:
        materialize(self, root, slots, device)
        live = [(n, p) for n, p in root.named_parameters() if not p.is_meta]
        seen.append(
            (
                sum(p.numel() for _, p in live),
                {b for b in blocks for n, _ in live if n.startswith(b)},
            )
        )

    monkeypatch.setattr(Checkpoint, "materialize", watched)
    spec = _spec(folder, _calib_file(tmp_path / "calib.safetensors"), trials=2)
    result = run_job(spec, out_dir=tmp_path / "job", blockwise=True)

    # analysis, references of both splits, every trial, validation and baselines: 4 stages each
    passes = 1 + 2 + len(result.points + result.uniform) * 2
    assert len(seen) >= 4 * passes
    assert all(len(in_blocks) <= 1 for _, in_blocks in seen)
    assert {b for _, in_blocks in seen for b in in_blocks} == set(blocks)
    assert max(live for live, _ in seen) < total / 2


def test_what_a_blockwise_job_refuses(tmp_path: Path) -> None:
    folder = _write_decoder(tmp_path / "model", "llama")
    calib = _calib_file(tmp_path / "calib.safetensors")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="layer method only, not 'fisher'"):
        run_job(_spec(folder, calib, method="fisher"), out_dir=out, blockwise=True)
    metric = UserMetric(calibration=lambda _m: 1.0, holdout=lambda _m: 1.0)
    with pytest.raises(InputError, match="user metric scores the whole model"):
        run_job(_spec(folder, calib), out_dir=out, blockwise=True, metric=metric)
    assert not out.exists()  # refused before anything was loaded or written
    bert = write_tiny_hf_model(tmp_path / "bert", "bert", tokenizer=False)
    with pytest.raises(InputError, match=r"decoder language models \(llama.*bert"):
        run_job(_spec(bert, calib), out_dir=out, blockwise=True)
    with pytest.raises(InputError, match="builtin model"):
        run_job(_spec(Path("builtin:tiny-lm"), calib), out_dir=out, blockwise=True)


def test_cli_search_blockwise_says_its_figures_are_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_tiny_hf_model(tmp_path / "model", "llama", task="text-generation")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(SENTENCES), encoding="utf-8")
    monkeypatch.setenv("BITPLAN_CACHE_DIR", str(tmp_path / "cache"))
    args = ["search", str(folder), "--budget", "6bpw", "--calib", str(calib), "--method", "layer"]
    args += ["--formats", "int8,int4-g32", "--trials", "2", "--device", "cpu", "--blockwise"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert SCOPE_STREAMED in re.sub(r"\s+", " ", result.output)
    assert read_frontier(tmp_path / "out" / "frontier.json").scope == metrics_scope(streamed=True)
    fisher = [*args, "-o", str(tmp_path / "fisher")]
    fisher[fisher.index("layer")] = "fisher"
    refused = CliRunner().invoke(app, fisher)
    assert refused.exit_code == 2 and "layer method only" in refused.output
