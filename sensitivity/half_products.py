"""Matrix products of a bfloat16 or float16 model in float32 on CPUs without fast half kernels.

Why: a model stays in its checkpoint's dtype (issue 9: a bfloat16 checkpoint takes 2 bytes a
weight in memory, not 4), but not every CPU multiplies half-precision matrices fast. Where
oneDNN has no half-precision kernel for the CPU (x86 without AVX-512, as many cloud machines),
torch falls back to a reference loop. On a 2-core AVX2 machine, one thread, 128 tokens through
a 1024 -> 2048 linear layer: the forward product (``x @ Wᵀ``) took 61 ms in bfloat16 against
25 ms in float32, and the product backward makes for the input's gradient (``g @ W``) 879 ms
against 17 ms; a ``[128, 1024] @ [1024, 1024]`` product took 324 ms in bfloat16 and 367 ms in
float16 against 3.5 ms in float32 (two threads). The scale benchmark's bfloat16 LLaMA had not
finished fisher's pass after 7.5 minutes there. Attention (``scaled_dot_product_attention``)
and element-wise work stay fast in half precision; only the products do not.

So, on such a CPU, :func:`float32_products` computes the products of half-precision tensors in
float32 and rounds their results back to the half dtype, which is what torch's own half
kernels do (they accumulate in float32 and round the output), so the model computes the same
numbers up to the order of the sums. A linear layer (``F.linear``: the weights of LLaMA,
Mistral, BERT...) is computed a few rows of its weight at a time (:data:`CHUNK_ELEMENTS`), so no
float32 copy of a whole weight exists, and under autograd it saves its half-precision inputs,
not float32 copies, and recomputes the float32 rows in backward: fisher's memory stays that of
the half model. Other products (``matmul``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``: eager
attention, GPT-2's ``Conv1D``) are computed on float32 copies of their operands, which autograd
keeps for backward when gradients are taken (fisher on a GPT-2 holds a float32 copy of each
``Conv1D`` weight from its forward to its backward).

Whether a CPU needs it is measured once per process and dtype (:func:`slow_half_products`: a
small product timed in both dtypes on one thread, so a busy machine does not blur it);
``BITPLAN_HALF_PRODUCTS=float32`` or ``native`` decides instead. CUDA tensors and float32
models are never touched. A user metric of the Python API (``search.pipeline``) scores the
module itself and runs its products as it likes.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import timeit
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from bitplan.sensitivity.errors import InputError

__all__ = [
    "CHUNK_ELEMENTS",
    "ENV",
    "HALF_DTYPES",
    "float32_products",
    "half_dtype_of",
    "run_module",
    "slow_half_products",
]

logger = logging.getLogger(__name__)

ENV = "BITPLAN_HALF_PRODUCTS"
HALF_DTYPES = (torch.bfloat16, torch.float16)
# Rows of a linear layer's weight upcast at a time: at most this many elements (16 MiB of
# float32), so a 32000 x 4096 head never has a 512 MiB float32 copy.
CHUNK_ELEMENTS = 1 << 22
# A half product this many times slower than float32 is "slow" (measured: ~100x on AVX2, ~1x
# where oneDNN has half kernels).
_SLOW_RATIO = 4.0
_PROBE_SHAPE = (64, 256)  # [64, 256] @ [256, 256]: ~0.1 ms in float32, ~10 ms when slow

_MATMULS = {
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.Tensor.mm,
    torch.bmm,
    torch.Tensor.bmm,
    torch.addmm,
    torch.Tensor.addmm,
    torch.baddbmm,
    torch.Tensor.baddbmm,
}
_active = threading.local()


def _best_seconds(fn: Callable[[], object]) -> float:
    """The fastest of five runs of ``fn``, in seconds (the first may pay for warming up)."""
    return min(timeit.repeat(fn, number=1, repeat=5))


@functools.cache
def _measured_slow(dtype: torch.dtype) -> bool:
    rows, cols = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, cols, generator=gen), torch.randn(cols, cols, generator=gen)
    ah, bh = a.to(dtype), b.to(dtype)
    # One thread: on a busy machine a float32 product spread over threads waits for a core and
    # looks as slow as the half one (the verdict holds for the whole process).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = _best_seconds(lambda: a @ b)
        half = _best_seconds(lambda: ah @ bh)
    finally:
        torch.set_num_threads(threads)
    slow = half > _SLOW_RATIO * full
    logger.info(
        "%s products on this CPU: %.2f ms against %.2f ms in float32%s",
        dtype, half * 1e3, full * 1e3, "; computed in float32" if slow else "",
    )  # fmt: skip
    return slow


def slow_half_products(dtype: torch.dtype) -> bool:
    """Whether products in ``dtype`` (bfloat16 or float16) should run in float32 on this CPU:
    ``BITPLAN_HALF_PRODUCTS`` (``float32``: yes, ``native``: no, ``auto`` or unset: measured
    once per process)."""
    if dtype not in HALF_DTYPES:
        return False
    choice = os.environ.get(ENV, "auto").strip().lower()
    if choice == "float32":
        return True
    if choice == "native":
        return False
    if choice != "auto":
        raise InputError(f"{ENV} must be auto, float32 or native, not {choice!r}")
    return _measured_slow(dtype)


def half_dtype_of(module: nn.Module) -> torch.dtype | None:
    """The half dtype of ``module``'s first floating-point parameter on the CPU, else None."""
    for p in module.parameters():
        if p.is_floating_point() and p.device.type == "cpu":
            return p.dtype if p.dtype in HALF_DTYPES else None
        if p.is_floating_point():
            return None
    return None


