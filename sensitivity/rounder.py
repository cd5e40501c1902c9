"""The one place that turns a weight and a format *with its rounding* into codes.

A planning option is a storage format plus a rounding (``int4-g128+gptq``, see
:class:`~bitplan.sensitivity.format_spec.QuantFormat`). Round-to-nearest needs nothing but the
weight; GPTQ and AWQ also need the layer's calibration inputs, summarised as its input Gram
matrix ``H = X·Xᵀ`` (the same statistics the ``layer`` method collects). A :class:`Rounder`
holds those matrices, memory-mapped from a safetensors file on disk (a 7B model's are tens of
GB), and is handed to everything that quantizes a weight: the sensitivity methods, the plan
applier of the measured search, the packed artifact and every runtime export. So the integers
that were measured are the integers that ship: nothing else calls the rounding algorithms.

A ``Rounder()`` without statistics serves round-to-nearest and the data-free roundings; asking it
for a data-aware one is an :class:`~bitplan.sensitivity.errors.InputError` that says to pass the
calibration data.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bitplan.sensitivity.atomic import write_atomic
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import DATA_AWARE_ROUNDINGS, QuantFormat
from bitplan.sensitivity.formats import QuantCodes, quantize_codes
from bitplan.sensitivity.half_products import run_module
from bitplan.sensitivity.layers import QuantLayer
from bitplan.sensitivity.methods._gram import gram_matrices
from bitplan.sensitivity.methods.layer import (
    DEFAULT_STATS_BYTES,
    collect_input_stats,
    plan_passes,
)
from bitplan.sensitivity.progress import CancelFn
from bitplan.sensitivity.rounding import concat_codes, round_codes

__all__ = ["STATS_GLOB", "Rounder", "collect_rounder", "needs_data", "write_stats"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]

# The statistics files a job leaves beside its plans (one per forward pass), which
# ``bitplan apply`` reads to ship the integers the search measured.
STATS_GLOB = "rounding-stats-*.safetensors"
_STATS_NAME = "rounding-stats-{}.safetensors"
# Codes a Rounder keeps for reuse (int16 codes: 2 bytes a weight, so ~128 M weights' worth).
DEFAULT_CACHE_BYTES = 256 << 20
_ROWS_KEY = "bitplan.rows"  # safetensors metadata: {param: rows}, for convolution blocks


def needs_data(formats: Iterable[QuantFormat]) -> bool:
    """Whether any of ``formats`` has a rounding that needs calibration statistics."""
    return any(f.rounding in DATA_AWARE_ROUNDINGS for f in formats)


class Rounder:
    """Codes of planned weights in formats with roundings; see the module docstring.

    ``grams`` maps a parameter name to its ``[groups, cols, cols]`` float32 input Gram matrix
    (``groups > 1`` only for grouped convolutions, whose blocks of ``rows // groups`` rows see
    their own inputs). Parameters without one (embeddings, layers that never ran) are rounded by
    the data-aware methods as if every input direction weighed the same (``H = I``).
    """

    def __init__(
        self,
        grams: Mapping[str, torch.Tensor] | None = None,
        *,
        rows: Mapping[str, int] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self._grams = grams
        self._rows = dict(rows or {})
        self.has_data = grams is not None
        # The measured search switches a layer between the same few options many times, and
        # GPTQ costs a second or more per large matrix: recent codes are kept, least recently
        # used dropped first, up to ``cache_bytes``.
        self._cache: OrderedDict[tuple[str, str, int, int], QuantCodes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0

    @classmethod
    def load(cls, files: Sequence[Path]) -> Rounder:
        """The statistics :func:`collect_rounder` wrote, memory-mapped from ``files``."""
        mapped = _MappedTensors(files)
        return cls(mapped, rows=mapped.rows)

    @classmethod
    def from_folder(cls, folder: Path) -> Rounder | None:
        """The statistics a job left in ``folder`` (None when it left none)."""
        files = sorted(folder.glob(STATS_GLOB))
        return cls.load(files) if files else None

    def codes(self, param: str, w: torch.Tensor, fmt: QuantFormat, *, row0: int = 0) -> QuantCodes:
        """Codes of rows ``row0 : row0 + len(w)`` of ``param``'s ``[rows, cols]`` matrix (``w``
        must be those rows of the original weight: cached codes are keyed by their place)."""
        if fmt.rounding == "rtn":
            return quantize_codes(w, fmt)
        key = (param, fmt.name, row0, w.shape[0])
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        codes = self._round(param, w, fmt, row0)
        self._remember(key, codes)
        return codes

    def _remember(self, key: tuple[str, str, int, int], codes: QuantCodes) -> None:
        size = _nbytes(codes)
        if size > self._cache_bytes:
            return
        self._cache[key] = codes
        self._cached += size
        while self._cached > self._cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= _nbytes(old)

    def _round(self, param: str, w: torch.Tensor, fmt: QuantFormat, row0: int) -> QuantCodes:
        base = fmt.with_rounding("rtn")
        w = w.detach().to(torch.float32)
        if fmt.rounding not in DATA_AWARE_ROUNDINGS:
            return round_codes(w, base, fmt.rounding)
        if self._grams is None:
            raise InputError(
                f"{param} is planned as {fmt.name}: {fmt.rounding} rounding is computed from "
                "the calibration inputs; give the calibration data the plan was made with"
            )
        gram = self._grams.get(param)
        if gram is None:
            eye = torch.eye(w.shape[1], dtype=torch.float32, device=w.device)
            return round_codes(w, base, fmt.rounding, gram=eye)
        if gram.shape[0] > 1 and param not in self._rows:
            raise ValueError(f"{param} has {gram.shape[0]} input blocks but no row count")
        per_block = self._rows.get(param, 0) // gram.shape[0] or w.shape[0] + row0
        parts = []
        start = 0
        while start < w.shape[0]:  # a chunk of rows may span convolution blocks
            block = (row0 + start) // per_block
            stop = min(w.shape[0], (block + 1) * per_block - row0)
            h = gram[block].to(torch.float32)  # (cols, cols)
            parts.append(round_codes(w[start:stop], base, fmt.rounding, gram=h))
            start = stop
        return concat_codes(parts)

    def renamed(self, names: Mapping[str, str]) -> Rounder:
        """This rounder for a model whose parameters were renamed (``{new: old}``), e.g. a
        builtin model written as a transformers twin: same statistics, same cache."""
        return _Renamed(self, names)

    def quantizer(self, param: str) -> Callable[[torch.Tensor, QuantFormat, int], QuantCodes]:
        """``codes(chunk, fmt, row0)`` of ``param``, for :func:`fake_quantize`'s ``codes``."""
        return lambda chunk, fmt, row0: self.codes(param, chunk, fmt, row0=row0)


