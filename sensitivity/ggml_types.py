"""llama.cpp's block formats as bitplan knows them: sizes, nominal bits, and llama.cpp's fallback.

A ggml block format stores a row of a weight matrix in blocks of ``block`` consecutive weights
(along ``cols``), each block ``type_size`` bytes holding its codes and its own scales. So a
``[rows, cols]`` matrix takes exactly ``rows · cols/block · type_size`` bytes, and a format
applies only when ``block`` divides ``cols`` (llama.cpp's rule: ``ne[0] % blck_size == 0``).

For a row that a format cannot store, ``llama-quantize`` falls back to another type
(``tensor_type_fallback`` in llama.cpp's ``src/llama-quant.cpp``): the 256-weight k-quants go to
a 32-weight legacy type, and a row that no 32-weight type fits is kept as F16. :attr:`GgmlType.
fallback` records that table, so a plan for a layer asked in ``q4_k`` uses what the runtime would
store. This module needs neither torch nor gguf: a request or a plan is checked without them.

The numbers are ggml's (``ggml-common.h`` block structs; ``GGML_QUANT_SIZES`` in the ``gguf``
package, which the tests compare against).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GGML_TYPES", "GgmlType"]

# Weights a k-quant super-block holds (ggml's QK_K).
QK_K = 256
# Weights a legacy block holds (ggml's QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0).
QK_LEGACY = 32


@dataclass(frozen=True)
class GgmlType:
    """One ggml block type.

    ``name`` is bitplan's (lower case, e.g. ``q4_k``), ``ggml_name`` llama.cpp's (``q4_K``),
    ``type_id`` its ``GGMLQuantizationType`` number in GGUF files. ``bits`` is the nominal code
    width a plan reports; ``symmetric`` is False for the types that store a per-block minimum
    (``_1`` types and q2_k/q4_k/q5_k). ``fallback`` is the type llama.cpp uses when ``block``
    does not divide a row (None: F16).
    """

    name: str
    ggml_name: str
    type_id: int
    block: int
    type_size: int
    bits: int
    symmetric: bool
    fallback: str | None


GGML_TYPES: dict[str, GgmlType] = {
    t.name: t
    for t in (
        # Legacy types: 32 weights, one fp16 scale (+ fp16 min for _1) a block.
        GgmlType("q8_0", "q8_0", 8, QK_LEGACY, 34, 8, True, None),
        GgmlType("q5_1", "q5_1", 7, QK_LEGACY, 24, 5, False, None),
        GgmlType("q5_0", "q5_0", 6, QK_LEGACY, 22, 5, True, None),
        GgmlType("q4_1", "q4_1", 3, QK_LEGACY, 20, 4, False, None),
        GgmlType("q4_0", "q4_0", 2, QK_LEGACY, 18, 4, True, None),
        # k-quants: 256 weights in 16 or 8 sub-blocks with quantized sub-block scales.
        GgmlType("q6_k", "q6_K", 14, QK_K, 210, 6, True, "q8_0"),
        GgmlType("q5_k", "q5_K", 13, QK_K, 176, 5, False, "q5_1"),
        GgmlType("q4_k", "q4_K", 12, QK_K, 144, 4, False, "q5_0"),
        GgmlType("q3_k", "q3_K", 11, QK_K, 110, 3, True, "q4_0"),
        GgmlType("q2_k", "q2_K", 10, QK_K, 84, 2, False, "q4_0"),
    )
}
