"""Have glibc give freed tensor memory back to the system at once (issue 9's memory bound).

glibc's ``malloc`` serves a request of at least ``M_MMAP_THRESHOLD`` bytes with a mapping of
its own, which ``free`` unmaps at once; smaller requests come from the heap, whose free memory
goes back to the system only when it lies at the heap's top. The threshold starts at 128 KiB
but is *dynamic*: freeing a mapped chunk raises it to that chunk's size (up to 32 MiB on a
64-bit system). A job frees tensors of a few MiB again and again (a layer's quantized copy or
gradient, activations), so after the first ones the threshold sits above their size, later
ones land in the heap, and fragmentation keeps hundreds of MB resident that the process no
longer uses. ``benchmarks/blockwise_memory.py`` measured it: block-wise analysis peaked at
1226 MiB, and at 844 MiB with the threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_=131072``,
which also turns the dynamic adjustment off). :func:`return_freed_memory` sets a fixed threshold
from inside the process, so nobody has to remember the variable. On the 0.95 B-parameter
bfloat16 LLaMA of ``benchmarks/scale.py`` it is what keeps ``analyze`` and ``search`` inside
issue 9's bound (3.48 GB there): both peaked at 3.40 GB with it; without it ``analyze`` peaked at
3.94-4.05 GB and ``search`` at 3.60 GB (the benchmark repeats ``analyze`` without it).

The threshold is 1 MiB (:data:`MMAP_THRESHOLD_BYTES`): on that LLaMA it keeps as much memory
back as 128 KiB did, while 4 MiB kept none (3.87 GB). Every tensor at or above it is a fresh
mapping whose pages the kernel zeroes when first touched, instead of reused heap, which costs
time where a loop makes and drops buffers of that size: fisher's pass of that ``analyze`` took
37-39 s on an idle 2-core machine instead of 14-16 s with glibc's defaults, when the scoring's
float32 work buffers were 16 MiB. They are 512 KiB now, below the threshold, for the element-wise
scorings that fisher repeats every batch (``ELEMENTWISE_CHUNK_ELEMENTS`` in
``sensitivity/methods/_common.py``; ``benchmarks/chunk_size.py`` measured fisher's fold 2.3x
faster than with 16 MiB buffers, the threshold at 1 MiB, and 4x faster than with the threshold at
128 KiB, where every buffer is mapped), and the plan applier's quantization works on 256 KiB
chunks (``sensitivity/formats.py``). Setting ``MALLOC_MMAP_THRESHOLD_`` (e.g. to 33554432,
glibc's largest dynamic value) trades the memory back for the speed.

So the threshold is fixed only for models whose checkpoint is large enough for the memory to
matter (:data:`LARGE_CHECKPOINT_BYTES`, 1 GiB, by :func:`return_freed_memory_for`): a small
encoder's job stays inside the bound with glibc's defaults (1.00 GB against 1.12 GB for the
MiniLM of ``benchmarks/scale.py``) and keeps its speed. Called by the programs that run jobs
(the CLI's ``analyze`` and ``search``, a service worker before each job), never by the
``sensitivity`` or ``search`` packages: how a program that imports them allocates is that
program's choice. Once fixed, it stays fixed for the process's later jobs. Only on Linux with
glibc; elsewhere (musl, macOS, Windows) it does nothing, and a ``MALLOC_MMAP_THRESHOLD_``
already in the environment wins.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from pathlib import Path

__all__ = [
    "LARGE_CHECKPOINT_BYTES",
    "MMAP_THRESHOLD_BYTES",
    "MMAP_THRESHOLD_LABEL",
    "checkpoint_bytes",
    "return_freed_memory",
    "return_freed_memory_for",
]

logger = logging.getLogger(__name__)

# Above the element-wise scorings' 512 KiB work buffers, below the few-MiB activations and
# quantized copies that must go back to the system (module docstring).
MMAP_THRESHOLD_BYTES = 1 << 20
MMAP_THRESHOLD_LABEL = "1 MiB"  # how the benchmarks name it
# Checkpoints from this size on get the fixed threshold (about 0.5 B parameters in bfloat16).
LARGE_CHECKPOINT_BYTES = 2**30
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
_ENV = "MALLOC_MMAP_THRESHOLD_"


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; returns whether it was set.

    Never raises: where glibc is absent or refuses, the allocator keeps its defaults.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if _ENV in os.environ:
        logger.debug("%s is set; glibc's mmap threshold left as the environment says", _ENV)
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))  # 1 on success, 0 on failure
    logger.debug("glibc mmap threshold %s at %d bytes", "fixed" if done else "not set", threshold)
    return done


def checkpoint_bytes(model_ref: str) -> int:
    """Bytes of the weight files behind a model reference: a folder's ``*.safetensors`` /
    ``*.bin`` / ``*.pt(h)`` files, a single file's size (a zip, a torch file); 0 for anything
    else (``builtin:`` models, a path that does not exist or cannot be read)."""
    path = Path(model_ref)
    try:
        if path.is_dir():
            return sum(
                f.stat().st_size
                for f in path.iterdir()
                if f.is_file() and f.suffix in _WEIGHT_SUFFIXES
            )
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def return_freed_memory_for(model_ref: str) -> bool:
    """:func:`return_freed_memory` when ``model_ref``'s checkpoint is at least
    :data:`LARGE_CHECKPOINT_BYTES`; returns whether the threshold was fixed now."""
    size = checkpoint_bytes(model_ref)
    if size < LARGE_CHECKPOINT_BYTES:
        return False
    logger.info("checkpoint of %.2f GB: freed tensor memory goes back to the system", size / 1e9)
    return return_freed_memory()
