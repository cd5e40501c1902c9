"""Quantization formats: the reference fake-quant arithmetic, plus names and byte accounting.

This module is a contract (DESIGN §3): other tools re-implement it, and the packed artifact that
``bitplan apply`` writes must have exactly the bytes that :func:`tensor_bytes` predicts. The
names, :class:`QuantFormat` and :func:`tensor_bytes` live in the torch-free
:mod:`bitplan.sensitivity.format_spec` and are re-exported here. Every weight is seen as a matrix
``[rows, cols]`` (see :mod:`bitplan.sensitivity.layers`); groups run along ``cols`` and a last
group shorter than ``G`` is allowed.

llama.cpp's block formats (``q8_0`` … ``q2_k``, kind ``ggml``) are computed by
:mod:`bitplan.sensitivity.ggml_blocks` with ggml's own arithmetic and byte layout; their codes
are the bytes a GGUF file stores.

References: GPTQ (Frantar et al., 2022) and AWQ (Lin et al., 2023) for group-wise integer
quantization with fp16 scales; the OCP 8-bit floating point spec for e4m3; llama.cpp's
``ggml/src/ggml-quants.c`` for the ggml block formats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitplan.sensitivity.format_spec import (
    ALLOWED_BITS,
    DEFAULT_FORMATS,
    GGML_TYPES,
    FormatError,
    QuantFormat,
    applicable_format,
    candidate_formats,
    check_applicable,
    parse_format,
    parse_formats,
    tensor_bytes,
)
from bitplan.sensitivity.ggml_blocks import dequantize_blocks, quantize_blocks

__all__ = [
    "ALLOWED_BITS",
    "CodesFn",
    "DEFAULT_FORMATS",
    "GGML_TYPES",
    "FormatError",
    "QuantCodes",
    "QuantFormat",
    "applicable_format",
    "candidate_formats",
    "check_applicable",
    "chunk_rows",
    "dequantize",
    "fake_quantize",
    "parse_format",
    "parse_formats",
    "quantize_codes",
    "tensor_bytes",
]

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The largest finite e4m3 value (OCP FP8 spec, "fn" variant: no infinities).
FP8_E4M3_MAX = 448.0
# Rows are processed in chunks of at most this many elements so that the float32 work buffer
# stays bounded however large the layer is. Small enough to stay in the CPU's caches and keep
# every temporary (int64 codes included: 512 KiB) below the 1 MiB mmap threshold the CLI and
# the workers fix for large models (app/allocator.py), so they are reused heap, not fresh
# mappings: the plan applier's fake quantization of a large weight ran 2.6-2.7x faster than
# with 16 Mi-element chunks, with glibc's defaults and with that threshold (benchmarks/
# chunk_size.py, column `apply`).
_CHUNK_ELEMENTS = 1 << 16
# A rounding other than rtn (gptq, awq, hqq) rounds a chunk per call with work that does not
# shrink with the chunk (gptq factors the [cols, cols] inverse Hessian on every call): those
# formats keep 16 Mi-element chunks, a few calls per weight.
_ROUNDED_CHUNK_ELEMENTS = 1 << 24


def chunk_rows(
    fmt: QuantFormat,
    cols: int,
    elements: int | None = None,
    *,
    rounded_elements: int = _ROUNDED_CHUNK_ELEMENTS,
) -> int:
    """Rows of a ``cols``-wide matrix to quantize at a time in ``fmt`` (at least one): about
    ``elements`` (default: this module's chunk size) for rtn, ``rounded_elements`` for a format
    with another rounding."""
    if fmt.rounding != "rtn":
        elements = rounded_elements
    elif elements is None:
        elements = _CHUNK_ELEMENTS
    return max(1, elements // max(cols, 1))


@dataclass
class QuantCodes:
    """Integer codes of one matrix: what the packed artifact stores.

    ``q``: int16 ``[rows, cols]`` (signed for symmetric, ``0..2^b-1`` for asymmetric);
    ``scale``: float16 ``[rows, n_groups_per_row]``; ``zero``: int16 like ``scale`` or None.
    For a ggml format ``q`` is ggml's bytes, uint8 ``[rows, cols/block · type_size]`` (scales
    inside), and ``scale`` is empty, float16 ``[rows, 0]``.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def _group_size(fmt: QuantFormat, cols: int) -> int:
    return cols if fmt.group_size is None else min(fmt.group_size, cols)


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """View ``[rows, cols]`` as ``[rows, n_groups, group]``, padding a short last group.

    The pad repeats the row's last value, which already lies in the last group, so the group's
    min, max and absmax are unchanged.
    """
    rows, cols = w.shape
    pad = (-cols) % group
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)  # (rows, n_groups*group)
    return w.reshape(rows, -1, group)  # (rows, n_groups, group)


def _fp16_scale(x: torch.Tensor) -> torch.Tensor:
    """Round a scale to float16 as stored; a scale that would be 0 becomes 1 (DESIGN §3)."""
    s = x.to(torch.float16).to(torch.float32)
    return torch.where(s == 0, torch.ones_like(s), s)