def _row_step(cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(cols, 1))


class _Float32Linear(torch.autograd.Function):
    """``F.linear`` of half tensors, computed in float32 a few weight rows at a time; saves the
    half inputs for backward, where the float32 rows are made again."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x32 = x.to(torch.float32)
        rows, cols = weight.shape
        out = x.new_empty((*x.shape[:-1], rows))  # (..., out_features) in the half dtype
        step = _row_step(cols)
        for a in range(0, rows, step):
            part = x32 @ weight[a : a + step].to(torch.float32).T  # (..., rows a:a+step)
            if bias is not None:
                part += bias[a : a + step].to(torch.float32)
            out[..., a : a + step] = part
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        rows, cols = weight.shape
        step = _row_step(cols)
        g32 = grad.to(torch.float32).reshape(-1, rows)  # (N, out_features)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            acc = g32.new_zeros(g32.shape[0], cols)  # (N, in_features)
            for a in range(0, rows, step):
                acc += g32[:, a : a + step] @ weight[a : a + step].to(torch.float32)
            grad_x = acc.to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            x32 = x.to(torch.float32).reshape(-1, cols)  # (N, in_features)
            grad_w = torch.empty_like(weight)
            for a in range(0, rows, step):
                grad_w[a : a + step] = g32[:, a : a + step].T @ x32
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g32.sum(dim=0).to(weight.dtype)
        return grad_x, grad_w, grad_b


def _half_cpu(values: list[Any]) -> torch.dtype | None:
    """The one half dtype of the tensors in ``values``, all on the CPU; else None."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or any(t.device.type != "cpu" for t in tensors):
        return None
    dtype = dtypes.pop()
    return dtype if dtype in HALF_DTYPES else None


class _Float32Products(TorchFunctionMode):
    """Routes half-precision CPU products to float32 (the module docstring)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_arguments(args, kwargs)
            operands = [x, weight] + ([bias] if bias is not None else [])
            tensors = isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            if tensors and weight.dim() == 2 and _half_cpu(operands) is not None:
                # torch leaves Function.apply unannotated
                return _Float32Linear.apply(x, weight, bias)  # type: ignore[no-untyped-call]
        elif func in _MATMULS and "out" not in kwargs:
            dtype = _half_cpu([*args, *kwargs.values()])
            if dtype is not None:
                up = tree_map(lambda v: v.to(torch.float32) if _is(v, dtype) else v, args)
                kw = tree_map(lambda v: v.to(torch.float32) if _is(v, dtype) else v, kwargs)
                return func(*up, **kw).to(dtype)
        return func(*args, **kwargs)


def _linear_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(input, weight, bias)`` of an ``F.linear`` call, by position or by name."""
    named = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
    return named.get("input"), named.get("weight"), named.get("bias")


def _is(value: Any, dtype: torch.dtype) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == dtype


def _depth() -> int:
    """How many :func:`float32_products` contexts this thread is inside (0 or 1)."""
    depth: int = getattr(_active, "depth", 0)
    return depth


@contextmanager
def _routed() -> Iterator[None]:
    _active.depth = _depth() + 1
    try:
        with _Float32Products():
            yield
    finally:
        _active.depth -= 1


def float32_products(module: nn.Module) -> AbstractContextManager[None]:
    """Within it, ``module``'s half-precision products run in float32 when this CPU needs it
    (:func:`slow_half_products`); a no-op for float32 or CUDA modules and when already inside."""
    dtype = half_dtype_of(module)
    if dtype is None or _depth() > 0 or not slow_half_products(dtype):
        return nullcontext()
    return _routed()


def run_module(module: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
    """``module(**batch)``, the project's calling convention, with :func:`float32_products`."""
    with float32_products(module):
        return module(**batch)
