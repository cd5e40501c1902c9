"""Apply a whole plan to a model in place, trial after trial, without a copy of the model in RAM.

The measured search evaluates hundreds of plans on one model. Restoring full-precision weights
between trials needs the originals somewhere; keeping them in memory would double the model's
footprint (a 7B model must fit where its checkpoint fits, DESIGN §6). Instead the planned weights
are written once, one at a time, to a private snapshot file on disk, and each trial reads back
only the originals of the layers whose format changed since the previous trial: a restored
layer is read straight into the live weight, a quantized one into a temporary copy of that one
weight that is quantized into the live weight and freed.

Why plain reads and not a memory map (as safetensors' ``safe_open`` gives): every page of a
mapped file that was read stays mapped, and mapped file pages count as the process's resident
memory, so after a few trials the whole snapshot was resident again (+1 checkpoint of RSS,
issue 9). Pages read with ``readinto`` land in the kernel's page cache, which the kernel
reclaims as it needs, and are not this process's memory. The file is private and temporary, so
its format is the simplest one: the weights' bytes back to back, their offsets, dtypes and
shapes kept in memory.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from types import TracebackType

import torch
from torch import nn

from bitplan.search.points import Choice
from bitplan.sensitivity.formats import QuantFormat, fake_quantize
from bitplan.sensitivity.layers import QuantLayer, get_weight, weight_matrix
from bitplan.sensitivity.rounder import Rounder

__all__ = ["PlanApplier"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Slot:
    """Where one original weight lies in the snapshot file."""

    offset: int
    dtype: torch.dtype
    shape: torch.Size


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (a view of its storage)."""
    flat = tensor.reshape(-1).view(torch.uint8)  # (numel · itemsize,)
    return flat.numpy().data


def _read_into(fh: FileIO, offset: int, tensor: torch.Tensor) -> None:
    """Fill the contiguous CPU ``tensor`` with the file's bytes at ``offset``.

    A raw read can return fewer bytes than asked (Linux stops one read near 2 GiB), so it loops.
    """
    view = _bytes_of(tensor)
    fh.seek(offset)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise OSError(f"the weight snapshot {fh.name} ends early (at byte {offset + done})")
        done += n


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
        self._path = Path(self._tmp.name) / "originals.bin"
        self._current: dict[str, QuantFormat | None] = {p: None for p in self._by_param}
        self._slots: dict[str, _Slot] = {}
        self._file: FileIO | None = None

    def __enter__(self) -> PlanApplier:
        try:
            self._snapshot()
            self._file = FileIO(self._path, "r")
        except BaseException:
            self._tmp.cleanup()
            raise
        logger.debug("snapshot of %d planned weights at %s", len(self._by_param), self._path)
        return self

    def _snapshot(self) -> None:
        """Write every planned weight's bytes, one weight at a time (a copy only for a weight
        that is not a contiguous CPU tensor already)."""
        offset = 0
        with open(self._path, "wb") as fh:
            for param, lay in self._by_param.items():
                weight = get_weight(self.model, lay).detach().cpu().contiguous()
                self._slots[param] = _Slot(offset, weight.dtype, weight.shape)
                offset += fh.write(_bytes_of(weight))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.restore()
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._tmp.cleanup()

    def _original(self, param: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The original of ``param`` read into ``into`` (a contiguous CPU tensor of its shape
        and dtype), or into a new tensor."""
        if self._file is None:
            raise RuntimeError("PlanApplier used outside its `with` block")
        slot = self._slots[param]
        if into is None:
            into = torch.empty(slot.shape, dtype=slot.dtype)
        _read_into(self._file, slot.offset, into)
        return into

    def _write(self, param: str, fmt: QuantFormat | None) -> None:
        lay = self._by_param[param]
        weight = get_weight(self.model, lay).data
        with torch.no_grad():
            if fmt is None:
                if weight.device.type == "cpu" and weight.is_contiguous():
                    self._original(param, into=weight)  # straight back, no copy
                else:
                    weight.copy_(self._original(param))
                return
            src = weight_matrix(self._original(param), lay.kind)
            dst = weight_matrix(weight, lay.kind)
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
