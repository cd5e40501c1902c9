"""A model and its plan in the form the Hugging Face targets write.

``--to torchao`` and ``--to compressed-tensors`` write folders that transformers loads. A
transformers model is written as it is. ``builtin:tiny-lm`` is written as its OPT twin
(:mod:`bitplan.search.builtin_hf`): the same weights and outputs under OPT's module names, so
the plan, whose layer and parameter names are the builtin model's, is renamed to the twin's
(tie and share groups too) before a writer sees it. The renamed plan describes the twin exactly:
its one layer whose shape differs, the position table with OPT's two leading rows, gets the bytes
of its real shape, and its totals are recomputed by the plan's own rules, so every writer's check
of "tensor bytes = plan bytes + its layout's extras" holds unchanged. What the conversion adds
to the user's plan is kept apart (:attr:`HfForm.conversion_bytes`), so the writers report the
bytes on disk against the plan the user made.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bitplan.search.builtin_hf import TWIN_ARCHITECTURE, OptTwin, byte_tokenizer, opt_twin
from bitplan.search.plans import Plan, make_plan
from bitplan.search.targets import check_plan_matches
from bitplan.sensitivity.builtin_nets import TinyLM
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.layers import QuantLayer, find_quant_layers, parameter_bytes
from bitplan.sensitivity.models import LoadedModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["CONVERSION_CAUSE", "HfForm", "hf_form"]

# The name of the bytes the OPT twin adds, in notes and reports: OPT's leading position rows.
CONVERSION_CAUSE = "opt_position_rows"


@dataclass(frozen=True)
class HfForm:
    """``model`` (a transformers model) and ``plan`` (in its names), ready for a writer.

    ``plan_total_bytes`` is the ``total_bytes`` of the plan the user gave; ``conversion`` is
    None for a transformers model, else what the conversion did (JSON-ready: source,
    architecture, module names, bytes added) for a writer's note; ``conversion_bytes`` the
    bytes it added (``plan.totals.total_bytes - plan_total_bytes``).
    """

    model: LoadedModel
    plan: Plan
    plan_total_bytes: int
    conversion: dict[str, Any] | None = None

    @property
    def conversion_bytes(self) -> int:
        return self.plan.totals.total_bytes - self.plan_total_bytes

    def param_names(self, original: Plan) -> dict[str, str]:
        """``{parameter in the written model: parameter in the model the plan was made for}``
        (the plan keeps its layers' order when renamed)."""
        return {
            new.param: old.param for new, old in zip(self.plan.layers, original.layers, strict=True)
        }

    @property
    def module(self) -> PreTrainedModel:
        """``model.module``, which :func:`hf_form` made a transformers model."""
        from transformers import PreTrainedModel

        module = self.model.module
        if not isinstance(module, PreTrainedModel):
            raise TypeError(f"{self.model.ref} is no transformers model: build with hf_form")
        return module


def _renamed_share(share: str | None, twin: OptTwin) -> str | None:
    """A share group ``<parent module>.<rule>`` under the twin's parent name (labels that name
    no module stay as they are: they only need to be equal within the plan)."""
    if share is None:
        return None
    parent, _, rule = share.rpartition(".")
    return f"{twin.modules[parent]}.{rule}" if parent in twin.modules else share


def _twin_plan(plan: Plan, twin: OptTwin) -> tuple[Plan, list[QuantLayer]]:
    """``plan`` in the twin's names, and the twin's planned layers (share groups set), both in
    the plan's order."""
    found = {lay.name: lay for lay in find_quant_layers(twin.module)}
    renamed = {twin.hf_name(lay.name): lay for lay in plan.layers}
    layers = [
        replace(found[name], share=_renamed_share(lay.share, twin)) for name, lay in renamed.items()
    ]
    unplanned, fp16 = parameter_bytes(twin.module, layers)
    mapped = make_plan(
        model_ref=plan.model_ref,
        model_sha256=plan.model_sha256,
        layers=layers,
        choice={lay.group: renamed[lay.name].format for lay in layers},
        budget=None,
        unplanned_bytes=unplanned,
        fp16_bytes=fp16,
        predicted_error=plan.predicted_error,
        metrics=plan.metrics,
    )
    return mapped.model_copy(update={"budget": plan.budget}), layers


def _check_unplanned(model: LoadedModel, plan: Plan) -> None:
    """The plan's unplanned bytes must be this model's, or the renamed totals would mislead."""
    planned = [lay for lay in model.layers if lay.name in {p.name for p in plan.layers}]
    unplanned, _ = parameter_bytes(model.module, planned)
    if unplanned != plan.totals.unplanned_bytes:
        raise InputError(
            f"the plan counts {plan.totals.unplanned_bytes} unplanned bytes but this model has "
            f"{unplanned}; apply it to the model it was made for"
        )


def hf_form(model: LoadedModel, plan: Plan) -> HfForm | None:
    """``model`` and ``plan`` as a transformers model and its plan; None when ``model`` is
    neither a transformers model nor a builtin LM with a transformers twin.

    For ``builtin:tiny-lm`` the plan must be the model's (same weights, layers and byte
    totals: an :class:`InputError` otherwise); the twin is a new module, ``model.module``
    is not changed.
    """
    from transformers import PreTrainedModel

    module = model.module
    if isinstance(module, PreTrainedModel):
        return HfForm(model=model, plan=plan, plan_total_bytes=plan.totals.total_bytes)
    if not isinstance(module, TinyLM):
        return None
    check_plan_matches(model, plan)
    _check_unplanned(model, plan)
    twin = opt_twin(module)
    mapped, layers = _twin_plan(plan, twin)
    loaded = replace(
        model,
        module=twin.module,
        layers=layers,
        tokenizer=byte_tokenizer(max_length=module.config.block_size),
    )
    form = HfForm(model=loaded, plan=mapped, plan_total_bytes=plan.totals.total_bytes)
    conversion = {
        "from": model.ref,
        "architecture": TWIN_ARCHITECTURE,
        "modules": {lay.name: twin.hf_name(lay.name) for lay in plan.layers},
        "position_rows_added": twin.position_rows,
        "extra_bytes": {CONVERSION_CAUSE: form.conversion_bytes},
    }
    return replace(form, conversion=conversion)
