"""A matrix in a llama.cpp block format: quantize rows to ggml's bytes, and read them back.

The bytes of a ``[rows, cols]`` matrix are what a GGUF file stores for that tensor: row after
row, each row ``cols/block`` blocks in ggml's struct layout, so a GGUF writer can copy them
verbatim and llama.cpp reads exactly the weights bitplan measured. The block arithmetic lives
in :mod:`bitplan.sensitivity.ggml_legacy` and :mod:`bitplan.sensitivity.ggml_kquants`; this
module cuts a matrix into blocks, a bounded number at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bitplan.sensitivity import ggml_kquants, ggml_legacy
from bitplan.sensitivity.format_spec import QuantFormat, check_applicable
from bitplan.sensitivity.ggml_types import GgmlType

__all__ = ["dequantize_blocks", "quantize_blocks"]

_QUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    **ggml_legacy.QUANTIZE,
    **ggml_kquants.QUANTIZE,
}
_DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    **ggml_legacy.DEQUANTIZE,
    **ggml_kquants.DEQUANTIZE,
}
# Blocks are quantized this many weights at a time: the k-quant searches keep a dozen float32
# temporaries of this size, so 2^18 weights (1 MiB each) stay in cache and memory stays small.
_CHUNK_WEIGHTS = 1 << 18


def _ggml_type(fmt: QuantFormat, cols: int) -> GgmlType:
    t = fmt.ggml
    if t is None:
        raise ValueError(f"{fmt.name} is not a llama.cpp block format")
    check_applicable(fmt, cols)
    return t


def quantize_blocks(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """ggml's bytes of a ``[rows, cols]`` matrix: uint8 ``[rows, cols/block · type_size]``."""
    rows, cols = w.shape
    t = _ggml_type(fmt, cols)
    blocks = w.detach().to(device="cpu", dtype=torch.float32).reshape(-1, t.block)  # (nb, block)
    step = max(1, _CHUNK_WEIGHTS // t.block)
    quantize = _QUANTIZE[t.name]
    parts = [quantize(blocks[s : s + step]) for s in range(0, blocks.shape[0], step)]
    out = torch.cat(parts) if parts else torch.empty(0, t.type_size, dtype=torch.uint8)
    return out.reshape(rows, -1)  # (rows, cols/block · type_size)


def dequantize_blocks(data: torch.Tensor, fmt: QuantFormat, cols: int) -> torch.Tensor:
    """Float32 ``[rows, cols]`` from ggml's bytes ``[rows, cols/block · type_size]`` (uint8)."""
    t = _ggml_type(fmt, cols)
    rows = data.shape[0]
    want = (rows, cols // t.block * t.type_size)
    if data.dtype != torch.uint8 or tuple(data.shape) != want:
        raise ValueError(
            f"{fmt.name} bytes of a [{rows}, {cols}] matrix are uint8 {list(want)}, "
            f"got {data.dtype} {list(data.shape)}"
        )
    blocks = data.to("cpu").reshape(-1, t.type_size)  # (nb, type_size)
    return _DEQUANTIZE[t.name](blocks).reshape(rows, cols)  # (rows, cols)
