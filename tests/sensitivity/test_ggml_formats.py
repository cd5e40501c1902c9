"""llama.cpp's block formats: names and bytes, and bit-exactness against llama.cpp's own code.

Three independent references: the ``gguf`` package (llama.cpp's Python quantizers for the legacy
types and dequantizers for every type, and its table of block sizes), and SHA-256 digests of
the bytes that llama.cpp's C reference quantizers (``quantize_row_*_ref`` in
``src/ggml-quants.c`` of ggml-org/ggml commit d99724f, the ggml that llama.cpp vendors, built
for x86-64 with ``-O2 -ffp-contract=off``) write for :func:`_reference_matrix`. To re-derive a
digest, quantize that matrix with the C function and hash its output.
"""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest
import torch

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import (
    GGML_TYPES,
    FormatError,
    applicable_format,
    candidate_formats,
    dequantize,
    fake_quantize,
    parse_format,
    quantize_codes,
    tensor_bytes,
)
from bitplan.sensitivity.ggml_blocks import dequantize_blocks, quantize_blocks
from bitplan.sensitivity.layers import QuantLayer, apply_pins

LEGACY = ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
KQUANTS = ["q6_k", "q5_k", "q4_k", "q3_k", "q2_k"]

# sha256 of llama.cpp's reference quantizer output for _reference_matrix() (see the docstring).
LLAMA_CPP_SHA256 = {
    "q8_0": "ef9b3f3ad3b5c589fa31c28f18d4c4136e8c9afc120dea64803b6cfdc996ad37",
    "q5_1": "98ab99819820da8e3809e2e19093b4ff9ba6220e4186eb46a99e945126883d26",
    "q5_0": "23e985b3f77ed67de42e1a05bcf9d2fe7e438ec5da3d1dcf55a789dce604a6af",
    "q4_1": "a2db27ac574df17ce23a7fc8693f8d6619d650b022796ba97c884f69d47e0d15",
    "q4_0": "e408117a047e559877fad3cf010bf7b935d8a66b64b6d046b6ea284a6d163a47",
    "q6_k": "71ed0255c89217070cec1af00cc547b9f5025b26019962ec75ce626075dcfafb",
    "q5_k": "128077c9e5a94ce7ccb0231bea7d19fd1f014def6f33b6556e17832d74823be6",
    "q4_k": "6a25799c030079bd0d4f998d8f1581e4468c2c5166a5dbe394697052675d1d42",
    "q3_k": "6a4f50718d9c04ade7a07a1332e405d7c367469465b497658a66578283132679",
    "q2_k": "03fbf0823f8b6b4bb498ed669c535c37f1dcf88c3461b56af6f5d8e479d59f8d",
}


def _qtype(name: str) -> object:
    return gguf.GGMLQuantizationType(GGML_TYPES[name].type_id)


def _hashed_uniform(n: int, salt: int) -> torch.Tensor:
    """Uniform values in [-0.5, 0.5) from an integer hash of the index: the same float32
    values on every machine and library version (no random generator involved)."""
    i = torch.arange(n, dtype=torch.int64)
    h = (i * 2654435761 + salt * 40503 + 12345) & 0xFFFFFFFF  # Knuth's multiplicative hash
    h = h ^ (h >> 15)
    h = (h * 2246822519) & 0xFFFFFFFF  # a murmur3 finaliser step
    h = h ^ (h >> 13)
    return (h.to(torch.float64) / 2**32 - 0.5).to(torch.float32)


def _reference_matrix() -> torch.Tensor:
    """[64, 1024]: bell-shaped rows, plus rows of uniform, cubed (heavy-tailed), tiny (fp16
    subnormal scales) and huge (fp16 overflow) values, an all-zero and a constant super-block,
    a sparse row with outliers and a row of integers (exact ties)."""
    rows, cols = 64, 1024
    u = _hashed_uniform(rows * cols, 1).reshape(rows, cols)
    w = sum(_hashed_uniform(rows * cols, s).reshape(rows, cols) for s in (3, 4, 5, 6))
    assert isinstance(w, torch.Tensor)
    w[0:4] = u[0:4]
    w[4:8] = u[4:8] * u[4:8] * u[4:8] * 8
    w[8:12] = u[8:12] * torch.tensor([2.0**-20, 2.0**-8, 2.0**4, 2.0**10]).unsqueeze(1)
    w[12, :256] = 0
    w[12, 256:512] = 0.37
    w[13] = torch.where(_hashed_uniform(cols, 2) > 0.4, u[13] * 50, torch.zeros(cols))
    w[14] = torch.round(u[14] * 16)
    w[15] = u[15] * 1e6
    return w


