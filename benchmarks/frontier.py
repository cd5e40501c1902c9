"""Frontier quality: does bitplan's frontier beat uniform formats and published allocators?

Why: a mixed-precision planner is only worth running if its plans are better than quantizing
every layer the same way, better than the allocators people already use, and if the Optuna
search on the measured error improves on the exact proxy plan it starts from. Per model, for
each uniform format ``U`` this runs the real pipeline (:func:`bitplan.search.pipeline.run_job`) with
a budget of exactly ``U``'s size and records, all on the held-out split:

(a) the frontier's best error at ``U``'s size or smaller, divided by ``U``'s error
    (target <= 0.5);
(b) the Optuna-refined plan (the frontier point with the lowest *calibration* error under the
    budget, the one a user is handed) against the exact-proxy plan
    (:func:`bitplan.search.frontier.best_under` on the same sensitivity table and budget);
(c) two baselines (:mod:`benchmarks.baselines`): AIMET-style greedy promotion on ``e2e``
    sensitivities and HAWQ-V3's ILP on Hessian-trace-weighted weight error, each against
    bitplan's best frontier point no larger than the baseline's plan;
(d) the measured search's own overhead, ``(wall − evaluation) / wall`` (target <= 5 %),
    taken from the :class:`~bitplan.search.measured.SearchResult` of the search ``run_job`` runs.

Models: ``builtin:digits-cnn``, ``builtin:tiny-lm`` and ``tiny-llama`` (a 37-layer
LlamaForCausalLM built from a config and trained briefly, shared with
``benchmarks/sensitivity.py``). Each model also runs the rounding comparison of
:mod:`benchmarks.frontier_rounding` (RTN-only frontier vs frontier with rounding choices vs
uniform, at the sizes of int4-g128 and int3-g64). Run: ``python -m benchmarks.frontier``
(writes the "Frontier quality" and "Frontier with rounding choices" sections of
``benchmarks/RESULTS.md`` and ``docs/frontier.svg``); ``--rounding-only`` runs only the
rounding comparison; ``--quick`` runs both on tiny-llama only, barely trained, on a few
samples and formats: a smoke run.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # as a script its folder leads sys.path and benchmarks/sensitivity.py
    sys.path[0] = str(REPO_ROOT)  # would shadow the `sensitivity` package: use the root instead

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from unittest import mock  # noqa: E402

from benchmarks._common import RESULTS_PATH, machine_info, update_results_section  # noqa: E402
from benchmarks._frontier_points import best_within, pareto_holdout  # noqa: E402
from benchmarks._frontier_points import fmt as _fmt  # noqa: E402
from benchmarks._frontier_points import median as _median  # noqa: E402
from benchmarks._frontier_points import ratio as _ratio  # noqa: E402
from benchmarks.baselines import (  # noqa: E402
    greedy_promotion,
    hawq_table,
    hessian_traces,
    ilp_allocation,
)
from benchmarks.frontier_rounding import SECTION as ROUNDING_SECTION  # noqa: E402
from benchmarks.frontier_rounding import UNIFORM as ROUNDING_UNIFORM  # noqa: E402
from benchmarks.frontier_rounding import (  # noqa: E402
    RoundingResult,
    bench_rounding,
    render_rounding,
)
from benchmarks.sensitivity import Case, tiny_llama_case  # noqa: E402
from bitplan.search import pipeline  # noqa: E402
from bitplan.search.applier import PlanApplier  # noqa: E402
from bitplan.search.frontier import best_under, exact_frontier  # noqa: E402
from bitplan.search.measured import SearchResult, measured_search  # noqa: E402
from bitplan.search.plans import FrontierPoint  # noqa: E402
from bitplan.search.points import Choice  # noqa: E402
from bitplan.search.problem import build_problem  # noqa: E402
from bitplan.search.spec import JobSpec  # noqa: E402
from bitplan.sensitivity.analyzer import analyze  # noqa: E402
from bitplan.sensitivity.formats import parse_format  # noqa: E402
from bitplan.sensitivity.layers import parameter_bytes  # noqa: E402
from bitplan.sensitivity.metrics import collect_reference, measure  # noqa: E402
from bitplan.sensitivity.models import resolve_cache_dir  # noqa: E402

logger = logging.getLogger("benchmarks.frontier")

SECTION = "Frontier quality"
FORMATS = (
    "fp16",
    "int8",
    "int6-g128",
    "int5-g64",
    "int4-g128",
    "int4-g32",
    "int3-g64",
    "int2-g32-asym",
)
UNIFORM = ("int8", "int4-g128", "int4-g32", "int3-g64")
QUICK_FORMATS = ("int8", "int4-g128", "int2-g32-asym")
RATIO_TARGET = 0.5  # (a): the frontier at most halves a uniform format's error (the issue)
OVERHEAD_TARGET = 0.05  # (d): search bookkeeping at most 5 % of the search's wall time
TRIALS = 120  # per budget: enough for NSGA-II's 4 generations of 30 beyond the seeds
QUICK_TRIALS = 6
LLAMA_STEPS = 300  # the recipe benchmarks/sensitivity.py caches, so both share one model
QUICK_LLAMA_STEPS = 20  # what benchmarks/sensitivity.py --quick trains: one cached model
QUICK_SAMPLES = 24  # 18 calibration + 6 held-out rows: enough for every stage to run
# Hutchinson probes per batch (two batches): HAWQ-V3's traces rank layers, which a few probes
# already do; each probe is one double backward, the costliest step of --quick.
PROBES, QUICK_PROBES = 4, 1


@dataclass
class Baseline:
    """One baseline plan at one budget and bitplan's best point no larger than it."""

    name: str
    total_bytes: int
    error: float
    bitplan_bytes: int | None
    bitplan_error: float | None

    @property
    def ratio(self) -> float:
        return math.nan if self.bitplan_error is None else _ratio(self.bitplan_error, self.error)


