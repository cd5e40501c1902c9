"""Quantizable layers of a model: discovery, tie and share groups, exclusions, pins, quantization.

A *layer* here is one weight matrix that a plan assigns a format to: the weight of a Linear,
Conv1d/Conv2d, Embedding or transformers' Conv1D. Every weight is viewed as ``[rows, cols]``
(DESIGN §3): Linear ``[out, in]``; Conv ``[out, in·k…]``; Embedding ``[num, dim]``;
transformers' Conv1D (stored ``[in, out]``) transposed to ``[out, in]``.

Parameters shared between modules (an LM head tied to the embedding) form one *tie group*: they
are stored once, counted once, and must share one format. Separate tensors that a runtime needs
in one format (q/k/v fused into one matmul, gate/up, DESIGN §6) form a *share group*
(:mod:`bitplan.sensitivity.fusion`): one format, but each tensor keeps its own bytes. A plan
decides once per :attr:`QuantLayer.group`; bytes are counted once per
:attr:`QuantLayer.tensor_key`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import (
    CodesFn,
    FormatError,
    QuantFormat,
    check_applicable,
    fake_quantize,
    parse_format,
)

__all__ = [
    "LayerKind",
    "QuantLayer",
    "apply_pins",
    "find_quant_layers",
    "get_weight",
    "parameter_bytes",
    "quantized",
    "weight_matrix",
]

LayerKind = Literal["linear", "conv1d", "conv2d", "embedding", "hf_conv1d"]


@dataclass(frozen=True)
class QuantLayer:
    """One plannable weight matrix.

    ``name`` is the module's FQN, ``param`` the weight's name in ``model.named_parameters()``
    (for a tied weight, the name under which it is registered first), ``shape`` the matrix view
    ``[rows, cols]``. ``tie`` names the tie group (its first layer's ``param``) or is None.
    ``pinned`` is a format name the user forced, or None. ``share`` names the share group
    (separate tensors that must take one format, see the module docstring) or is None.
    """

    name: str
    param: str
    kind: LayerKind
    shape: tuple[int, int]
    numel: int
    tie: str | None = None
    pinned: str | None = None
    share: str | None = None

    @property
    def tensor_key(self) -> str:
        """The stored tensor: the tie group, or the layer itself (bytes count once per key)."""
        return self.tie or self.name

    @property
    def group(self) -> str:
        """The unit a plan decides on: the share group, else the tie group, else the layer."""
        return self.share or self.tensor_key


def _kind_of(module: nn.Module) -> LayerKind | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # transformers' GPT-2 style Conv1D, matched by name so transformers stays optional.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "hf_conv1d"
    return None


def weight_matrix(weight: torch.Tensor, kind: LayerKind) -> torch.Tensor:
    """The ``[rows, cols]`` view of a weight; writes to the view change the weight."""
    if kind in ("linear", "embedding"):
        return weight
    if kind in ("conv1d", "conv2d"):
        return weight.view(weight.shape[0], -1)  # (out, in·k…)
    if kind == "hf_conv1d":
        return weight.t()  # (out, in): Conv1D stores (in, out)
    raise ValueError(f"unknown layer kind {kind!r}")


def find_quant_layers(model: nn.Module, *, exclude: Sequence[str] = ()) -> list[QuantLayer]:
    """List the quantizable weights of ``model`` in module order.

    ``exclude`` holds fnmatch patterns matched against module FQNs; matching layers are left out
    (they stay at their stored dtype and count as unplanned bytes). Excluding one member of a tie
    group excludes the whole group, since a shared tensor has one format.
    """
    first_name: dict[int, str] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), pname)
    owners: dict[int, int] = {}
    found: list[tuple[str, LayerKind, torch.nn.Parameter]] = []
    for mname, module in model.named_modules(remove_duplicate=False):
        kind = _kind_of(module)
        weight = getattr(module, "weight", None)
        if kind is None or not isinstance(weight, torch.nn.Parameter):
            continue
        if any(m == mname for m, _, _ in found):
            continue
        found.append((mname, kind, weight))
        owners[id(weight)] = owners.get(id(weight), 0) + 1
    excluded_ids = {id(w) for m, _, w in found if any(fnmatch.fnmatchcase(m, p) for p in exclude)}
    layers = []
    for mname, kind, weight in found:
        if id(weight) in excluded_ids:
            continue
        pname = first_name[id(weight)]
        rows, cols = weight_matrix(weight, kind).shape
        tie = pname if owners[id(weight)] > 1 else None
        layers.append(
            QuantLayer(
                name=mname,
                param=pname,
                kind=kind,
                shape=(rows, cols),
                numel=weight.numel(),
                tie=tie,
            )
        )
    return layers


def apply_pins(layers: Sequence[QuantLayer], pins: dict[str, str]) -> list[QuantLayer]:
    """Pin layers to formats: ``{"fnmatch pattern": "format"}``, matched against FQNs.

    A pin on one member of a tie group pins the group. Two pins that disagree on one layer or
    tie group are an error, as is a pattern that matches nothing (a typo would otherwise pass).
    Pins run before :func:`~bitplan.sensitivity.fusion.fuse_layers` sets share groups, so a pin
    marks only the layers it matches; the problem builder
    (:func:`bitplan.search.problem.build_problem`) spreads a member's pin over its share group
    and refuses two different pins in one.
    """
    for fmt in pins.values():
        parse_format(fmt)
    chosen: dict[str, str] = {}
    for pattern, fmt in pins.items():
        hits = [lay for lay in layers if fnmatch.fnmatchcase(lay.name, pattern)]
        if not hits:
            raise InputError(f"pin pattern {pattern!r} matches no quantizable layer")
        for lay in hits:
            try:  # a pin is never silently swapped for a fallback
                check_applicable(parse_format(fmt), lay.shape[1])
            except FormatError as err:
                raise InputError(f"pin {pattern}={fmt} on {lay.name}: {err}") from None
            previous = chosen.setdefault(lay.group, fmt)
            if previous != fmt:
                raise InputError(f"{lay.name} is pinned to both {previous} and {fmt}")
    return [replace(lay, pinned=chosen.get(lay.group)) for lay in layers]


def get_weight(model: nn.Module, layer: QuantLayer) -> torch.nn.Parameter:
    """The weight parameter of ``layer`` in ``model``."""
    weight = model.get_submodule(layer.name).weight
    if not isinstance(weight, torch.nn.Parameter):
        raise TypeError(f"{layer.name}.weight is not a parameter but {type(weight).__name__}")
    return weight


def parameter_bytes(model: nn.Module, layers: Sequence[QuantLayer]) -> tuple[int, int]:
    """``(unplanned_bytes, fp16_bytes)`` of ``model`` given the planned ``layers``.

    Unplanned parameters (biases, norms, excluded layers) count at their stored dtype; shared
    parameters count once. ``fp16_bytes`` is the whole model at 2 bytes a parameter, the
    reference for ``ratio`` budgets.
    """
    planned = {id(get_weight(model, lay)) for lay in layers}
    unplanned = fp16 = 0
    for p in model.parameters():  # parameters() yields a shared tensor once
        fp16 += 2 * p.numel()
        if id(p) not in planned:
            unplanned += p.numel() * p.element_size()
    return unplanned, fp16


@contextmanager
def quantized(
    model: nn.Module,
    layer: QuantLayer,
    fmt: QuantFormat | str,
    *,
    codes: CodesFn | None = None,
) -> Iterator[None]:
    """Fake-quantize one layer's weight in place for the duration of the block, then restore it
    (``codes``: how a format with a rounding other than rtn is rounded, see ``fake_quantize``).

    Holds exactly one extra copy of the weight (the backup), in the weight's own dtype.
    """
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    weight = get_weight(model, layer)
    with torch.no_grad():
        backup = weight.detach().clone()
        try:
            view = weight_matrix(weight.data, layer.kind)
            fake_quantize(view, fmt, out=view, codes=codes)
            yield
        finally:
            weight.data.copy_(backup)
            del backup
