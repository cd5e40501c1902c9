"""Apply a whole plan to a model in place, trial after trial, without a copy of the model in RAM.

The measured search evaluates hundreds of plans on one model. Restoring full-precision weights
between trials needs the originals somewhere; keeping them in memory would double the model's
footprint (a 7B model must fit where its checkpoint fits, DESIGN §6). Instead the planned weights
are written once to a safetensors snapshot on disk and read back through a memory map: each
trial re-quantizes a layer straight from the mapped original into the live weight, and only the
layers whose format changed since the previous trial are touched.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bitplan.search.points import Choice
from bitplan.sensitivity.formats import QuantFormat, fake_quantize
from bitplan.sensitivity.layers import QuantLayer, get_weight, weight_matrix
from bitplan.sensitivity.rounder import Rounder

__all__ = ["PlanApplier"]

logger = logging.getLogger(__name__)


class PlanApplier:
    """Context manager that sets per-group formats on ``model`` and restores it on exit.

    ``apply(choice)`` takes ``{group: format}`` (a group is a share group, a tie group or a
    layer FQN, see :attr:`QuantLayer.group`); groups left out are restored to full precision.
    Formats with a rounding other than rtn are rounded by ``rounder`` (the one the sensitivity
    table was measured with, so trials see the integers that ship).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[QuantLayer],
        *,
        workdir: Path | None = None,
        rounder: Rounder | None = None,
    ) -> None:
        self.model = model
        self.rounder = rounder or Rounder()
        self.layers = list(layers)
        self._by_param: dict[str, QuantLayer] = {}
        for lay in self.layers:
            self._by_param.setdefault(lay.param, lay)  # a tied tensor is written once
        self._tmp = tempfile.TemporaryDirectory(prefix="bitplan-weights-", dir=workdir)
        self._path = Path(self._tmp.name) / "originals.safetensors"
        self._current: dict[str, QuantFormat | None] = {p: None for p in self._by_param}
        self._file: safe_open | None = None

    def __enter__(self) -> PlanApplier:
        tensors = {
            p: get_weight(self.model, lay).detach().cpu().contiguous()
            for p, lay in self._by_param.items()
        }
        save_file(tensors, str(self._path))
        del tensors
        self._file = safe_open(str(self._path), framework="pt", device="cpu")
        logger.debug("snapshot of %d planned weights at %s", len(self._by_param), self._path)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.restore()
        finally:
            self._file = None
            self._tmp.cleanup()

    def _write(self, param: str, fmt: QuantFormat | None) -> None:
        lay = self._by_param[param]
        weight = get_weight(self.model, lay)
        if self._file is None:
            raise RuntimeError("PlanApplier used outside its `with` block")
        # mapped from disk, not a copy in RAM; safetensors' safe_open is untyped
        original = self._file.get_tensor(param)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            if fmt is None:
                weight.data.copy_(original)
                return
            src = weight_matrix(original, lay.kind)
            dst = weight_matrix(weight.data, lay.kind)
            fake_quantize(src.to(dst.device), fmt, out=dst, codes=self.rounder.quantizer(param))

    def apply(self, choice: Choice) -> None:
        """Set every planned layer to ``choice[layer.group]`` (full precision when absent)."""
        if self._file is None:
            raise RuntimeError("PlanApplier.apply() outside its `with` block")
        for param, lay in self._by_param.items():
            fmt = choice.get(lay.group)
            if self._current[param] != fmt:
                self._write(param, fmt)
                self._current[param] = fmt

    def restore(self) -> None:
        """Put the full-precision weights back."""
        if self._file is not None:
            self.apply({})
