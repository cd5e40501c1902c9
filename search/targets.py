"""Where ``bitplan apply`` writes a planned model: one registry of targets, name -> writer.

Four targets, each a file set one runtime loads:

- ``bitplan``: the bit-packed safetensors only bitplan reads (:mod:`bitplan.search.artifact`);
- ``torchao``: a Hugging Face folder that transformers + torchao load
  (:mod:`bitplan.search.runtime_torchao`; ``builtin:tiny-lm`` goes as its transformers twin,
  :mod:`bitplan.search.hf_form`);
- ``gguf``: one ``model.gguf`` that llama.cpp loads (:mod:`bitplan.search.runtime_gguf`);
- ``compressed-tensors``: a Hugging Face folder that vLLM and transformers load through the
  compressed-tensors package (:mod:`bitplan.search.runtime_compressed_tensors`).

A writer is named by ``module:function`` and imported only when chosen, so a runtime's heavy
imports cost nothing to the other targets; the runtime packages it needs (the ``runtimes``
extra) are imported first, and a missing one is an :class:`InputError` that says how to
install them, not a traceback. Adding a target is one entry of :data:`TARGETS`; every writer
takes ``(*, model, plan, out_dir)`` and returns an
:class:`~bitplan.search.artifact.ArtifactReport` (whose docstring says what ``.path`` is per
target). The checks every writer makes of a plan live here too, so they say the same thing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from bitplan.sensitivity.errors import InputError

if TYPE_CHECKING:  # the CLI reads TARGETS for its help, which must not load pydantic or torch
    from bitplan.search.artifact import ArtifactReport
    from bitplan.search.plans import Plan
    from bitplan.sensitivity.models import LoadedModel
    from bitplan.sensitivity.rounder import Rounder

__all__ = [
    "DEFAULT_TARGET",
    "RUNTIMES_INSTALL",
    "TARGETS",
    "Target",
    "TargetWriter",
    "check_model_hash",
    "check_plan_matches",
    "name_list",
    "target_writer",
]

RUNTIMES_INSTALL = "pip install 'bitplan[runtimes]'"
# How many names an error lists before "and N more", so it stays one readable line.
_NAMED = 4


class TargetWriter(Protocol):
    """``writer(model=..., plan=..., out_dir=..., rounder=...)``: write the files, report their
    bytes. ``rounder`` makes the codes of layers planned with a rounding other than rtn (the
    integers the job measured); None rounds to nearest."""

    def __call__(
        self, *, model: LoadedModel, plan: Plan, out_dir: Path, rounder: Rounder | None = None
    ) -> ArtifactReport: ...


@dataclass(frozen=True)
class Target:
    """One output of ``bitplan apply --to NAME``: what it is and the writer that makes it."""

    name: str
    description: str
    writer: str  # "module:function", imported on use
    needs: tuple[str, ...] = ()  # runtime packages (the 'runtimes' extra), imported first


DEFAULT_TARGET = "bitplan"

TARGETS: Final[dict[str, Target]] = {
    target.name: target
    for target in (
        Target(
            "bitplan",
            "bit-packed safetensors whose bytes equal the plan's (bitplan loads them)",
            "bitplan.search.artifact:apply_plan",
        ),
        Target(
            "torchao",
            "a Hugging Face folder that transformers + torchao load (Hugging Face models and "
            "builtin:tiny-lm)",
            "bitplan.search.runtime_torchao:write_torchao",
            ("torchao",),
        ),
        Target(
            "gguf",
            "one model.gguf that llama.cpp loads, planned tensors in their llama.cpp formats",
            "bitplan.search.runtime_gguf:write_gguf_target",
            ("gguf",),
        ),
        Target(
            "compressed-tensors",
            "a Hugging Face folder in the compressed-tensors format that vLLM and transformers "
            "load (Hugging Face models and builtin:tiny-lm)",
            "bitplan.search.runtime_compressed_tensors:write_compressed_tensors",
            ("compressed_tensors",),
        ),
    )
}


def target_writer(name: str) -> TargetWriter:
    """The writer of target ``name``, its runtime packages imported.

    An unknown name is an error that lists the targets; a missing runtime package one that
    says how to install it.
    """
    target = TARGETS.get(name)
    if target is None:
        raise InputError(f"unknown target {name!r}; accepted: {', '.join(TARGETS)}")
    module, function = target.writer.split(":")
    try:
        for package in target.needs:
            importlib.import_module(package)
        writer: Callable[..., ArtifactReport] = getattr(importlib.import_module(module), function)
    except ImportError as err:
        missing = f" ({err.name} is not installed)" if err.name else ""
        raise InputError(
            f"`--to {name}` needs the runtime packages: {RUNTIMES_INSTALL}{missing}"
        ) from None
    return writer


def name_list(names: Sequence[str]) -> str:
    """``"a, b, c, d and 3 more"``: the first few of ``names`` for a one-line error."""
    more = f" and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
    return ", ".join(names[:_NAMED]) + more


def check_model_hash(model: LoadedModel, plan: Plan) -> None:
    """Refuse a plan made for other weights: the model hash it records is not this model's."""
    want = plan.model_sha256
    if want and want != model.sha256:
        raise InputError(
            f"the plan was made for model sha256 {want[:12]}…, this model is "
            f"{model.sha256[:12]}…; apply it to the model it was made for"
        )


def check_plan_matches(model: LoadedModel, plan: Plan) -> None:
    """Refuse a plan made for other weights or naming layers this model does not plan.

    The same model hash, and every plan layer one of the model's quantizable layers with the
    same ``[rows, cols]`` shape (when the plan records it).
    """
    check_model_hash(model, plan)
    shapes = {lay.name: lay.shape for lay in model.layers}
    for lay in plan.layers:
        if lay.name not in shapes:
            raise InputError(f"the plan names layer {lay.name}, which this model does not plan")
        if lay.shape is not None and tuple(lay.shape) != shapes[lay.name]:
            raise InputError(
                f"the plan's layer {lay.name} is {list(lay.shape)} but the model's is "
                f"{list(shapes[lay.name])}; apply it to the model it was made for"
            )