def _int_codes(w: torch.Tensor, fmt: QuantFormat) -> QuantCodes:
    """Integer codes of a float32 ``[rows, cols]`` matrix (one chunk of rows)."""
    rows, cols = w.shape
    g = _grouped(w, _group_size(fmt, cols))  # (rows, n_groups, G)
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1
        scale = _fp16_scale(g.abs().amax(dim=-1) / qmax)  # (rows, n_groups)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)), -qmax, qmax)
        zero = None
    else:
        levels = 2**fmt.bits - 1
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = _fp16_scale((hi - lo) / levels)  # (rows, n_groups)
        zero = torch.clamp(torch.round(-lo / scale), 0, levels)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, levels)
        zero = zero.to(torch.int16)
    q = q.reshape(rows, -1)[:, :cols].to(torch.int16)  # (rows, cols)
    return QuantCodes(q=q, scale=scale.to(torch.float16), zero=zero)


def _int_dequant(codes: QuantCodes, fmt: QuantFormat, cols: int) -> torch.Tensor:
    rows = codes.q.shape[0]
    group = _group_size(fmt, cols)
    q = _grouped(codes.q.to(torch.float32), group)  # (rows, n_groups, G)
    if codes.zero is not None:
        q = q - codes.zero.to(torch.float32).unsqueeze(-1)
    w = q * codes.scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(rows, -1)[:, :cols]  # (rows, cols)


def _fp8_codes(w: torch.Tensor) -> QuantCodes:
    scale = _fp16_scale(w.abs().amax(dim=1, keepdim=True) / FP8_E4M3_MAX)  # (rows, 1)
    # fp16 rounding of the scale can push |w/scale| a hair past 448; e4m3fn has no inf, so an
    # unclamped cast would give NaN.
    x = torch.clamp(w / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return QuantCodes(q=x, scale=scale.to(torch.float16), zero=None)


def quantize_codes(w: torch.Tensor, fmt: QuantFormat) -> QuantCodes:
    """Codes and scales of a ``[rows, cols]`` matrix in an int, fp8 or ggml format, rounded to
    nearest (a format with another rounding goes through a
    :class:`~bitplan.sensitivity.rounder.Rounder`, which knows what that rounding needs)."""
    if fmt.rounding != "rtn":
        raise ValueError(f"{fmt.name}: {fmt.rounding} rounding needs a Rounder")
    if w.dim() != 2:
        raise ValueError(f"expected a [rows, cols] matrix, got shape {tuple(w.shape)}")
    if fmt.kind == "ggml":
        blocks = quantize_blocks(w, fmt)
        return QuantCodes(
            q=blocks, scale=blocks.new_empty(w.shape[0], 0, dtype=torch.float16), zero=None
        )
    w = w.detach().to(torch.float32)
    if fmt.kind == "fp8":
        return _fp8_codes(w)
    if fmt.kind == "int":
        return _int_codes(w, fmt)
    raise ValueError(f"{fmt.name} is a plain cast and has no codes")


def dequantize(codes: QuantCodes, fmt: QuantFormat, cols: int) -> torch.Tensor:
    """Float32 ``[rows, cols]`` matrix from its codes: the exact inverse used by loaders."""
    if fmt.kind == "ggml":
        return dequantize_blocks(codes.q, fmt, cols)
    if fmt.kind == "fp8":
        return codes.q.to(torch.float32) * codes.scale.to(torch.float32)
    return _int_dequant(codes, fmt, cols)


# How a caller's codes are made: ``codes(chunk, fmt, first_row)`` (see Rounder.quantizer).
CodesFn = Callable[[torch.Tensor, QuantFormat, int], QuantCodes]


def _fake_quantize_chunk(
    w: torch.Tensor, fmt: QuantFormat, row0: int, codes: CodesFn | None
) -> torch.Tensor:
    if fmt.kind == "float":
        return w.to(FLOAT_DTYPES[fmt.name]).to(torch.float32)
    if codes is not None:
        return dequantize(codes(w, fmt, row0), fmt, w.shape[1])
    return dequantize(quantize_codes(w, fmt), fmt, w.shape[1])


def fake_quantize(
    w: torch.Tensor,
    fmt: QuantFormat,
    *,
    out: torch.Tensor | None = None,
    codes: CodesFn | None = None,
    row0: int = 0,
) -> torch.Tensor:
    """Quantize and dequantize a ``[rows, cols]`` matrix (DESIGN §3 reference arithmetic).

    A ggml format needs ``cols`` to be a multiple of its block (:class:`FormatError`
    otherwise; see :func:`applicable_format`). Works a chunk of rows at a time, so the float32
    work space stays bounded. The result is written into ``out`` (which may be ``w`` itself, or
    a strided view such as a transpose) in ``out``'s dtype; without ``out`` a new tensor of
    ``w``'s dtype is returned. ``codes`` makes the codes of formats with a rounding other than
    rtn (``w`` being rows ``row0 :`` of its matrix); without it only rtn is possible.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a [rows, cols] matrix, got shape {tuple(w.shape)}")
    if out is None:
        out = torch.empty_like(w)
    elif out.shape != w.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(w.shape)}")
    rows, cols = w.shape
    check_applicable(fmt, cols)
    step = chunk_rows(fmt, cols)
    with torch.no_grad():
        for start in range(0, rows, step):
            chunk = w[start : start + step].to(torch.float32)
            out[start : start + step].copy_(_fake_quantize_chunk(chunk, fmt, row0 + start, codes))
    return out