@dataclass
class Comparison:
    """Everything measured at the budget of one uniform format on one model."""

    uniform: str
    uniform_bytes: int
    uniform_error: float
    best: FrontierPoint | None
    proxy_error: float
    refined_error: float
    baselines: list[Baseline]
    search: SearchResult

    @property
    def ratio(self) -> float:
        return (
            math.nan
            if self.best is None
            else _ratio(self.best.holdout["error"], self.uniform_error)
        )


@dataclass
class ModelResult:
    """One model: its comparisons plus every held-out point, for the plot."""

    name: str
    n_layers: int
    comparisons: list[Comparison] = field(default_factory=list)
    points: list[FrontierPoint] = field(default_factory=list)
    uniform: list[FrontierPoint] = field(default_factory=list)


_DEFAULT_METHOD = JobSpec.model_fields["method"].default


@contextmanager
def recorded_searches() -> Iterator[list[SearchResult]]:
    """The SearchResult of every measured search ``run_job`` runs inside the block.

    ``run_job`` keeps its search's timings to itself; wrapping the function it calls reads them
    from the real pipeline instead of from a re-implementation of it.
    """
    found: list[SearchResult] = []

    def recording(**kwargs: object) -> SearchResult:
        result = measured_search(**kwargs)
        found.append(result)
        return result

    with mock.patch.object(pipeline, "measured_search", recording):
        yield found


