"""Rounded integers through the runtimes: a plan whose layers use gptq, awq and hqq, applied to
``builtin:tiny-lm`` for compressed-tensors and torchao, loads (in compressed-tensors' own
dequantizer, and in transformers + torchao) as exactly the weights bitplan's Rounder makes —
not the round-to-nearest ones — and gives the held-out error bitplan measures for the plan.

The job folder layout is what a search leaves: the plan under ``plans/`` and the rounding
statistics beside it, so ``bitplan.apply`` finds them as it would after ``bitplan search``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

import bitplan
from bitplan.search.applier import PlanApplier
from bitplan.search.plans import Plan
from bitplan.sensitivity.analyzer import rounder_for
from bitplan.sensitivity.data import load_calibration
from bitplan.sensitivity.formats import dequantize, quantize_codes
from bitplan.sensitivity.layers import get_weight, weight_matrix
from bitplan.sensitivity.metrics import collect_reference, measure
from bitplan.sensitivity.models import LoadedModel
from bitplan.sensitivity.rounder import Rounder
from tests.runtimes import require_runtime
from tests.search._builtin_hf import ERROR_RTOL, held_out, opt_name, opt_param, plan_by_pattern

# Linear layers only (compressed-tensors quantizes those), in formats vLLM serves (4/8 bits),
# q/k/v of a block alike; embeddings as floats.
PLAN: dict[str, str | None] = {
    "wte": "fp16",
    "lm_head": "fp16",
    "wpe": "fp16",
    "blocks.0.attn.[qkv]_proj": "int4-g16+gptq",
    "blocks.0.attn.o_proj": "int4-g16+awq",
    "blocks.0.fc_in": "int4-g32-asym+hqq",
    "blocks.0.fc_out": "int8+gptq",
    "blocks.*.attn.[qkv]_proj": "int4-g32+gptq",
    "blocks.*": "int4-g16+awq",
}


@pytest.fixture(scope="module")
def job(tiny_lm_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Plan]:
    """A job folder: the plan under plans/ and the statistics of the calibration data."""
    folder = tmp_path_factory.mktemp("job")
    calib = load_calibration("builtin", tiny_lm_model, max_samples=48)
    rounder_for(tiny_lm_model, calib, batch_size=16, workdir=folder)
    plan = plan_by_pattern(tiny_lm_model, PLAN)
    (folder / "plans").mkdir()
    plan.write(folder / "plans" / "mixed.json")
    return folder, plan


def _rounded(model: LoadedModel, plan: Plan, rounder: Rounder) -> dict[str, torch.Tensor]:
    """``{param: bitplan's dequantized weight}`` and, for contrast, round-to-nearest's."""
    out = {}
    for lay in plan.layers:
        if lay.format.kind != "int":
            continue
        w = weight_matrix(get_weight(model.module, lay).detach(), lay.kind)
        out[lay.param] = dequantize(rounder.codes(lay.param, w, lay.format), lay.format, w.shape[1])
    return out


def _nearest(model: LoadedModel, plan: Plan) -> dict[str, torch.Tensor]:
    out = {}
    for lay in plan.layers:
        if lay.format.kind == "int":
            base = lay.format.with_rounding("rtn")
            w = weight_matrix(get_weight(model.module, lay).detach(), lay.kind)
            out[lay.param] = dequantize(quantize_codes(w, base), base, w.shape[1])
    return out


def _applied(job: tuple[Path, Plan], tmp_path: Path, to: str) -> tuple[Path, Rounder]:
    """The job's plan applied for ``to`` (statistics found beside plans/), and the job's
    statistics as a Rounder, for the expected weights."""
    folder = job[0]
    out = tmp_path / to
    bitplan.apply(model="builtin:tiny-lm", plan=folder / "plans" / "mixed.json", out_dir=out, to=to)
    rounder = Rounder.from_folder(folder)
    assert rounder is not None
    return out, rounder


def test_compressed_tensors_holds_the_rounded_integers(
    tiny_lm_model: LoadedModel, job: tuple[Path, Plan], tmp_path: Path
) -> None:
    require_runtime("compressed_tensors")
    from tests.search.test_compressed_tensors_target import _model_free

    plan = job[1]
    out, rounder = _applied(job, tmp_path, "compressed-tensors")
    want, nearest = _rounded(tiny_lm_model, plan, rounder), _nearest(tiny_lm_model, plan)
    got = _model_free(out, torch.float32)
    differ = 0
    for param, weight in want.items():
        stored = got[opt_param(param)].float()
        assert torch.equal(stored, weight), param
        differ += not torch.equal(stored, nearest[param])
    assert differ >= len(want) - 1  # a rounding that changes nothing would prove nothing


def test_torchao_runs_the_rounded_model_at_bitplans_error(
    tiny_lm_model: LoadedModel, job: tuple[Path, Plan], tmp_path: Path
) -> None:
    require_runtime("torchao")
    plan = job[1]
    out, rounder = _applied(job, tmp_path, "torchao")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    want = _rounded(tiny_lm_model, plan, rounder)
    for lay in plan.layers:
        if lay.param in want:
            module = loaded.get_submodule(opt_name(lay.name))
            weight = module.weight
            dense = weight.dequantize() if hasattr(weight, "dequantize") else weight
            assert torch.equal(dense.float(), want[lay.param]), lay.name
    data = held_out(tiny_lm_model)
    reference = collect_reference(tiny_lm_model, data)
    planned = [lay for lay in tiny_lm_model.layers if lay.name in {p.name for p in plan.layers}]
    with PlanApplier(tiny_lm_model.module, planned, rounder=rounder) as applier:
        applier.apply(plan.choice())
        bitplan_error = measure(tiny_lm_model, data, reference)["error"]
    runtime_error = measure(replace(tiny_lm_model, module=loaded), data, reference)["error"]
    assert runtime_error == pytest.approx(bitplan_error, rel=ERROR_RTOL)
