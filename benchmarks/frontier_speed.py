"""Exact-frontier speed on LLaMA-sized problems: 500 layers x 8 formats and 2000 x 12, one core.

The sensitivity table is synthetic but shaped like a real one: seven matrix shapes repeating
per block (as in a LLaMA-7B layer), a log-normal per-layer sensitivity, and an error that falls
by ~4x per extra bit (uniform quantization noise power scales as 2^-2b) with +-20% per-format
jitter. The 12-format table adds four formats that real tables carry next to the first eight
(int8 with groups, and int6/int4/int3 at other group sizes).

Each size runs in a fresh process, so that its peak memory (resident set, ``getrusage``) is its
own; the table and problem are built before the clock starts. A size is timed up to
``--repeat`` times (once when a run takes more than 20 s) and the best and median wall-clock
times are reported, with the CPU time of the best run: the development machine is shared, and
wall-clock time there includes waiting for a core. Every frontier is exact unless
``--max-points`` asks for thinning.

Run: ``python -m benchmarks.frontier_speed [--size 500x8] [--size 2000x12] [--repeat 3]
[--max-points N] [--no-record]``; it prints one line per size.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from benchmarks._common import machine_info, update_results_section
from bitplan.search.frontier import exact_frontier
from bitplan.search.problem import LayerRow, Problem, build_problem
from bitplan.sensitivity.formats import parse_format

FORMATS_8 = (
    "fp16",
    "int8",
    "int6-g128",
    "int5-g128",
    "int4-g128",
    "int4-g64",
    "int3-g64",
    "int2-g32-asym",
)
FORMATS_12 = (*FORMATS_8, "int8-g128", "int6-g64", "int4-g32", "int3-g128")
FORMAT_SETS = {8: FORMATS_8, 12: FORMATS_12}
SIZES = ("500x8", "2000x12")
# q, k, v, o, gate, up, down of a LLaMA-7B block: (rows, cols).
SHAPES = ((4096, 4096),) * 4 + ((11008, 4096), (11008, 4096), (4096, 11008))
# A size whose first run takes longer than this is not repeated.
_REPEAT_UNDER_S = 20.0


def synthetic_problem(
    n_layers: int, formats: tuple[str, ...] = FORMATS_8, seed: int = 0
) -> Problem:
    """``n_layers`` LLaMA-shaped layers, each with a row per format (module docstring)."""
    rng = np.random.default_rng(seed)
    rows, layers = [], []
    for i in range(n_layers):
        shape = SHAPES[i % len(SHAPES)]
        name = f"model.layers.{i // len(SHAPES)}.proj{i % len(SHAPES)}"
        layers.append(
            LayerRow(
                name=name,
                param=f"{name}.weight",
                numel=shape[0] * shape[1],
                kind="linear",
                shape=shape,
            )
        )
        sensitivity = rng.lognormal(0.0, 1.0)
        for fmt in formats:
            bpw = parse_format(fmt).bits_per_weight(shape[1])
            rows.append(
                {
                    "layer": name,
                    "format": fmt,
                    "error": sensitivity * 4.0 ** (-bpw) * rng.uniform(0.8, 1.2),
                }
            )
    return build_problem(pd.DataFrame(rows), layers, unplanned_bytes=0, fp16_bytes=0)


@dataclass(frozen=True)
class Measured:
    """One size's result, measured in its own process."""

    layers: int
    formats: int
    points: int
    exact: bool
    seconds: list[float]
    cpu_seconds: float  # of the fastest run
    rss_before_mb: float
    rss_peak_mb: float

    def line(self, max_points: int | None) -> str:
        best, median = min(self.seconds), statistics.median(self.seconds)
        runs = len(self.seconds)
        timing = f"{best:.2f} s" + (f" (best of {runs}, median {median:.2f} s)" if runs > 1 else "")
        timing += f", {self.cpu_seconds:.2f} s of CPU"
        thinning = "" if max_points is None else f", max_points={max_points}"
        return (
            f"{self.layers} layers x {self.formats} formats -> {self.points:,} Pareto points "
            f"(exact={self.exact}{thinning}) in {timing}; peak RSS {self.rss_peak_mb:,.0f} MiB "
            f"({self.rss_before_mb:,.0f} MiB before the frontier)"
        )


def _rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def measure(layers: int, n_formats: int, repeat: int, max_points: int | None) -> Measured:
    """Build the problem, then time ``exact_frontier`` on it (in the calling process)."""
    problem = synthetic_problem(layers, FORMAT_SETS[n_formats])
    before = _rss_mb()
    seconds: list[float] = []
    cpu: list[float] = []
    while True:
        start, start_cpu = time.perf_counter(), time.process_time()
        frontier = exact_frontier(problem, max_points=max_points)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if len(seconds) >= repeat or seconds[0] > _REPEAT_UNDER_S:
            break
    fastest = seconds.index(min(seconds))
    return Measured(
        layers=layers,
        formats=n_formats,
        points=len(frontier),
        exact=frontier.exact,
        seconds=seconds,
        cpu_seconds=cpu[fastest],
        rss_before_mb=before,
        rss_peak_mb=_rss_mb(),
    )


def _size(text: str) -> tuple[int, int]:
    layers, _, formats = text.partition("x")
    if not layers.isdigit() or int(formats or 0) not in FORMAT_SETS:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: want LAYERSxFORMATS with formats one of {sorted(FORMAT_SETS)}"
        )
    return int(layers), int(formats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        type=_size,
        action="append",
        help=f"LAYERSxFORMATS, repeatable (default: {' and '.join(SIZES)})",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per size (best kept)")
    parser.add_argument(
        "--max-points", type=int, default=None, help="thin past this many points (default: exact)"
    )
    parser.add_argument(
        "--no-record",
        dest="record",
        action="store_false",
        help="Do not write benchmarks/RESULTS.md.",
    )
    args = parser.parse_args()
    sizes = args.size or [_size(s) for s in SIZES]
    load = os.getloadavg()[0]
    results = []
    context = multiprocessing.get_context("spawn")
    for layers, n_formats in sizes:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result = pool.submit(measure, layers, n_formats, args.repeat, args.max_points).result()
        results.append(result)
        print(f"frontier_speed: {result.line(args.max_points)}", flush=True)
    if args.record:
        target = next((r for r in results if (r.layers, r.formats) == (500, 8)), None)
        verdict = (
            ""
            if target is None
            else f"\n- target: 500 layers x 8 formats under 1 s — "
            f"{'met' if min(target.seconds) < 1 else 'missed'}"
        )
        lines = "\n".join(f"- {r.line(args.max_points)}" for r in results)
        update_results_section(
            "Exact frontier speed",
            f"Machine: {machine_info()}\n\n`python -m benchmarks.frontier_speed`: synthetic "
            "LLaMA-shaped tables (7 matrix shapes repeating, log-normal sensitivities), each "
            "size in its own process, wall-clock time of `exact_frontier` alone (the machine "
            f"is shared, its load average was {load:.1f} at the start: best of up to "
            f"{args.repeat} runs, and the CPU time).\n\n{lines}{verdict}\n",
        )


if __name__ == "__main__":
    main()
