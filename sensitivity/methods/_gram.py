"""Input statistics for the ``layer`` method: what one forward pass must remember per layer.

A layer computes ``Y = W·X`` (one column of ``X`` per token, pixel patch or sample), so the
output error of a perturbation ``ΔW`` over the calibration inputs is

    ‖ΔW·X‖² = tr(ΔW · H · ΔWᵀ),   H = X·Xᵀ  ([cols, cols], the input Gram matrix)

and one pass that accumulates ``H`` scores every format with no further forwards (GPTQ, Frantar
et al. 2022, §3, uses the same Hessian ``2XXᵀ``). Per kind:

- Linear / transformers' Conv1D: ``X`` is the input features; tokens whose ``attention_mask`` is
  0 (padding) are dropped, so padding never weighs on the score.
- Conv1d / Conv2d: ``X`` is the unfolded input patches (``torch.nn.functional.unfold`` after the
  module's own padding, stride and dilation); with ``groups > 1`` each group of output channels
  sees only its own input channels, so ``H`` is ``[groups, cols, cols]``.
- Embedding: the input is one-hot, so ``H`` is diagonal and holds token counts; ``ΔW·X`` picks
  rows of ``ΔW``, and the error is ``Σ_i count_i ‖ΔW_i‖²`` (counts, never a dense one-hot).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bitplan.sensitivity.layers import QuantLayer

__all__ = ["InputStats", "gram_matrices", "stats_bytes"]

Conv = nn.Conv1d | nn.Conv2d


def _conv_groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, Conv) else 1


def stats_bytes(module: nn.Module, layer: QuantLayer) -> int:
    """Bytes :class:`InputStats` holds for ``layer`` (float32), known before allocating."""
    rows, cols = layer.shape
    if layer.kind == "embedding":
        return 4 * rows
    return 4 * _conv_groups(module) * cols * cols


def _pad_amounts(module: Conv) -> list[int]:
    """The module's padding as ``F.pad`` amounts (last dim first), ``"same"``/``"valid"`` too.

    For ``"same"`` PyTorch puts the odd pixel of an even kernel on the right/bottom; so do we.
    """
    amounts: list[int] = []
    for i in reversed(range(len(module.kernel_size))):
        padding = module.padding
        if isinstance(padding, str):  # "valid": none; "same": the kernel's reach, split
            total = 0 if padding == "valid" else module.dilation[i] * (module.kernel_size[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = padding[i]
        amounts += [left, right]
    return amounts


def _conv_patches(module: Conv, x: torch.Tensor) -> torch.Tensor:
    """Input patches of a convolution as ``[groups, n_patches, cols]`` float32."""
    conv1d = isinstance(module, nn.Conv1d)
    spatial = 1 if conv1d else 2
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x.to(torch.float32), _pad_amounts(module), mode=mode)
    kernel: tuple[int, ...] = module.kernel_size
    dilation: tuple[int, ...] = module.dilation
    stride: tuple[int, ...] = module.stride
    if conv1d:  # unfold is 2-D only: treat a sequence as a 1-pixel-high image
        x = x.unsqueeze(2)  # (B, C, 1, L)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C·k…, L)
    batch, width, length = patches.shape
    groups = module.groups
    # unfold orders features channel-major like weight.view(out, -1), so group g's channels
    # are the g-th contiguous slice.
    patches = patches.view(batch, groups, width // groups, length)  # (B, groups, cols, L)
    grouped: torch.Tensor = patches.permute(1, 0, 3, 2)  # (groups, B, L, cols)
    return grouped.reshape(groups, batch * length, -1)  # (groups, B·L, cols)


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Features ``[..., in]`` as ``[n_tokens, in]``, keeping only unmasked tokens."""
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(torch.bool)]  # (n_kept, in)
    return x.reshape(-1, x.shape[-1])  # (n_tokens, in)


class InputStats:
    """Accumulates one layer's input statistics and scores weight perturbations against them."""

    def __init__(self, module: nn.Module, layer: QuantLayer, device: torch.device) -> None:
        self.layer = layer
        self.conv = module if isinstance(module, Conv) else None
        rows, cols = layer.shape
        groups = _conv_groups(module)
        # Rows (output channels) per convolution group: each block of rows has its own H.
        self.block = rows // groups
        if layer.kind == "embedding":
            self.counts: torch.Tensor | None = torch.zeros(rows, device=device)
            self.gram: torch.Tensor | None = None
        else:
            self.counts = None
            self.gram = torch.zeros(groups, cols, cols, device=device)  # (groups, cols, cols)
        self.samples = 0  # input rows (tokens, patches) seen; 0 means the layer never ran

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Fold one call's input into the statistics (``mask``: the batch's attention mask)."""
        if self.counts is not None:  # an embedding: its inputs are token ids
            ids = _token_rows(x.unsqueeze(-1), mask).flatten()  # (n_kept,)
            self.counts += torch.bincount(ids, minlength=self.counts.numel()).to(self.counts)
            self.samples += ids.numel()
            return
        if self.conv is not None:
            xs = _conv_patches(self.conv, x)  # (groups, n, cols)
        else:
            xs = _token_rows(x, mask).to(torch.float32).unsqueeze(0)  # (1, n, cols)
        self._gram().baddbmm_(xs.transpose(1, 2), xs)
        self.samples += xs.shape[1]

    def _gram(self) -> torch.Tensor:
        if self.gram is None:
            raise TypeError(f"{self.layer.name} is an embedding: it has token counts, no H")
        return self.gram

    def energy(self, start: int, stop: int, m: torch.Tensor) -> float:
        """``‖M·X‖²`` for rows ``start:stop`` of a ``[rows, cols]`` matrix, given as ``m``."""
        if self.counts is not None:
            return float((self.counts[start:stop, None] * m.square()).sum())
        h = self._gram()[start // self.block]  # (cols, cols); chunks never straddle a group
        return float(((m @ h) * m).sum())


def gram_matrices(
    layers: Sequence[QuantLayer], stats: Mapping[str, InputStats]
) -> dict[str, torch.Tensor]:
    """``{param: H}`` of the layers whose statistics are in ``stats`` (keyed by layer name), as
    a :class:`~bitplan.sensitivity.rounder.Rounder` takes them.

    A tied tensor's matrix is the sum over the linear layers that use it (the output error of a
    shared weight adds up over its uses); an embedding's use adds nothing (its inputs are
    one-hot token ids), nor does a layer that never ran.
    """
    grams: dict[str, torch.Tensor] = {}
    for lay in layers:
        st = stats.get(lay.name)
        if st is None or st.gram is None or st.samples == 0:
            continue
        have = grams.get(lay.param)
        grams[lay.param] = st.gram if have is None else have + st.gram
    return grams