def bench_model(
    case: Case,
    *,
    formats: Sequence[str],
    uniform: Sequence[str],
    trials: int,
    probes: int,
    work_dir: Path,
    cache_dir: Path | None,
) -> ModelResult:
    """Sections (a)-(d) of the module docstring for one model."""
    base = JobSpec(
        model=case.ref,
        calib=case.calib,
        budget="1x",
        formats=list(formats),
        trials=trials,
        device="cpu",
        max_length=case.max_length,
        max_samples=case.max_samples,
    )
    model, calib, holdout = pipeline.load_inputs(base, cache_dir=cache_dir)
    unplanned, fp16 = parameter_bytes(model.module, model.layers)
    parsed = base.formats
    tables = {
        "bitplan": analyze(
            model,
            calib,
            method=base.method,
            formats=parsed,
            batch_size=base.batch_size,
            seed=base.seed,
            cache_dir=cache_dir,
        ),
        "aimet": analyze(
            model,
            calib,
            method="e2e",
            formats=parsed,
            batch_size=base.batch_size,
            seed=base.seed,
            cache_dir=cache_dir,
        ),
        "hawq": hawq_table(
            model, hessian_traces(model, calib, probes=probes, seed=base.seed), base.format_names
        ),
    }
    problems = {
        k: build_problem(t, model.layers, unplanned_bytes=unplanned, fp16_bytes=fp16)
        for k, t in tables.items()
    }
    problem = problems["bitplan"]
    frontier = exact_frontier(problem)
    result = ModelResult(name=case.name, n_layers=len(model.layers))
    with PlanApplier(model.module, model.layers, workdir=work_dir) as applier:
        reference = collect_reference(model, holdout, batch_size=base.batch_size)

        def held_out(choice: Choice) -> float:
            applier.apply(choice)
            return measure(model, holdout, reference)["error"]

        for fmt in uniform:
            cap = problem.cost(problem.uniform_choice(parse_format(fmt)))[0]
            spec = JobSpec(**{**base.to_dict(), "budget": f"{cap + unplanned}B"})
            logger.info("%s: budget of uniform %s, %d bytes", case.name, fmt, cap + unplanned)
            with recorded_searches() as searches:
                job = pipeline.run_job(
                    spec, out_dir=work_dir / f"{case.name}-{fmt}", cache_dir=cache_dir
                )
            same = next(p for p in job.uniform if p.source == f"uniform:{fmt}")
            refined = min(job.points, key=lambda p: p.calibration["error"])
            baselines = []
            for name, plan in (
                ("AIMET greedy", greedy_promotion(problems["aimet"], cap)),
                ("HAWQ-V3 ILP", ilp_allocation(problems["hawq"], cap)),
            ):
                size = problem.cost(plan)[0] + unplanned
                mine = best_within(job.points, size)
                baselines.append(
                    Baseline(
                        name=name,
                        total_bytes=size,
                        error=held_out(plan),
                        bitplan_bytes=None if mine is None else mine.total_bytes,
                        bitplan_error=None if mine is None else mine.holdout["error"],
                    )
                )
            result.comparisons.append(
                Comparison(
                    uniform=fmt,
                    uniform_bytes=same.total_bytes,
                    uniform_error=same.holdout["error"],
                    best=best_within(job.points, same.total_bytes),
                    proxy_error=held_out(best_under(frontier, cap).choice),
                    refined_error=refined.holdout["error"],
                    baselines=baselines,
                    search=searches[0],
                )
            )
            result.points += job.points
            result.uniform = job.uniform
    return result


def _overhead(search: SearchResult) -> float:
    return (search.wall_s - search.eval_s) / search.wall_s


def render(results: Sequence[ModelResult], *, trials: int, formats: Sequence[str]) -> str:
    """The markdown section: setup, the four tables, and which targets were met."""
    comps = [(r, c) for r in results for c in r.comparisons]
    lines = [
        f"Machine: {machine_info()}",
        "",
        f"Formats {', '.join(formats)}; sensitivity method `{_DEFAULT_METHOD}`; {trials} NSGA-II "
        "trials "
        "per budget; 25 % of the calibration data held out. Every error is the held-out "
        "`error` (KL divergence to the full-precision model); budget = the uniform format's "
        "total size.",
        "",
        f"**(a) Frontier vs uniform** (target ratio <= {RATIO_TARGET})",
        "",
        "| model | uniform | bytes | uniform error | frontier bytes | frontier error | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.name} | {c.uniform} | {c.uniform_bytes} | {_fmt(c.uniform_error)} | "
        f"{c.best.total_bytes if c.best else '–'} | "
        f"{_fmt(c.best.holdout['error'] if c.best else None)} | {_fmt(c.ratio)} |"
        for r, c in comps
    ]
    lines += [
        "",
        "**(b) Optuna-refined plan vs exact-proxy plan, same budget**",
        "",
        "| model | budget | proxy error | refined error | refined / proxy |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r.name} | {c.uniform} | {_fmt(c.proxy_error)} | {_fmt(c.refined_error)} | "
        f"{_fmt(_ratio(c.refined_error, c.proxy_error))} |"
        for r, c in comps
    ]
    lines += [
        "",
        "**(c) Baselines vs bitplan's best point no larger than the baseline's plan**",
        "",
        "| model | budget | baseline | bytes | error | bitplan bytes | bitplan error "
        "| bitplan / baseline |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.name} | {c.uniform} | {b.name} | {b.total_bytes} | {_fmt(b.error)} | "
        f"{b.bitplan_bytes or '–'} | {_fmt(b.bitplan_error)} | {_fmt(b.ratio)} |"
        for r, c in comps
        for b in c.baselines
    ]
    lines += [
        "",
        f"**(d) Search overhead outside model evaluation** (target <= {OVERHEAD_TARGET:.0%})",
        "",
        "| model | budget | trials | search wall s | evaluation s | overhead |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.name} | {c.uniform} | {len(c.search.trials)} | {c.search.wall_s:.2f} | "
        f"{c.search.eval_s:.2f} | {_overhead(c.search):.1%} |"
        for r, c in comps
    ]
    lines += ["", *summary(results)]
    return "\n".join(lines)