def _random_case(seed: int) -> torch.Tensor:
    """[32, 512] random weights with the edge cases planted at random places."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 512, generator=gen) * torch.exp(torch.randn(32, 1, generator=gen) * 3)
    r = torch.randint(0, 32, (6,), generator=gen).tolist()
    w[r[0], 0:256] = 0  # an all-zero super-block
    w[r[1], 256:288] = -1.25  # a constant block
    w[r[2], int(torch.randint(0, 512, (1,), generator=gen))] *= 1e4  # an outlier
    w[r[3]] *= 65504.0 * 8  # scales past fp16's largest value
    w[r[4]] *= 2.0**-24  # scales among fp16's subnormals
    w[r[5]] = torch.round(w[r[5]] * 4) / 4  # exact ties
    # -0.0 (from underflow) becomes +0.0: a block starting with -0.0 is where gguf's numpy port
    # departs from the C reference (test_zero_block_sign_follows_the_c_reference).
    return w + 0.0


def _bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Bit patterns, so that -0.0 and NaN compare exactly too."""
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)


def test_sizes_and_ids_match_gguf() -> None:
    for name, t in GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType(t.type_id)
        assert qtype.name == t.ggml_name.upper() == name.upper()
        assert gguf.GGML_QUANT_SIZES[qtype] == (t.block, t.type_size)


@pytest.mark.parametrize(
    ("name", "bits", "block", "symmetric"),
    [
        ("q8_0", 8, 32, True),
        ("q4_1", 4, 32, False),
        ("q6_k", 6, 256, True),
        ("q4_k", 4, 256, False),
        ("q3_k", 3, 256, True),
        ("q2_k", 2, 256, False),
    ],
)
def test_parse(name: str, bits: int, block: int, symmetric: bool) -> None:
    fmt = parse_format(name.upper())
    assert (fmt.name, fmt.kind, fmt.bits, fmt.group_size, fmt.symmetric) == (
        name,
        "ggml",
        bits,
        block,
        symmetric,
    )
    assert fmt.is_quantized


def test_bytes_are_ggml_blocks() -> None:
    # ggml-common.h: q4_0 = fp16 d + 16 bytes of nibbles; q4_K = d, dmin, 12 scale bytes, 128
    assert tensor_bytes(parse_format("q4_0"), 3, 64) == 3 * 2 * (2 + 16)
    assert tensor_bytes(parse_format("q4_k"), 3, 512) == 3 * 2 * (2 + 2 + 12 + 128)
    assert parse_format("q4_0").bits_per_weight() == 4.5
    assert parse_format("q6_k").bits_per_weight() == 6.5625


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_packed_bytes_equal_tensor_bytes(name: str) -> None:
    fmt = parse_format(name)
    w = _random_case(1)[:, :256]
    codes = quantize_codes(w, fmt)
    assert codes.q.dtype == torch.uint8
    assert codes.q.numel() == tensor_bytes(fmt, *w.shape)
    assert codes.scale.numel() == 0  # the scales live inside the blocks


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_bytes_equal_llama_cpp_reference(name: str) -> None:
    data = quantize_blocks(_reference_matrix(), parse_format(name))
    assert hashlib.sha256(data.numpy().tobytes()).hexdigest() == LLAMA_CPP_SHA256[name]


# gguf's numpy port warns where a block's scale overflows float16 (as the format says it must)
# and where such a scale times a zero code reads back as NaN (as llama.cpp's C code does too).
GGUF_OVERFLOW = pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)


