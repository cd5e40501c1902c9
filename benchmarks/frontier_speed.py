"""Exact-frontier speed on a LLaMA-sized problem: 500 layers x 8 formats, one core.

The sensitivity table is synthetic but shaped like a real one: seven matrix shapes repeating
per block (as in a LLaMA-7B layer), a log-normal per-layer sensitivity, and an error that falls
by ~4x per extra bit (uniform quantization noise power scales as 2^-2b) with +-20% per-format
jitter. Run: ``python benchmarks/frontier_speed.py [--layers 500] [--max-points 200000]``;
it prints one result line.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from benchmarks._common import machine_info, update_results_section
from bitplan.search.frontier import DEFAULT_MAX_POINTS, exact_frontier
from bitplan.search.problem import LayerRow, Problem, build_problem
from bitplan.sensitivity.formats import parse_format

FORMATS = (
    "fp16",
    "int8",
    "int6-g128",
    "int5-g128",
    "int4-g128",
    "int4-g64",
    "int3-g64",
    "int2-g32-asym",
)
# q, k, v, o, gate, up, down of a LLaMA-7B block: (rows, cols).
SHAPES = ((4096, 4096),) * 4 + ((11008, 4096), (11008, 4096), (4096, 11008))


def synthetic_problem(n_layers: int, seed: int = 0) -> Problem:
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
        for fmt in FORMATS:
            bpw = parse_format(fmt).bits_per_weight(shape[1])
            rows.append(
                {
                    "layer": name,
                    "format": fmt,
                    "error": sensitivity * 4.0 ** (-bpw) * rng.uniform(0.8, 1.2),
                }
            )
    return build_problem(pd.DataFrame(rows), layers, unplanned_bytes=0, fp16_bytes=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--max-points", type=int, default=DEFAULT_MAX_POINTS)
    parser.add_argument(
        "--no-record",
        dest="record",
        action="store_false",
        help="Do not write benchmarks/RESULTS.md.",
    )
    args = parser.parse_args()
    problem = synthetic_problem(args.layers)
    start = time.perf_counter()
    frontier = exact_frontier(problem, max_points=args.max_points)
    seconds = time.perf_counter() - start
    line = (
        f"{args.layers} layers x {len(FORMATS)} formats -> {len(frontier)} Pareto points "
        f"(exact={frontier.exact}, max_points={args.max_points}) in {seconds:.2f} s"
    )
    print(f"frontier_speed: {line}")
    if args.record:
        update_results_section(
            "Exact frontier speed",
            (
                f"Machine: {machine_info()}\n\n`python -m benchmarks.frontier_speed`: a synthetic "
                "LLaMA-shaped table (7 matrix shapes repeating, log-normal sensitivities), one "
                f"process.\n\n- {line}\n- target: 500 layers x 8 formats under 1 s"
                f" — {'met' if seconds < 1 else 'missed'}\n"
            ),
        )


if __name__ == "__main__":
    main()
