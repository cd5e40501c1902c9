"""Bit packing: b-bit unsigned integers into a dense LSB-first byte stream, and back.

The packed artifact (DESIGN §3) must have exactly the bytes the plan predicts, so codes are not
padded to a byte each: value ``i`` occupies bits ``i·b … i·b+b-1`` of one stream, bit ``j`` of
the stream being bit ``j mod 8`` of byte ``j div 8`` (the order of GGML/GPTQ-style packers).
int4 is two codes a byte, int2 four, and int3/5/6 straddle byte boundaries.

The work is vectorised by *blocks*: ``k = 8 / gcd(b, 8)`` values fill exactly ``k·b/8`` whole
bytes (3 bytes for eight 3-bit values), so each block is assembled in one int64 and split into
bytes with shifts, with no per-element Python loop. Blocks are byte-aligned, which also lets
:class:`BitPacker` stream a tensor chunk by chunk and produce the same bytes as one call.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BitPacker", "pack_bits", "packed_size", "unpack_bits"]

# Values are packed this many blocks at a time so the int64 work buffers stay near 64 MiB
# (2^20 blocks × at most 8 values × 8 bytes) however long the stream is.
_CHUNK_BLOCKS = 1 << 20


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _block(bits: int) -> tuple[int, int]:
    """``(values, bytes)`` of one byte-aligned block of ``bits``-bit values."""
    values = 8 // math.gcd(bits, 8)
    return values, values * bits // 8


def packed_size(n: int, bits: int) -> int:
    """Bytes of ``n`` packed ``bits``-bit values: ``ceil(n·bits / 8)``."""
    _check_bits(bits)
    return (n * bits + 7) // 8


def _pack_blocks(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a whole number of blocks (``values.numel()`` a multiple of the block length)."""
    per_block, block_bytes = _block(bits)
    out = []
    flat = values.reshape(-1)  # (n,)
    step = _CHUNK_BLOCKS * per_block
    value_shifts = torch.arange(per_block, dtype=torch.int64, device=flat.device) * bits
    byte_shifts = torch.arange(block_bytes, dtype=torch.int64, device=flat.device) * 8
    for start in range(0, flat.numel(), step):
        v = flat[start : start + step].to(torch.int64).reshape(-1, per_block)  # (blocks, k)
        acc = (v << value_shifts).sum(dim=1, keepdim=True)  # (blocks, 1): ≤ 40 bits, no overlap
        out.append(((acc >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1))  # (blocks·bytes,)
    if not out:
        return torch.empty(0, dtype=torch.uint8, device=flat.device)
    return torch.cat(out) if len(out) > 1 else out[0]


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``0 <= v < 2**bits`` (any shape, read flat) into ``ceil(n·bits/8)`` bytes.

    Returns a 1-D uint8 tensor on ``values``' device; the unused high bits of the last byte
    are zero.
    """
    _check_bits(bits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"pack_bits needs an integer tensor, got {values.dtype}")
    n = values.numel()
    if n and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    per_block, _ = _block(bits)
    pad = (-n) % per_block
    flat = values.reshape(-1)  # (n,)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])  # (n + pad,): zero bits past the end
    return _pack_blocks(flat, bits)[: packed_size(n, bits)]


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values of the stream, as int16 ``(n,)``."""
    _check_bits(bits)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"expected a 1-D uint8 stream, got {data.dtype} {tuple(data.shape)}")
    need = packed_size(n, bits)
    if data.numel() < need:
        raise ValueError(f"stream has {data.numel()} bytes, {n} {bits}-bit values need {need}")
    per_block, block_bytes = _block(bits)
    n_blocks = -(-n // per_block)
    raw = data[:need]
    pad = n_blocks * block_bytes - need
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])  # (n_blocks·block_bytes,)
    byte_shifts = torch.arange(block_bytes, dtype=torch.int64, device=data.device) * 8
    value_shifts = torch.arange(per_block, dtype=torch.int64, device=data.device) * bits
    mask = (1 << bits) - 1
    out = torch.empty(n_blocks * per_block, dtype=torch.int16, device=data.device)
    step = _CHUNK_BLOCKS
    for start in range(0, n_blocks, step):
        b = raw[start * block_bytes : (start + step) * block_bytes].to(torch.int64)
        b = b.reshape(-1, block_bytes)  # (blocks, block_bytes)
        acc = (b << byte_shifts).sum(dim=1, keepdim=True)  # (blocks, 1)
        vals = ((acc >> value_shifts) & mask).reshape(-1)  # (blocks·k,)
        out[start * per_block : start * per_block + vals.numel()] = vals.to(torch.int16)
    return out[:n]


class BitPacker:
    """Stream values through :func:`pack_bits` in pieces, yielding bytes as blocks complete.

    ``b"".join(p.add(x) for x in pieces) + p.finish()`` equals ``pack_bits(cat(pieces))``
    byte for byte: only the values of an incomplete block (fewer than 8) are held back. This
    lets a writer quantize a large layer a chunk of rows at a time.
    """

    def __init__(self, bits: int) -> None:
        _check_bits(bits)
        self.bits = bits
        self._per_block = _block(bits)[0]
        self._carry = torch.empty(0, dtype=torch.int16)  # b ≤ 8 fits; a quarter of int64
        self.n_values = 0

    def add(self, values: torch.Tensor) -> bytes:
        """Append ``values`` (read flat); return the bytes of every block now complete."""
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << self.bits):
            raise ValueError(f"values must lie in [0, {(1 << self.bits) - 1}]")
        flat = values.detach().reshape(-1).to(device="cpu", dtype=torch.int16)  # (n,)
        self.n_values += flat.numel()
        if self._carry.numel():
            flat = torch.cat([self._carry, flat])
        whole = flat.numel() - flat.numel() % self._per_block
        self._carry = flat[whole:].clone()
        return _pack_blocks(flat[:whole], self.bits).numpy().tobytes()

    def finish(self) -> bytes:
        """Bytes of the last, partial block (zero-padded to a whole byte)."""
        tail = pack_bits(self._carry, self.bits).numpy().tobytes()
        self._carry = self._carry[:0]
        return tail
