"""llama.cpp's legacy block formats q4_0, q4_1, q5_0, q5_1, q8_0, bit for bit.

Each block is 32 consecutive weights of a row. The ``_0`` types store one fp16 scale ``d`` and
codes ``q`` with ``w ≈ d·(q − 2^(b−1))`` (``d = max/−2^(b−1)``, where ``max`` is the signed value
of largest magnitude); the ``_1`` types store ``d`` and the block minimum ``m``, ``w ≈ d·q + m``;
q8_0 stores ``d = absmax/127`` and ``round(w/d)``. The arithmetic follows llama.cpp's reference
quantizers (``quantize_row_q4_0_ref`` … in ``ggml/src/ggml-quants.c``) operation by operation in
float32: the reciprocal ``1/d`` is taken from the unrounded scale, codes are truncated after
adding 0.5 (``_0``/``_1`` types) or rounded half away from zero (q8_0), and ties for the largest
value go to the first one in the block. The byte layout is ggml's block struct
(``ggml-common.h``), which the ``gguf`` package reads; the tests compare both.

Every function maps ``(nb, 32)`` float32 blocks to ``(nb, type_size)`` uint8 and back.
"""

from __future__ import annotations

import torch

from bitplan.sensitivity.ggml_bytes import (
    from_half,
    half_bytes,
    pack_fields,
    unpack_fields,
)
from bitplan.sensitivity.ggml_search import f32, first_max_abs

__all__ = ["DEQUANTIZE", "QUANTIZE"]

_LOW = 0x0F  # the low nibble: 4 bits of a code


def _first_equal(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The first element of each block equal to ``value`` — the reference's running min/max
    keeps the first of equal values, which decides the sign of a zero minimum."""
    idx = (x == value.unsqueeze(1)).to(torch.uint8).argmax(dim=1, keepdim=True)
    return x.gather(1, idx).squeeze(1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0`` of the reference."""
    return torch.where(d != 0, f32(1.0) / d, torch.zeros_like(d))


def _symmetric(x: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, q)`` of a ``_0`` type with codes ``0..2·half−1`` (q4_0: half 8; q5_0: 16)."""
    _, mx = first_max_abs(x.T)
    d = mx / f32(float(-half))
    x0 = x * _inverse(d).unsqueeze(1)
    q = torch.trunc(x0 + f32(half + 0.5)).clamp(0, 2 * half - 1)
    return d, q.to(torch.int32)


def _with_min(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, m, q)`` of a ``_1`` type with codes ``0..levels`` (q4_1: 15; q5_1: 31)."""
    lo = _first_equal(x, x.amin(dim=1))
    hi = _first_equal(x, x.amax(dim=1))
    d = (hi - lo) / f32(float(levels))
    x0 = (x - lo.unsqueeze(1)) * _inverse(d).unsqueeze(1)
    q = torch.trunc(x0 + f32(0.5)).clamp(0, levels)
    return d, lo, q.to(torch.int32)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """16 bytes: element ``l`` in the low nibble of byte ``l``, element ``16+l`` in the high."""
    return pack_fields((q & _LOW).reshape(-1, 2, 16), 4)  # (nb, 2, 16) -> (nb, 16)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """The 5th bit of 32 codes as a little-endian uint32: bit ``j`` is code ``j``'s (4 bytes)."""
    bits = (q >> 4).reshape(-1, 4, 8).transpose(1, 2)  # (nb, 8, 4): [bit k, byte b] = code 8b+k
    return pack_fields(bits, 1)  # (nb, 4)


def _codes_from(qs: torch.Tensor, qh: torch.Tensor | None) -> torch.Tensor:
    """Codes ``(nb, 32)`` from the 16 nibble bytes and, for 5-bit types, the 4 high-bit bytes."""
    q = unpack_fields(qs, 4).reshape(-1, 32)  # (nb, 2, 16) -> (nb, 32)
    if qh is not None:
        high = unpack_fields(qh, 1).transpose(1, 2).reshape(-1, 32)  # (nb, 4, 8) -> (nb, 32)
        q = q | (high << 4)
    return q


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 8)
    return torch.cat([half_bytes(d), _nibbles(q)], dim=1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 16)
    return torch.cat([half_bytes(d), _high_bits(q), _nibbles(q)], dim=1)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    d, m, q = _with_min(x, 15)
    return torch.cat([half_bytes(d), half_bytes(m), _nibbles(q)], dim=1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    d, m, q = _with_min(x, 31)
    return torch.cat([half_bytes(d), half_bytes(m), _high_bits(q), _nibbles(q)], dim=1)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1) / f32(127.0)
    v = x * _inverse(d).unsqueeze(1)
    whole = torch.trunc(v)
    # C's roundf: half away from zero; v - trunc(v) is exact, so the test is exact too.
    q = torch.where((v - whole).abs() >= f32(0.5), whole + torch.sign(v), whole)
    return torch.cat([half_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)


def dequantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = from_half(b[:, 0:2]).unsqueeze(1)
    return d * (_codes_from(b[:, 2:18], None) - 8).to(torch.float32)


def dequantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = from_half(b[:, 0:2]).unsqueeze(1)
    return d * (_codes_from(b[:, 6:22], b[:, 2:6]) - 16).to(torch.float32)


def dequantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = from_half(b[:, 0:2]).unsqueeze(1), from_half(b[:, 2:4]).unsqueeze(1)
    return d * _codes_from(b[:, 4:20], None).to(torch.float32) + m


def dequantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = from_half(b[:, 0:2]).unsqueeze(1), from_half(b[:, 2:4]).unsqueeze(1)
    return d * _codes_from(b[:, 8:24], b[:, 4:8]).to(torch.float32) + m


def dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = from_half(b[:, 0:2]).unsqueeze(1)
    return b[:, 2:34].contiguous().view(torch.int8).to(torch.float32) * d


QUANTIZE = {
    "q4_0": quantize_q4_0,
    "q4_1": quantize_q4_1,
    "q5_0": quantize_q5_0,
    "q5_1": quantize_q5_1,
    "q8_0": quantize_q8_0,
}
DEQUANTIZE = {
    "q4_0": dequantize_q4_0,
    "q4_1": dequantize_q4_1,
    "q5_0": dequantize_q5_0,
    "q5_1": dequantize_q5_1,
    "q8_0": dequantize_q8_0,
}
