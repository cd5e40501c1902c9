"""Plans measured end-to-end on a model never whole in memory: ``bitplan search --blockwise``.

A job on a decoder LM larger than memory (:func:`~bitplan.search.pipeline.run_job` with
``blockwise``) loads the model as a skeleton (:func:`~bitplan.sensitivity.lazy_hf.load_skeleton`)
and computes its ``layer`` sensitivity block by block (:mod:`bitplan.sensitivity.blockwise`).
The search, the frontier validation and the uniform baselines then measure plans as a whole
model's job does (the pipeline's evaluators, the built-in metrics of DESIGN §7 against a
full-precision reference), except for where the outputs come from: :class:`StreamedPlans`
stands where the whole-model job's :class:`~bitplan.search.applier.PlanApplier` stands, and
each measurement is one streamed pass (:func:`~bitplan.sensitivity.blockwise_walk.stream_logits`):

- the stages' weights are read from the safetensors files one at a time (the embeddings, each
  transformer block, the final norm with the head);
- once read, the plan's formats are applied to the stage's planned weights, fake-quantized in
  place by :func:`~bitplan.sensitivity.formats.fake_quantize` with the job's
  :class:`~bitplan.sensitivity.rounder.Rounder` (the arithmetic and the rounded codes the
  applier writes for a whole model);
- the activations of the split pass from stage to stage, and the head's logits of each batch go
  to the metric, which compares them with the reference (collected the same way, in full
  precision, once per split, and kept compact: :mod:`bitplan.sensitivity.divergence`).

The whole network runs, so the calibration and held-out figures are end-to-end, equal to a
whole-model measurement of the same plan (the same operations on the same tensors; the tests
check it). Plans say so in their ``scope`` (:func:`~bitplan.search.plans.metrics_scope`).
Memory: one stage's weights, the activations of the split, one batch's logits and the
reference; the price is time: every measured plan reads the whole checkpoint once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from bitplan.search.points import Choice
from bitplan.sensitivity.blockwise import blockwise_rounder, check_blockwise_method
from bitplan.sensitivity.blockwise_walk import stream_logits
from bitplan.sensitivity.data import CalibData
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat, fake_quantize
from bitplan.sensitivity.layers import QuantLayer, weight_matrix
from bitplan.sensitivity.lazy_hf import SkeletonModel
from bitplan.sensitivity.models import LoadedModel
from bitplan.sensitivity.progress import CancelFn
from bitplan.sensitivity.rounder import Rounder

__all__ = ["StreamedPlans", "check_blockwise_job", "streamed_rounder"]

logger = logging.getLogger(__name__)


def check_blockwise_job(method: str, *, user_metric: bool) -> None:
    """What a block-wise job refuses before anything is loaded: a method other than ``layer``,
    and a caller's own metric (it scores a whole module, which a block-wise job never has)."""
    check_blockwise_method(method)
    if user_metric:
        raise InputError(
            "a block-wise job measures the built-in metrics only: a user metric scores the "
            "whole model module, which a block-wise job never holds; run the job whole"
        )


def _skeleton(model: LoadedModel) -> SkeletonModel:
    if not isinstance(model, SkeletonModel) or model.checkpoint is None:
        raise TypeError("a block-wise job needs a skeleton from load_skeleton")
    return model


def streamed_rounder(
    model: LoadedModel,
    calib: CalibData,
    *,
    batch_size: int,
    workdir: Path,
    should_cancel: CancelFn | None = None,
) -> Rounder:
    """:func:`~bitplan.sensitivity.analyzer.rounder_for` for a skeleton: the calibration split's
    input statistics of every planned layer, collected block by block, written under
    ``workdir`` beside the plans as a whole-model job writes them (``bitplan apply`` reads
    them there)."""
    if len(calib) == 0:
        raise InputError("the calibration data is empty; data-aware rounding needs samples")
    return blockwise_rounder(
        _skeleton(model),
        batches=lambda: calib.batches(batch_size, device=model.device),
        workdir=workdir,
        should_cancel=should_cancel,
    )


class StreamedPlans:
    """The plan applier of a block-wise job: ``apply(choice)`` sets the plan that the next
    streamed passes (:meth:`outputs`) put on each stage's weights as they are read.

    ``choice`` is ``{group: format}`` as for :class:`~bitplan.search.applier.PlanApplier`
    (groups left out stay in full precision). A context manager like the applier; the skeleton
    holds no weights between passes, so there is nothing to restore on exit.
    """

    def __init__(
        self,
        model: LoadedModel,
        layers: Sequence[QuantLayer],
        *,
        rounder: Rounder | None = None,
        should_cancel: CancelFn | None = None,
    ) -> None:
        self.model = _skeleton(model)
        self.rounder = rounder or Rounder()
        self.should_cancel = should_cancel
        # A layer's weight is the parameter slot `<module>.weight`; a tied tensor has a slot in
        # each module that uses it (the embedding and the head), each quantized alike.
        self._by_slot = {f"{lay.name}.weight": lay for lay in layers}
        self.choice: dict[str, QuantFormat] = {}

    def __enter__(self) -> StreamedPlans:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def apply(self, choice: Choice) -> None:
        """Measure ``choice`` from the next pass on."""
        self.choice = dict(choice)

    def restore(self) -> None:
        """Full precision from the next pass on."""
        self.choice = {}

    def _quantize(self, slots: Sequence[str]) -> None:
        """Fake-quantize the planned weights among the freshly read ``slots`` in place."""
        module = self.model.module
        for slot in slots:
            lay = self._by_slot.get(slot)
            fmt = None if lay is None else self.choice.get(lay.group)
            if lay is None or fmt is None:
                continue
            view = weight_matrix(module.get_parameter(slot).data, lay.kind)
            fake_quantize(view, fmt, out=view, codes=self.rounder.quantizer(lay.param))

    def outputs(self, data: CalibData, batch_size: int) -> Iterator[torch.Tensor]:
        """The logits of ``data``'s batches of ``batch_size`` with the current plan, streamed
        block by block from disk."""
        model = self.model

        def batches() -> Iterator[dict[str, Any]]:
            return data.batches(batch_size, device=model.device)

        return stream_logits(
            model, batches, prepare=self._quantize, should_cancel=self.should_cancel
        )
