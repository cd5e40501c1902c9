"""What the tests of ``builtin:tiny-lm`` in the Hugging Face targets share: plans by pattern,
bitplan's reference logits and weights, held-out error through a runtime, OPT's names written
out by hand, and the tolerances.

Tolerance: the OPT twin holds the builtin model's weights bit for bit and a runtime's loaded
weights are bitplan's fake-quantized ones exactly (the HF target tests prove that), so logits
can differ only by float summation order: TinyLM calls SDPA with scale 1/√16 and a boolean
causal mask, OPT scales q by 0.25 first (a power of two: exact) and calls SDPA with scale 1 and
its own mask. On the CPU the two are bit for bit equal; a relative bound of 1e-5 of the largest
logit (~80× the float32 epsilon: the rounding of a few sums of 64-256 terms) leaves room for
another kernel order (the loaded weights themselves are compared exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from fnmatch import fnmatchcase

import torch

from bitplan.search.applier import PlanApplier
from bitplan.search.plans import Plan, make_plan
from bitplan.sensitivity.data import CalibData, load_calibration
from bitplan.sensitivity.formats import parse_format
from bitplan.sensitivity.layers import parameter_bytes
from bitplan.sensitivity.metrics import collect_reference, measure
from bitplan.sensitivity.models import LoadedModel

# Relative bound on |Δ logits| (module docstring).
LOGIT_RTOL = 1e-5
# The bound on |error through the runtime / error bitplan measured - 1|.
ERROR_RTOL = 0.02
HELD_OUT_WINDOWS = 16  # of the builtin text's held-out windows of 64 bytes


def opt_name(name: str) -> str:
    """OPT's module name of a tiny-lm module, from ``modeling_opt.py`` by hand (not bitplan's
    table, which these tests check)."""
    fixed = {
        "wte": "model.decoder.embed_tokens",
        "wpe": "model.decoder.embed_positions",
        "ln_f": "model.decoder.final_layer_norm",
        "lm_head": "lm_head",
    }
    if name in fixed:
        return fixed[name]
    _, block, rest = name.split(".", 2)  # blocks.{i}.{rest}
    leaf = {
        "attn.q_proj": "self_attn.q_proj",
        "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj",
        "attn.o_proj": "self_attn.out_proj",
        "fc_in": "fc1",
        "fc_out": "fc2",
    }[rest]
    return f"model.decoder.layers.{block}.{leaf}"


def opt_param(param: str) -> str:
    """OPT's name of a tiny-lm weight (``lm_head.weight`` is ``wte.weight``'s tensor, which a
    plan names by its first name: OPT's ``embed_tokens``)."""
    return f"{opt_name(param.removesuffix('.weight'))}.weight"


def plan_by_pattern(model: LoadedModel, formats: Mapping[str, str | None]) -> Plan:
    """A plan of ``model``: each layer takes the format of the first fnmatch pattern it
    matches; None (or no match) leaves it out of the plan, as ``--exclude`` would."""

    def fmt(name: str) -> str | None:
        return next((f for p, f in formats.items() if fnmatchcase(name, p)), None)

    layers = [lay for lay in model.layers if fmt(lay.name) is not None]
    unplanned, fp16 = parameter_bytes(model.module, layers)
    return make_plan(
        model_ref=model.ref,
        model_sha256=model.sha256,
        layers=layers,
        choice={lay.group: parse_format(str(fmt(lay.name))) for lay in layers},
        budget=None,
        unplanned_bytes=unplanned,
        fp16_bytes=fp16,
        predicted_error=None,
    )


def held_out(model: LoadedModel) -> CalibData:
    """16 windows of 64 bytes of the builtin text that training never saw (``--calib
    builtin``)."""
    return load_calibration("builtin", model, max_samples=HELD_OUT_WINDOWS)


def logits_of(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, T, V]`` logits of a builtin or transformers LM."""
    with torch.no_grad():
        out = module(input_ids=ids)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def fake_quantized_logits(model: LoadedModel, plan: Plan, ids: torch.Tensor) -> torch.Tensor:
    """bitplan's fake-quantized model's logits (the model is restored afterwards)."""
    planned = [lay for lay in model.layers if lay.name in {p.name for p in plan.layers}]
    with PlanApplier(model.module, planned) as applier:
        applier.apply(plan.choice())
        return logits_of(model.module, ids)


def fake_quantized_weights(model: LoadedModel, plan: Plan) -> dict[str, torch.Tensor]:
    """bitplan's fake-quantized weights of the planned layers, by module name."""
    planned = [lay for lay in model.layers if lay.name in {p.name for p in plan.layers}]
    with PlanApplier(model.module, planned) as applier:
        applier.apply(plan.choice())
        return {
            lay.name: model.module.get_submodule(lay.name).weight.detach().clone()
            for lay in planned
        }


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> float:
    """``got`` within :data:`LOGIT_RTOL` of the largest logit of ``want``; the max |Δ|."""
    diff = float((got - want).abs().max())
    assert diff <= LOGIT_RTOL * float(want.abs().max()), diff
    return diff


def held_out_errors(
    model: LoadedModel, plan: Plan, runtime: torch.nn.Module, data: CalibData
) -> tuple[float, float]:
    """``(through the runtime, bitplan's)``: bitplan's held-out error metric (next-token KL to
    the full-precision builtin model) of the ``runtime``'s loaded module and of bitplan's
    fake-quantized model, on the same windows and reference."""
    reference = collect_reference(model, data)
    planned = [lay for lay in model.layers if lay.name in {p.name for p in plan.layers}]
    with PlanApplier(model.module, planned) as applier:
        applier.apply(plan.choice())
        bitplan_error = measure(model, data, reference)["error"]
    runtime_error = measure(replace(model, module=runtime), data, reference)["error"]
    return runtime_error, bitplan_error
