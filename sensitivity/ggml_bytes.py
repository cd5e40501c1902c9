"""Byte-level pieces the ggml block formats share: fp16 fields and sub-byte code packing.

ggml stores every block as a C struct of bytes (``ggml-common.h``); its scalar scales are IEEE
half floats, little-endian, and its codes are packed several to a byte. These helpers turn torch
tensors into those bytes and back, vectorised over blocks (first dim). The machines bitplan runs
on are little-endian, like GGUF files, so a float16 tensor's bytes are the file's bytes.
"""

from __future__ import annotations

import torch

__all__ = ["from_half", "half_bytes", "pack_fields", "to_half", "unpack_fields"]


def to_half(v: torch.Tensor) -> torch.Tensor:
    """``v`` rounded to float16 as ggml stores it (``GGML_FP32_TO_FP16``), back in float32."""
    return v.to(torch.float16).to(torch.float32)


def half_bytes(v: torch.Tensor) -> torch.Tensor:
    """The 2 little-endian bytes of ``v`` (``(nb,)`` float32) as float16: ``(nb, 2)`` uint8."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)  # (nb, 2)


def from_half(b: torch.Tensor) -> torch.Tensor:
    """Float32 ``(nb,)`` from ``(nb, 2)`` uint8 holding float16 values (``GGML_FP16_TO_FP32``)."""
    return b.contiguous().view(torch.float16).reshape(-1).to(torch.float32)  # (nb,)


def pack_fields(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """OR ``codes[..., k, :] << (k·bits)`` over ``k``: ``(…, 8/bits, m)`` small ints to ``(…, m)``
    uint8 — ggml's layout, where field ``k`` of byte ``l`` holds element ``k·m + l``."""
    shifts = torch.arange(codes.shape[-2], dtype=torch.int32) * bits
    fields = codes.to(torch.int32) << shifts.unsqueeze(-1)  # (…, 8/bits, m)
    return fields.sum(dim=-2).to(torch.uint8)  # fields do not overlap: sum == OR


def unpack_fields(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: ``(…, m)`` uint8 to ``(…, 8/bits, m)`` int32 fields."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (b.to(torch.int32).unsqueeze(-2) >> shifts.unsqueeze(-1)) & ((1 << bits) - 1)
