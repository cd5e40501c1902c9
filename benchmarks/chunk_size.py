"""How many rows the per-layer scoring should quantize at a time, under each glibc allocator mode.

Why: every sensitivity method walks a weight's ``ΔW = Q(W) − W`` a chunk of rows at a time
(:func:`bitplan.sensitivity.methods._common.iter_deltas`), and fisher's streamed fold does so
once per format per calibration batch (:mod:`bitplan.sensitivity.methods._fisher_folds`), so
this loop is most of fisher's time on a large model. Each chunk makes a handful of float32
temporaries of the chunk's size. How fast they come and go depends on glibc: below its mmap
threshold they are reused heap memory; at or above it each one is a fresh mapping whose pages
the kernel must fault in and zero. The CLI and the workers fix that threshold for large
checkpoints so that freed activations go back to the system (:mod:`bitplan.app.allocator`,
issue 9's memory bound): a chunk whose temporaries pass the threshold then pays page faults on
every temporary. And chunks that fit the CPU's caches are faster anyway.

What runs: in a fresh process per (allocator mode, chunk size), four chunked loops over
one seeded LLaMA-MLP-sized bfloat16 weight (5632 x 2048) in ``int4`` and ``int8``: fisher's fold
(``Σ g² ΔW²``), ``weight`` (``Σ ΔW²``) and ``layer`` (``Σ (ΔW H) ⊙ ΔW`` with a 2048 x 2048
Gram matrix); and ``apply``, the plan applier's fake quantization of the whole weight into
its place (:func:`bitplan.sensitivity.formats.fake_quantize`, whose own chunk size is set to the
row's; the three scorings quantize through it with its default chunk, as the code does); the best
of ``--repeats`` timings of each. Allocator modes: glibc's defaults
(dynamic threshold), and the threshold fixed at 128 KiB and at 1 MiB
(``MALLOC_MMAP_THRESHOLD_``).

Run: ``python -m benchmarks.chunk_size [--quick] [--json PATH]``; about a minute.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # as a script its folder leads sys.path and benchmarks/sensitivity.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # would shadow the package

import argparse
import json
import logging
import os
import subprocess
import timeit
from collections.abc import Callable

SECTION = "Scoring chunk size"
CHUNKS = (1 << 24, 1 << 22, 1 << 18, 1 << 17, 1 << 16)
MODES = {"glibc default": None, "mmap 128 KiB": 131072, "mmap 1 MiB": 1 << 20}
SHAPE = (5632, 2048)  # rows, cols: a LLaMA-7B-like MLP projection at a 1 B model's width
SCORINGS = ("fisher fold", "weight", "layer", "apply")


def _measure(chunk: int, repeats: int, shape: tuple[int, int] = SHAPE) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each scoring of a ``shape`` weight with ``chunk`` elements
    a chunk (in this process)."""
    import torch

    from bitplan.sensitivity import formats as quantizer
    from bitplan.sensitivity.format_spec import parse_format
    from bitplan.sensitivity.methods import _common

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).to(torch.bfloat16)
    g = torch.randn(shape, generator=gen).to(torch.bfloat16)
    x = torch.randn(4 * shape[1], shape[1], generator=gen)
    gram = x.T @ x  # (cols, cols)
    formats = [parse_format("int4"), parse_format("int8")]

    def fold() -> None:
        for fmt in formats:
            for a, b, _, dw in _common.iter_deltas(w, fmt, chunk_elements=chunk):
                float((g[a:b].to(torch.float32).square() * dw.square()).sum())

    def weight() -> None:
        for fmt in formats:
            for _, _, _, dw in _common.iter_deltas(w, fmt, chunk_elements=chunk):
                float(dw.square().sum())

    def layer() -> None:
        for fmt in formats:
            for _, _, _, dw in _common.iter_deltas(w, fmt, chunk_elements=chunk):
                float(((dw @ gram) * dw).sum())

    def apply() -> None:
        default, quantizer._CHUNK_ELEMENTS = quantizer._CHUNK_ELEMENTS, chunk  # read at call time
        try:
            out = torch.empty_like(w)
            for fmt in formats:
                quantizer.fake_quantize(w, fmt, out=out)
        finally:
            quantizer._CHUNK_ELEMENTS = default

    def best(fn: Callable[[], None]) -> float:
        return min(timeit.repeat(fn, number=1, repeat=repeats))

    timed = (best(fold), best(weight), best(layer), best(apply))
    return dict(zip(SCORINGS, timed, strict=True))


def _run(mode: int | None, chunk: int, repeats: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if mode is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mode)
    command = [sys.executable, "-m", "benchmarks.chunk_size", "--child", str(chunk), str(repeats)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def _markdown(results: dict[str, dict[int, dict[str, float]]], repeats: int) -> str:
    from benchmarks._common import machine_info

    load = os.getloadavg()[0]
    lines = [
        f"Machine: {machine_info()} · 1-minute load average at the end {load:.1f}",
        "",
        f"Seconds (best of {repeats}) to score one bfloat16 weight of {SHAPE[0]} x {SHAPE[1]} "
        "in int4 and int8, a chunk of rows at a time, in a fresh process per row. `fisher "
        "fold` is what fisher's streamed fold does per calibration batch, so on a large model "
        "it runs once per batch for every planned weight. The chunk is the scoring loop's "
        "(`iter_deltas`); inside it the quantizer works on its own chunks of 64 Ki elements, as "
        "in the code; `apply` sets the quantizer's chunk to the row's. Reproduce: `python -m "
        "benchmarks.chunk_size`.",
        "",
        "| glibc malloc | chunk (elements) | float32 chunk MiB | "
        + " | ".join(f"{s} s" for s in SCORINGS)
        + " |",
        "|---|---:|---:|" + "---:|" * len(SCORINGS),
    ]
    for mode, by_chunk in results.items():
        for chunk, seconds in by_chunk.items():
            cells = " | ".join(f"{seconds[s]:.3f}" for s in SCORINGS)
            lines.append(f"| {mode} | {chunk} | {chunk * 4 / 2**20:g} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        sys.stdout.write(json.dumps(_measure(int(argv[1]), int(argv[2]))) + "\n")
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunk_size", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat, results not recorded")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    repeats = 1 if args.quick else args.repeats
    results: dict[str, dict[int, dict[str, float]]] = {}
    for mode, threshold in MODES.items():
        for chunk in CHUNKS:
            results.setdefault(mode, {})[chunk] = _run(threshold, chunk, repeats)
            logging.info("%s, chunk %d: %s", mode, chunk, results[mode][chunk])
    from benchmarks._common import publish_report

    publish_report(
        _markdown(results, repeats),
        {"repeats": repeats, "results": results},
        section=SECTION,
        json_path=args.json,
        record=not args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
