"""llama.cpp's k-quants q2_K … q6_K: super-blocks of 256 weights, bit for bit.

A super-block holds 16 sub-blocks of 16 weights (q2_K, q3_K, q6_K) or 8 of 32 (q4_K, q5_K).
Each sub-block gets its own scale (and minimum for q2_K/q4_K/q5_K) from a search
(:mod:`bitplan.sensitivity.ggml_search`); those scales are then quantized themselves against
one fp16 super-scale ``d`` (and ``dmin``), and every weight is re-quantized against the scale
it will really be read with. This follows llama.cpp's reference quantizers
(``quantize_row_q4_K_ref`` … in ``ggml/src/ggml-quants.c``; the path ``llama-quantize`` takes
without an importance matrix) operation by operation in float32. One detail matters for the
bytes: a sub-block whose quantized scale is 0 keeps the codes the search gave it.

The byte layout is ggml's block structs (``ggml-common.h``), which the ``gguf`` package reads.
Every function maps ``(nb, 256)`` float32 super-blocks to ``(nb, type_size)`` uint8 and back.
"""

from __future__ import annotations

import torch

from bitplan.sensitivity.ggml_bytes import (
    from_half,
    half_bytes,
    pack_fields,
    to_half,
    unpack_fields,
)
from bitplan.sensitivity.ggml_search import (
    GROUP_MAX_EPS,
    f32,
    first_max_abs,
    make_q3_quants,
    make_qkx2_quants,
    make_qx_quants,
    nearest_int,
    seq_sum,
)

__all__ = ["DEQUANTIZE", "QUANTIZE"]

QK_K = 256
_SCALE_BITS = 63  # q4_K/q5_K sub-block scales and mins are 6-bit: 0..63
_LOW = 0x0F


def _element_major(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(nb, 256)`` to ``(n, S)``: element ``i`` of every ``n``-weight sub-block in row ``i``."""
    return x.reshape(-1, n).T.contiguous()  # (S, n) -> (n, S), S = nb·256/n


def _block_major(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_element_major`: ``(n, S)`` back to ``(nb, 256)``."""
    return codes.T.reshape(-1, QK_K)  # (S, n) -> (nb, 256)


def _positive_max(v: torch.Tensor) -> torch.Tensor:
    """Per row, the largest value if positive, else +0 (the reference's running max from 0)."""
    top = v.amax(dim=1)
    return torch.where(top > 0, top, torch.zeros_like(top))


def _ratio_or_zero(num: float, den: torch.Tensor) -> torch.Tensor:
    """``den > 0 ? num/den : 0`` in float32."""
    return torch.where(den > 0, f32(num) / den, torch.zeros_like(den))


def _requantize(
    x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, lo: int, hi: int, dm: torch.Tensor | None
) -> torch.Tensor:
    """Codes of ``x`` ``(nb, subs, n)`` against the stored sub-block scales ``d`` (and minima
    ``dm``): ``clamp(nearest_int((x + dm)/d), lo, hi) − lo``; sub-blocks with ``d == 0`` keep
    ``codes`` (the search's, already offset by ``−lo``)."""
    num = x if dm is None else x + dm.unsqueeze(-1)
    fresh = torch.clamp(nearest_int(num / d.unsqueeze(-1)), lo, hi) - lo
    return torch.where((d != 0).unsqueeze(-1), fresh, codes.reshape(x.shape))  # (nb, subs, n)


def _two_bit(codes: torch.Tensor) -> torch.Tensor:
    """64 bytes: byte ``32h + l`` holds elements ``128h + 32k + l`` in bits ``2k`` (k = 0..3)."""
    return pack_fields(codes.reshape(-1, 2, 4, 32), 2).reshape(-1, 64)  # (nb, 2, 32) -> (nb, 64)


def _unpack_two_bit(qs: torch.Tensor) -> torch.Tensor:
    return unpack_fields(qs.reshape(-1, 2, 32), 2).reshape(-1, QK_K)  # (nb, 2, 4, 32) -> (nb, 256)


# ---- q2_K: 16 x 16 weights, 2-bit codes, 4-bit scale and min per sub-block -----------------


def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    sub = _element_major(x, 16)
    scales, mins, codes = make_qkx2_quants(
        sub, sub.abs(), nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True
    )
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)  # (nb, 16)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    q4scale = 15.0  # 4-bit sub-block scales and mins
    ls = nearest_int(_ratio_or_zero(q4scale, max_scale).unsqueeze(1) * scales) & 0xFF
    lm = nearest_int(_ratio_or_zero(q4scale, max_min).unsqueeze(1) * mins)
    packed = torch.where((max_min > 0).unsqueeze(1), (ls | (lm << 4)) & 0xFF, ls)
    d = to_half(max_scale / f32(q4scale))
    dmin = to_half(max_min / f32(q4scale))
    sub_d = d.unsqueeze(1) * (packed & _LOW).to(torch.float32)  # (nb, 16)
    sub_m = dmin.unsqueeze(1) * (packed >> 4).to(torch.float32)
    # x: (nb, 256) -> (nb, 16 sub-blocks, 16); codes come back (nb, 16, 16)
    codes = _requantize(x.reshape(nb, 16, 16), _block_major(codes), sub_d, 0, 3, sub_m)
    return torch.cat(
        [packed.to(torch.uint8), _two_bit(codes), half_bytes(d), half_bytes(dmin)], dim=1
    )


def dequantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    sc = b[:, 0:16].to(torch.int32)
    d, dmin = from_half(b[:, 80:82]).unsqueeze(1), from_half(b[:, 82:84]).unsqueeze(1)
    dl = (d * (sc & _LOW).to(torch.float32)).unsqueeze(-1)  # (nb, 16, 1)
    ml = (dmin * (sc >> 4).to(torch.float32)).unsqueeze(-1)
    q = _unpack_two_bit(b[:, 16:80]).reshape(-1, 16, 16).to(torch.float32)  # (nb, 16, 16)
    return (dl * q - ml).reshape(-1, QK_K)  # (nb, 256)


# ---- q3_K: 16 x 16 weights, 3-bit codes (2 low bits + a high-bit mask), 6-bit signed scales -


def _pack_q3_scales(codes: torch.Tensor) -> torch.Tensor:
    """12 bytes of sixteen 6-bit codes: low nibbles of 0..7 / 8..15 in bytes 0..7 (low / high
    nibble), the 2 high bits of code ``j`` in byte ``8 + j%4`` at bit ``2·(j//4)``."""
    nibbles = pack_fields((codes & _LOW).reshape(-1, 2, 8), 4)  # (nb, 8)
    high = pack_fields((codes >> 4).reshape(-1, 4, 4), 2)  # (nb, 4): [j//4, j%4]
    return torch.cat([nibbles, high], dim=1)


def _unpack_q3_scales(b: torch.Tensor) -> torch.Tensor:
    low = unpack_fields(b[:, 0:8], 4).reshape(-1, 16)  # (nb, 2, 8) -> (nb, 16)
    high = unpack_fields(b[:, 8:12], 2).reshape(-1, 16)  # (nb, 4, 4) -> (nb, 16)
    return low | (high << 4)


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    scales, codes = make_q3_quants(_element_major(x, 16), nmax=4)
    scales = scales.reshape(nb, 16)  # (nb, 16)
    _, max_scale = first_max_abs(scales.T)
    live = max_scale != 0
    iscale = f32(-32.0) / max_scale
    rounded = nearest_int(iscale.unsqueeze(1) * scales)
    rounded = ((rounded + 128) & 0xFF) - 128  # the reference stores it in an int8_t first
    sc = torch.where(
        live.unsqueeze(1), torch.clamp(rounded, -32, 31) + 32, torch.zeros_like(rounded)
    )
    d = to_half(torch.where(live, f32(1.0) / iscale, torch.zeros_like(iscale)))
    sub_d = d.unsqueeze(1) * (sc - 32).to(torch.float32)  # (nb, 16)
    # x: (nb, 256) -> (nb, 16 sub-blocks, 16); codes come back (nb, 16, 16)
    codes = _requantize(x.reshape(nb, 16, 16), _block_major(codes), sub_d, -4, 3, None)
    codes = codes.reshape(nb, QK_K)  # (nb, 16, 16) -> (nb, 256)
    hmask = pack_fields((codes > 3).to(torch.int32).reshape(-1, 8, 32), 1)  # (nb, 32)
    return torch.cat([hmask, _two_bit(codes & 3), _pack_q3_scales(sc), half_bytes(d)], dim=1)


def dequantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    d = from_half(b[:, 108:110]).unsqueeze(1)
    dl = (d * (_unpack_q3_scales(b[:, 96:108]) - 32).to(torch.float32)).unsqueeze(-1)
    high = unpack_fields(b[:, 0:32], 1).reshape(-1, QK_K)  # (nb, 8, 32) -> (nb, 256)
    q = _unpack_two_bit(b[:, 32:96]) - 4 * (1 - high)  # a set mask bit means no -4 offset
    return (dl * q.reshape(-1, 16, 16).to(torch.float32)).reshape(-1, QK_K)  # (nb, 256)


# ---- q4_K / q5_K: 8 x 32 weights, 4/5-bit codes, 6-bit scale and min per sub-block ----------


def _qkx_super_block(
    x: torch.Tensor, *, nmax: int, rmin: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale bytes (nb, 12), d, dmin, codes (nb, 256))`` of q4_K (nmax 15) or q5_K (31)."""
    nb = x.shape[0]
    sub = _element_major(x, 32)
    # sqrtf is correctly rounded; torch's float32 sqrt can be 1 ulp off, float64 is not (and
    # rounding the float64 root to float32 is the correctly rounded float32 root).
    av_x = torch.sqrt((seq_sum(sub * sub) / f32(32.0)).double()).float()
    scales, mins, codes = make_qkx2_quants(
        sub, av_x + sub.abs(), nmax=nmax, rmin=rmin, rdelta=0.1, nstep=nstep, use_mad=False
    )
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)  # (nb, 8)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    # The reference stores the rounded value in a uint8_t before clamping it to 63.
    ls = torch.clamp(
        nearest_int(_ratio_or_zero(_SCALE_BITS, max_scale).unsqueeze(1) * scales) & 0xFF,
        max=_SCALE_BITS,
    )
    lm = torch.clamp(
        nearest_int(_ratio_or_zero(_SCALE_BITS, max_min).unsqueeze(1) * mins) & 0xFF,
        max=_SCALE_BITS,
    )
    d = to_half(max_scale / f32(float(_SCALE_BITS)))
    dmin = to_half(max_min / f32(float(_SCALE_BITS)))
    sub_d = d.unsqueeze(1) * ls.to(torch.float32)  # (nb, 8)
    sub_m = dmin.unsqueeze(1) * lm.to(torch.float32)
    # x: (nb, 256) -> (nb, 8 sub-blocks, 32); codes come back (nb, 8, 32)
    codes = _requantize(x.reshape(nb, 8, 32), _block_major(codes), sub_d, 0, nmax, sub_m)
    packed = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & _LOW) | ((lm[:, 4:] & _LOW) << 4),
        ],
        dim=1,
    ).to(torch.uint8)
    return packed, d, dmin, codes.reshape(nb, QK_K)  # codes (nb, 8, 32) -> (nb, 256)


def _unpack_k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block scales and mins ``(nb, 8)`` each from the 12 packed bytes (get_scale_min_k4)."""
    s = b.to(torch.int32)
    d_lo, m_lo, mixed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d_lo & 0x3F, (mixed & _LOW) | ((d_lo >> 6) << 4)], dim=1)
    mn = torch.cat([m_lo & 0x3F, (mixed >> 4) | ((m_lo >> 6) << 4)], dim=1)
    return sc, mn


def _nibble_pairs(codes: torch.Tensor) -> torch.Tensor:
    """128 bytes: byte ``32c + l`` holds element ``64c + l`` (low) and ``64c + 32 + l`` (high)."""
    return pack_fields((codes & _LOW).reshape(-1, 4, 2, 32), 4).reshape(-1, 128)  # (nb, 128)


def _k4_dequant(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    d, dmin = from_half(b[:, 0:2]).unsqueeze(1), from_half(b[:, 2:4]).unsqueeze(1)
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).unsqueeze(-1)  # (nb, 8, 1)
    ml = (dmin * mn.to(torch.float32)).unsqueeze(-1)
    return (dl * q.reshape(-1, 8, 32).to(torch.float32) - ml).reshape(-1, QK_K)  # (nb, 256)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    packed, d, dmin, codes = _qkx_super_block(x, nmax=15, rmin=-1.0, nstep=20)
    return torch.cat([half_bytes(d), half_bytes(dmin), packed, _nibble_pairs(codes)], dim=1)


def dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    q = unpack_fields(b[:, 16:144].reshape(-1, 4, 32), 4).reshape(-1, QK_K)  # (nb, 4, 2, 32)
    return _k4_dequant(b, q)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    packed, d, dmin, codes = _qkx_super_block(x, nmax=31, rmin=-0.5, nstep=15)
    # bit 2c + k of byte l: the 5th bit of element 64c + 32k + l
    qh = pack_fields((codes >> 4).reshape(-1, 8, 32), 1)  # (nb, 32)
    return torch.cat([half_bytes(d), half_bytes(dmin), packed, qh, _nibble_pairs(codes)], dim=1)


def dequantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    low = unpack_fields(b[:, 48:176].reshape(-1, 4, 32), 4).reshape(-1, QK_K)  # (nb, 4, 2, 32)
    high = unpack_fields(b[:, 16:48], 1).reshape(-1, QK_K)  # (nb, 8, 32) -> (nb, 256)
    return _k4_dequant(b, low | (high << 4))


# ---- q6_K: 16 x 16 weights, 6-bit codes, 8-bit signed scales --------------------------------


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    scales, codes = make_qx_quants(_element_major(x, 16), nmax=32)
    scales = scales.reshape(nb, 16)  # (nb, 16)
    max_abs, max_scale = first_max_abs(scales.T)
    iscale = f32(-128.0) / max_scale
    sc = torch.clamp(nearest_int(iscale.unsqueeze(1) * scales), max=127)
    sc = ((sc + 128) & 0xFF) - 128  # stored as int8_t
    d = to_half(f32(1.0) / iscale)
    sub_d = d.unsqueeze(1) * sc.to(torch.float32)  # (nb, 16)
    # x: (nb, 256) -> (nb, 16 sub-blocks, 16); codes come back (nb, 16, 16)
    codes = _requantize(x.reshape(nb, 16, 16), _block_major(codes), sub_d, -32, 31, None)
    c = codes.reshape(-1, 2, 4, 32)  # (nb, half, k, l): element 128·half + 32k + l
    ql = pack_fields((c & _LOW).reshape(-1, 2, 2, 2, 32).transpose(2, 3), 4)  # (nb, 2, 2, 32)
    qh = pack_fields(c >> 4, 2)  # (nb, 2, 32)
    out = torch.cat(
        [
            ql.reshape(nb, 128),  # (nb, 2, 2, 32) -> (nb, 128)
            qh.reshape(nb, 64),  # (nb, 2, 32) -> (nb, 64)
            sc.to(torch.int8).view(torch.uint8),
            half_bytes(d),
        ],
        dim=1,
    )
    zero = (max_abs < f32(GROUP_MAX_EPS)).unsqueeze(1)  # the reference zeroes the whole block
    return torch.where(zero, torch.zeros_like(out), out)


def dequantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    low = unpack_fields(b[:, 0:128].reshape(-1, 2, 2, 32), 4)  # (nb, 2, [l32], [lo/hi], 32)
    low = low.transpose(2, 3).reshape(-1, 2, 4, 32)  # (nb, 2, 4, 32): [half, k, l]
    high = unpack_fields(b[:, 128:192].reshape(-1, 2, 32), 2)  # (nb, 2, 4, 32)
    q = ((low | (high << 4)) - 32).reshape(-1, 16, 16).to(torch.float32)  # (nb, 16, 16)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = from_half(b[:, 208:210]).unsqueeze(1)
    return ((d * sc).unsqueeze(-1) * q).reshape(-1, QK_K)  # (nb, 256)


QUANTIZE = {
    "q2_k": quantize_q2_k,
    "q3_k": quantize_q3_k,
    "q4_k": quantize_q4_k,
    "q5_k": quantize_q5_k,
    "q6_k": quantize_q6_k,
}
DEQUANTIZE = {
    "q2_k": dequantize_q2_k,
    "q3_k": dequantize_q3_k,
    "q4_k": dequantize_q4_k,
    "q5_k": dequantize_q5_k,
    "q6_k": dequantize_q6_k,
}