def summary(results: Sequence[ModelResult]) -> list[str]:
    """One line per target: met or not, with the numbers that decide it."""
    comps = [c for r in results for c in r.comparisons]
    ratios = [c.ratio for c in comps]
    met = sum(r <= RATIO_TARGET for r in ratios)
    gains = [_ratio(c.refined_error, c.proxy_error) for c in comps]
    wins = [b.ratio for c in comps for b in c.baselines]
    overheads = [_overhead(c.search) for c in comps]
    return [
        f"- (a) ratio <= {RATIO_TARGET} at {met} of {len(ratios)} budgets "
        f"(median {_fmt(_median(ratios))}, worst {_fmt(max(ratios))}).",
        f"- (b) refined / proxy held-out error: median {_fmt(_median(gains))}, "
        f"best {_fmt(min(gains))}, worst {_fmt(max(gains))} "
        f"(below 1 at {sum(g < 1 for g in gains)} of {len(gains)} budgets).",
        f"- (c) bitplan / baseline error at equal or smaller size: median {_fmt(_median(wins))}"
        f"; bitplan better at {sum(w < 1 for w in wins)} of {len(wins)} comparisons.",
        f"- (d) search overhead: worst {max(overheads):.1%}, target "
        f"{'met' if max(overheads) <= OVERHEAD_TARGET else 'missed'}.",
    ]


# Plot geometry in SVG user units: one 320 x 260 panel per model, margins for the axis labels.
_PANEL_W, _PANEL_H, _LEFT, _RIGHT, _TOP, _BOTTOM = 320, 260, 52, 12, 28, 40


def _panel(result: ModelResult, x0: float) -> list[str]:
    """One model: the frontier as a line, the uniform formats as labelled squares."""
    front = [
        (p.bpw, p.holdout["error"]) for p in pareto_holdout(result.points) if p.holdout["error"] > 0
    ]
    named = [(p, p.source.removeprefix("uniform:")) for p in result.uniform]
    uniform = [
        (p.bpw, p.holdout["error"], name)
        for p, name in named
        if p.holdout["error"] > 0 and parse_format(name).is_quantized
    ]
    xs = [x for x, _ in front] + [x for x, _, _ in uniform]
    logs = [math.log10(y) for _, y in front] + [math.log10(y) for _, y, _ in uniform]
    if not xs:
        return []
    x_lo, x_hi = math.floor(min(xs)), math.ceil(max(xs))
    y_lo, y_hi = math.floor(min(logs)), max(math.ceil(max(logs)), math.floor(min(logs)) + 1)
    w, h = _PANEL_W - _LEFT - _RIGHT, _PANEL_H - _TOP - _BOTTOM

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            x0 + _LEFT + (x - x_lo) / max(x_hi - x_lo, 1) * w,
            _TOP + (y_hi - math.log10(y)) / (y_hi - y_lo) * h,
        )

    out = [
        f'<text x="{x0 + _PANEL_W / 2}" y="16" text-anchor="middle" '
        f'font-weight="bold">{result.name}</text>',
        f'<rect x="{x0 + _LEFT}" y="{_TOP}" width="{w}" height="{h}" fill="none" stroke="#888"/>',
    ]
    for bpw in range(x_lo, x_hi + 1):
        x, _ = at(bpw, 10.0**y_lo)
        out.append(f'<text x="{x:.1f}" y="{_TOP + h + 14}" text-anchor="middle">{bpw}</text>')
    for decade in range(y_lo, y_hi + 1):
        _, y = at(x_lo, 10.0**decade)
        out.append(
            f'<text x="{x0 + _LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">1e{decade}</text>'
        )
    out.append(
        f'<text x="{x0 + _PANEL_W / 2}" y="{_PANEL_H - 6}" text-anchor="middle">'
        "bits per weight</text>"
    )
    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in (at(x, y) for x, y in front))
    out.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    out += [
        f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="#1f77b4"/>'
        for a, b in (at(x, y) for x, y in front)
    ]
    for x, y, name in uniform:
        a, b = at(x, y)
        out.append(
            f'<rect x="{a - 4:.1f}" y="{b - 4:.1f}" width="8" height="8" '
            f'fill="#d62728"/><text x="{a + 6:.1f}" y="{b - 6:.1f}">{name}</text>'
        )
    return out


