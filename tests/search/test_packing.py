"""Bit packing: round trips, the exact LSB-first layout, streaming, and input checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitplan.search import packing
from bitplan.search.packing import BitPacker, pack_bits, packed_size, unpack_bits

BITS = (2, 3, 4, 5, 6, 8)


def _reference_pack(values: list[int], bits: int) -> bytes:
    """A bit-by-bit packer written from the definition: value i at bits i·b … i·b+b-1."""
    out = bytearray((len(values) * bits + 7) // 8)
    for i, v in enumerate(values):
        for j in range(bits):
            pos = i * bits + j
            out[pos // 8] |= ((v >> j) & 1) << (pos % 8)
    return bytes(out)


@st.composite
def _values(draw: st.DrawFn) -> tuple[int, list[int]]:
    bits = draw(st.sampled_from(BITS))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    return bits, values


@settings(max_examples=150, deadline=None)
@given(_values())
def test_round_trip_and_layout_match_the_definition(case: tuple[int, list[int]]) -> None:
    bits, values = case
    packed = pack_bits(torch.tensor(values, dtype=torch.int64), bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(len(values), bits) == -(-len(values) * bits // 8)
    assert packed.numpy().tobytes() == _reference_pack(values, bits)
    assert unpack_bits(packed, bits, len(values)).tolist() == values


@settings(max_examples=60, deadline=None)
@given(_values(), st.lists(st.integers(0, 200), max_size=6))
def test_streaming_packer_equals_one_call(case: tuple[int, list[int]], cuts: list[int]) -> None:
    bits, values = case
    t = torch.tensor(values, dtype=torch.int16)
    packer = BitPacker(bits)
    edges = sorted({0, len(values), *(min(c, len(values)) for c in cuts)})
    stream = b"".join(packer.add(t[a:b]) for a, b in zip(edges, edges[1:], strict=False))
    stream += packer.finish()
    assert stream == pack_bits(t, bits).numpy().tobytes()
    assert packer.n_values == len(values)


def test_known_bytes() -> None:
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]  # two nibbles, low first
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_bits(torch.tensor([7, 1, 0, 0, 0, 0, 0, 5]), 3).tolist() == [0x0F, 0x00, 0xA0]


@pytest.mark.parametrize("bits", BITS)
def test_chunked_work_crosses_block_chunks(monkeypatch: pytest.MonkeyPatch, bits: int) -> None:
    monkeypatch.setattr(packing, "_CHUNK_BLOCKS", 3)  # many chunks even for a short stream
    values = torch.randint(0, 1 << bits, (1000,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    monkeypatch.setattr(packing, "_CHUNK_BLOCKS", 1 << 20)
    assert torch.equal(packed, pack_bits(values, bits))
    monkeypatch.setattr(packing, "_CHUNK_BLOCKS", 5)
    assert torch.equal(unpack_bits(packed, bits, 1000).long(), values)


def test_large_stream_is_vectorised() -> None:
    values = torch.randint(0, 32, (3_000_000,), dtype=torch.int16)
    assert torch.equal(unpack_bits(pack_bits(values, 5), 5, values.numel()), values)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(torch.tensor([-1]), 2)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="need"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 6)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        BitPacker(3).add(torch.tensor([65544]))  # 8 once wrapped to int16


def test_empty_stream() -> None:
    assert pack_bits(torch.empty(0, dtype=torch.int64), 3).numel() == 0
    assert unpack_bits(torch.empty(0, dtype=torch.uint8), 3, 0).numel() == 0