class _Renamed(Rounder):
    def __init__(self, inner: Rounder, names: Mapping[str, str]) -> None:
        super().__init__(cache_bytes=0)
        self._inner, self._names = inner, dict(names)
        self.has_data = inner.has_data

    def codes(self, param: str, w: torch.Tensor, fmt: QuantFormat, *, row0: int = 0) -> QuantCodes:
        return self._inner.codes(self._names.get(param, param), w, fmt, row0=row0)


def _nbytes(codes: QuantCodes) -> int:
    parts = (codes.q, codes.scale, codes.zero)
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def collect_rounder(
    module: nn.Module,
    layers: Sequence[QuantLayer],
    *,
    batches: Callable[[], Iterable[Batch]],
    workdir: Path,
    forward: Callable[[Batch], Any] | None = None,
    max_stats_bytes: int = DEFAULT_STATS_BYTES,
    should_cancel: CancelFn | None = None,
) -> Rounder:
    """A :class:`Rounder` with every planned layer's input Gram matrix, from forward passes over
    the calibration data (one for a model whose statistics fit ``max_stats_bytes``).

    The matrices go to safetensors files under ``workdir`` pass by pass and are read back
    through memory maps, so RAM holds one pass's statistics at a time. A tied tensor's matrix is
    the sum over the linear layers that use it (the output error of a shared weight adds up over
    its uses); an embedding's use adds nothing (its inputs are one-hot token ids).
    """
    forward = forward or (lambda batch: run_module(module, batch))
    files = []
    for i, group in enumerate(plan_passes(module, layers, max_stats_bytes)):
        stats = collect_input_stats(
            module, group, batches, forward, on_batch=lambda: None, should_cancel=should_cancel
        )
        files.append(write_stats(workdir, i, group, gram_matrices(group, stats)))
        del stats
    logger.info("input statistics of %d layers for data-aware rounding", len(layers))
    return Rounder.load(files)


def write_stats(
    workdir: Path, index: int, layers: Sequence[QuantLayer], grams: Mapping[str, torch.Tensor]
) -> Path:
    """Write the Gram matrices ``{param: H}`` of ``layers`` as statistics file ``index`` under
    ``workdir`` (what :meth:`Rounder.load` reads); returns its path."""
    path = workdir / _STATS_NAME.format(index)
    rows = {lay.param: lay.shape[0] for lay in layers}
    # Renamed into place: a process killed mid-write leaves no half file that
    # ``from_folder`` (which globs STATS_GLOB) would later fail to open.
    tensors = {k: v.contiguous() for k, v in grams.items()}
    meta = {_ROWS_KEY: json.dumps(rows)}
    write_atomic(path, functools.partial(save_file, tensors, metadata=meta))
    return path


class _MappedTensors(Mapping[str, torch.Tensor]):
    """Tensors of safetensors files, read from disk when asked for (never all in RAM)."""

    def __init__(self, files: Sequence[Path]) -> None:
        self._where: dict[str, Any] = {}
        self.rows: dict[str, int] = {}
        for path in files:
            handle = safe_open(str(path), framework="pt", device="cpu")
            # safetensors' safe_open is untyped
            meta = handle.metadata() or {}  # type: ignore[no-untyped-call]
            self.rows.update(json.loads(meta.get(_ROWS_KEY, "{}")))
            for key in handle.keys():  # type: ignore[no-untyped-call]  # noqa: SIM118
                self._where[key] = handle

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor: torch.Tensor = self._where[key].get_tensor(key)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