@GGUF_OVERFLOW
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_equal_gguf_quantize(name: str, seed: int) -> None:
    w = _random_case(seed)
    ours = quantize_blocks(w, parse_format(name)).numpy()
    theirs = gguf.quants.quantize(w.numpy(), _qtype(name))
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@GGUF_OVERFLOW
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_dequantize_equals_gguf(name: str, seed: int) -> None:
    w = _random_case(seed) if seed else _reference_matrix()
    fmt = parse_format(name)
    data = quantize_blocks(w, fmt)
    theirs = gguf.quants.dequantize(data.numpy(), _qtype(name))
    ours = dequantize_blocks(data, fmt, w.shape[1])
    assert np.array_equal(_bits(ours), _bits(theirs))
    assert np.array_equal(_bits(fake_quantize(w, fmt)), _bits(theirs))
    assert np.array_equal(_bits(dequantize(quantize_codes(w, fmt), fmt, w.shape[1])), _bits(ours))


def test_zero_block_sign_follows_the_c_reference() -> None:
    # quantize_row_q4_0_ref keeps max = +0.0 unless some |x| > 0, so d = +0/-8 = -0.0 (0x8000)
    # even when the block starts with -0.0 (gguf's numpy port takes that -0.0 and writes +0.0).
    w = torch.zeros(1, 32)
    w[0, 0] = -0.0
    data = quantize_blocks(w, parse_format("q4_0"))
    assert data[0, :2].tolist() == [0x00, 0x80]


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_error_falls_with_bits_and_zero_stays_zero(name: str) -> None:
    fmt = parse_format(name)
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(4))
    q = fake_quantize(w, fmt)
    rel = float(((q - w) ** 2).sum() / (w**2).sum())
    assert rel < {8: 1e-4, 6: 1e-3, 5: 4e-3, 4: 1.5e-2, 3: 5e-2, 2: 0.15}[fmt.bits]
    assert torch.equal(fake_quantize(torch.zeros(2, 256), fmt), torch.zeros(2, 256))


def test_fake_quantize_keeps_dtype_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitplan.sensitivity import formats

    w = _random_case(2).to(torch.bfloat16)
    whole = fake_quantize(w, parse_format("q4_k"))
    monkeypatch.setattr(formats, "_CHUNK_ELEMENTS", 1000)  # many row chunks
    assert torch.equal(fake_quantize(w, parse_format("q4_k")), whole)
    assert whole.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("name", "cols", "stored"),
    [
        ("q4_k", 512, "q4_k"),
        ("q6_k", 64, "q8_0"),  # llama.cpp's tensor_type_fallback table
        ("q5_k", 96, "q5_1"),
        ("q4_k", 64, "q5_0"),
        ("q3_k", 32, "q4_0"),
        ("q2_k", 160, "q4_0"),
        ("q4_k", 48, "fp16"),  # no 32-weight type fits either: llama.cpp keeps F16
        ("q8_0", 40, "fp16"),
        ("int4-g128", 40, "int4-g128"),  # bitplan's own formats take a short last group
    ],
)
def test_applicable_format_follows_llama_cpp(name: str, cols: int, stored: str) -> None:
    fmt = parse_format(name)
    assert applicable_format(fmt, cols).name == stored
    assert fmt.applies_to(cols) == (stored == name)


def test_candidates_are_deduplicated_in_order() -> None:
    formats = [parse_format(n) for n in ("q4_k", "q5_0", "int8", "q6_k", "q8_0")]
    assert [f.name for f in candidate_formats(formats, 64)] == ["q5_0", "int8", "q8_0"]
    assert candidate_formats(formats, 256) == formats


def test_a_matrix_the_format_does_not_fit_is_a_clear_error() -> None:
    w = torch.randn(4, 100)
    with pytest.raises(FormatError, match=r"blocks of 256 .* rows of 100 .* fp16"):
        fake_quantize(w, parse_format("q4_k"))
    with pytest.raises(FormatError, match="blocks of 32"):
        tensor_bytes(parse_format("q5_1"), 4, 100)


def test_a_pin_the_layer_cannot_take_is_refused() -> None:
    layers = [
        QuantLayer(name="wide", param="wide.weight", kind="linear", shape=(8, 256), numel=2048),
        QuantLayer(name="narrow", param="narrow.weight", kind="linear", shape=(8, 64), numel=512),
    ]
    assert apply_pins(layers, {"wide": "q4_k"})[0].pinned == "q4_k"
    with pytest.raises(InputError, match=r"pin \*=q4_k on narrow: .*q5_0"):
        apply_pins(layers, {"*": "q4_k"})
