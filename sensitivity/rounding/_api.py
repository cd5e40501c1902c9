"""``round_codes``: one entry point that checks its inputs and picks the rounding.

Rounding is a per-layer choice beside the format. It changes which codes, scales and
zero-points are stored, never how many bytes: every method returns a
:class:`~bitplan.sensitivity.formats.QuantCodes` on the format's own grid (int16 codes in range,
fp16 scales per group, integer zero-points for ``-asym``), so every export carries the rounded
integers and :func:`~bitplan.sensitivity.formats.tensor_bytes` is unchanged.

Only bitplan's int formats have a free grid to choose on; fp8, the plain casts and llama.cpp's
block formats (whose scales ggml derives itself) support only ``rtn``.
"""

from __future__ import annotations

import logging
import time

import torch

from bitplan.sensitivity.format_spec import ROUNDINGS
from bitplan.sensitivity.formats import QuantCodes, QuantFormat, quantize_codes
from bitplan.sensitivity.rounding._awq import awq_codes
from bitplan.sensitivity.rounding._errors import RoundingError
from bitplan.sensitivity.rounding._gptq import gptq_codes
from bitplan.sensitivity.rounding._hqq import hqq_codes

__all__ = ["ROUNDINGS", "RoundingError", "round_codes"]

logger = logging.getLogger(__name__)


def round_codes(
    w: torch.Tensor,
    fmt: QuantFormat,
    rounding: str,
    *,
    gram: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
) -> QuantCodes:
    """Codes of a ``[rows, cols]`` matrix in ``fmt``, rounded by ``rounding``.

    - ``rtn``: round to nearest, exactly :func:`~bitplan.sensitivity.formats.quantize_codes`;
    - ``gptq``: error-compensating rounding; needs ``gram`` (``H = X·Xᵀ``, ``[cols, cols]``);
    - ``awq``: AWQ's clip search; needs ``gram`` or ``act_scale`` (mean ``|x|`` per input
      channel, ``[cols]``), not both;
    - ``hqq``: data-free optimised scales and zero-points.

    ``rtn`` and ``hqq`` use no calibration statistics and ignore any given. ``fmt`` is the
    storage format; one that names a rounding (``int4-g128+gptq``) must name ``rounding``.
    """
    if rounding not in ROUNDINGS:
        raise RoundingError(f"unknown rounding {rounding!r}; accepted: {', '.join(ROUNDINGS)}")
    if fmt.rounding != "rtn":
        if fmt.rounding != rounding:
            raise RoundingError(f"{fmt.name} is rounded by {fmt.rounding}, not {rounding}")
        fmt = fmt.with_rounding("rtn")  # the grid alone: what quantize_codes and dequantize take
    if w.dim() != 2 or w.numel() == 0:
        raise RoundingError(f"expected a non-empty [rows, cols] matrix, got shape {tuple(w.shape)}")
    if rounding == "rtn":
        return quantize_codes(w, fmt)
    if fmt.kind != "int":
        raise RoundingError(
            f"{fmt.name} supports only rtn rounding ({rounding} needs an int{{b}}[-g{{G}}]"
            "[-asym] format, whose scales bitplan chooses)"
        )
    w = w.detach().to(torch.float32)
    rows, cols = w.shape
    started = time.perf_counter()
    with torch.no_grad():
        codes = _dispatch(w, fmt, rounding, gram=gram, act_scale=act_scale)
    logger.debug(
        "%s rounding of a %dx%d matrix in %s took %.2f s",
        rounding,
        rows,
        cols,
        fmt.name,
        time.perf_counter() - started,
    )
    return codes


def _dispatch(
    w: torch.Tensor,
    fmt: QuantFormat,
    rounding: str,
    *,
    gram: torch.Tensor | None,
    act_scale: torch.Tensor | None,
) -> QuantCodes:
    cols = w.shape[1]
    if rounding == "hqq":
        return hqq_codes(w, fmt)
    if rounding == "gptq":
        if gram is None:
            raise RoundingError("gptq needs gram, the [cols, cols] Gram matrix X·Xᵀ")
        return gptq_codes(w, fmt, _checked_gram(gram, cols, w.device))
    if gram is not None and act_scale is not None:
        raise RoundingError("awq takes gram or act_scale, not both: pass one of them")
    if gram is not None:
        return awq_codes(w, fmt, gram=_checked_gram(gram, cols, w.device))
    if act_scale is not None:
        return awq_codes(w, fmt, act_scale=_checked_act_scale(act_scale, cols, w.device))
    raise RoundingError(
        "awq needs gram (X·Xᵀ, [cols, cols]) or act_scale (mean |x| per input channel, [cols])"
    )


def _checked_gram(gram: torch.Tensor, cols: int, device: torch.device) -> torch.Tensor:
    if tuple(gram.shape) != (cols, cols):
        raise RoundingError(
            f"gram has shape {tuple(gram.shape)}; expected ({cols}, {cols}) for a matrix with "
            f"{cols} columns (one Gram matrix per convolution group: pass each group's rows "
            "separately)"
        )
    gram = gram.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(gram).all()):
        raise RoundingError("gram has non-finite entries (inf or NaN)")
    return gram


def _checked_act_scale(act_scale: torch.Tensor, cols: int, device: torch.device) -> torch.Tensor:
    if tuple(act_scale.shape) != (cols,):
        raise RoundingError(f"act_scale has shape {tuple(act_scale.shape)}; expected ({cols},)")
    act_scale = act_scale.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(act_scale).all()) or bool((act_scale < 0).any()):
        raise RoundingError("act_scale must be finite and non-negative (mean |x| per channel)")
    return act_scale