def frontier_svg(results: Sequence[ModelResult]) -> str:
    """Held-out error (log scale) against bits per weight: frontier line, uniform squares."""
    width = _PANEL_W * max(len(results), 1)
    body = [part for i, r in enumerate(results) for part in _panel(r, i * _PANEL_W)]
    legend = (
        f'<text x="{width - 8}" y="{_PANEL_H + 14}" text-anchor="end" fill="#444">'
        "blue: bitplan frontier (held-out error) · red: uniform formats</text>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{_PANEL_H + 22}" font-family="sans-serif" font-size="11">\n'
        f'<rect width="100%" height="100%" fill="white"/>\n'
        + "\n".join([*body, legend])
        + "\n</svg>\n"
    )


@dataclass
class BenchRun:
    """What one invocation measured: the frontier comparisons and the rounding comparison
    (either list is empty when its part did not run)."""

    frontier: list[ModelResult]
    rounding: list[RoundingResult]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny-llama only, barely trained, few samples: a smoke run of both parts",
    )
    parser.add_argument(
        "--rounding-only",
        action="store_true",
        help=f"run only the rounding comparison (the {ROUNDING_SECTION!r} section)",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help=f"trials per budget (default {TRIALS}, --quick {QUICK_TRIALS})",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="markdown file to update (default benchmarks/RESULTS.md; "
        "--quick writes none unless given)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="SVG to write (default docs/frontier.svg; --quick: none unless given)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> BenchRun:
    args = _parser().parse_args(argv)
    trials = args.trials or (QUICK_TRIALS if args.quick else TRIALS)
    formats = QUICK_FORMATS if args.quick else FORMATS
    uniform = ("int4-g128",) if args.quick else UNIFORM
    run = BenchRun([], [])
    with tempfile.TemporaryDirectory(prefix="bench-frontier-") as tmp:
        work = Path(tmp)
        llama = tiny_llama_case(
            work,
            steps=QUICK_LLAMA_STEPS if args.quick else LLAMA_STEPS,
            max_samples=QUICK_SAMPLES if args.quick else None,
        )
        cases = (
            [llama]
            if args.quick
            else [
                Case("digits-cnn", "builtin:digits-cnn", "builtin"),
                Case("tiny-lm", "builtin:tiny-lm", "builtin"),
                llama,
            ]
        )
        for case in cases:
            if not args.rounding_only:
                logger.info("benchmarking %s", case.name)
                run.frontier.append(
                    bench_model(
                        case,
                        formats=formats,
                        uniform=uniform,
                        trials=trials,
                        probes=QUICK_PROBES if args.quick else PROBES,
                        work_dir=work,
                        cache_dir=resolve_cache_dir(),
                    )
                )
            logger.info("rounding comparison on %s", case.name)
            run.rounding.append(
                bench_rounding(
                    case,
                    formats=formats,
                    uniform=uniform if args.quick else ROUNDING_UNIFORM,
                    trials=trials,
                    work_dir=work,
                    warm_up=not args.quick,
                )
            )
    results_path = args.results or (None if args.quick else RESULTS_PATH)
    sections = [(ROUNDING_SECTION, render_rounding(run.rounding, trials=trials, formats=formats))]
    if run.frontier:
        sections.insert(0, (SECTION, render(run.frontier, trials=trials, formats=formats)))
    for title, markdown in sections:
        print(f"## {title}\n\n{markdown}\n")
        if results_path is not None:
            print(f"results written to {update_results_section(title, markdown, results_path)}")
    plot = args.plot or (None if args.quick else REPO_ROOT / "docs" / "frontier.svg")
    if run.frontier and plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_text(frontier_svg(run.frontier), encoding="utf-8")
        print(f"plot written to {plot}")
    return run


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
