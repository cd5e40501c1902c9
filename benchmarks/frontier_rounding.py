"""Frontier with rounding choices: what letting each layer pick its rounding buys, at equal bytes.

Why: GPTQ (Frantar et al. 2022, arXiv:2210.17323), AWQ (Lin et al. 2023, arXiv:2306.00978) and
HQQ (Badri & Shaji 2023) only choose other integers and scales in the same storage layout as
round-to-nearest (RTN), so a layer's rounding is a planning choice that costs no bytes. Issue
11 asks whether planning it pays: per model and per uniform reference ``U`` (``int4-g128``,
``int3-g64``) the budget is ``U``'s total size, and on the held-out split this records

- uniform ``U`` (RTN) and uniform ``U`` with GPTQ everywhere (what rounding alone gives);
- the RTN-only frontier's best error at ``U``'s size or smaller (``rounding=["rtn"]``);
- the frontier with ``rounding=["rtn", "gptq", "awq", "hqq"]`` at the same size;
- with-rounding / RTN-only (target <= 0.5 on the LMs) and with-rounding / uniform (<= 0.3);
- each job's CPU time per stage from its progress reports, and the rounding's cost in
  forward-equivalents (one full-precision forward over the calibration split).

Every job runs through :func:`bitplan.search.pipeline.run_job` with the sensitivity cache off,
so the sensitivity stage includes the statistics pass and every rounding it scores. The GPTQ
row is measured beside the jobs with the same rounder and applier the pipeline uses. Run:
``python -m benchmarks.frontier --rounding-only`` (``--quick`` makes it a smoke run).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._common import machine_info
from benchmarks._frontier_points import best_within, fmt, ratio
from benchmarks.sensitivity import Case, forward_pass
from bitplan.search import pipeline
from bitplan.search.applier import PlanApplier
from bitplan.search.plans import FrontierPoint, read_plan
from bitplan.search.problem import build_problem
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.analyzer import analyze, rounder_for
from bitplan.sensitivity.data import CalibData
from bitplan.sensitivity.format_spec import ROUNDINGS
from bitplan.sensitivity.formats import parse_format
from bitplan.sensitivity.fusion import fuse_layers
from bitplan.sensitivity.layers import parameter_bytes
from bitplan.sensitivity.metrics import collect_reference, measure
from bitplan.sensitivity.models import LoadedModel

__all__ = [
    "SECTION",
    "UNIFORM",
    "JobRun",
    "Measured",
    "RoundingComparison",
    "RoundingResult",
    "StageClock",
    "bench_rounding",
    "render_rounding",
]

logger = logging.getLogger("benchmarks.frontier")

SECTION = "Frontier with rounding choices"
UNIFORM = ("int4-g128", "int3-g64")  # the sizes issue 11 names
VS_RTN_TARGET = 0.5  # with-rounding error at most half the RTN-only frontier's (issue 11)
VS_UNIFORM_TARGET = 0.3  # ... and at most 0.3x the uniform plan's, on the LMs
# Progress stages of run_job, bucketed as the issue reports time: the statistics pass of the
# data-aware roundings sends no report of its own and falls between "load" and "analyze".
_BUCKETS = {
    "load": "load",
    "collect": "sensitivity",
    "analyze": "sensitivity",
    "frontier": "search",
    "reference": "search",
    "search": "search",
    "validate": "validation",
}
STAGES = ("load", "sensitivity", "search", "validation")


class StageClock:
    """A progress callback that remembers when each stage last reported, by ``now`` (this
    process's CPU seconds by default: other work on a shared machine barely changes them).

    A stage's time runs from the previous stage's last report to its own last report; the
    validation stage runs to :meth:`stop` (the uniform baselines and the files come after its
    last report). A stage that never reports (a cached table) takes no time.
    """

    def __init__(self, *, now: Callable[[], float] = time.process_time) -> None:
        self.now = now
        self.start = now()
        self.last: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bucket = _BUCKETS.get(stage)
        if bucket is not None:
            self.last[bucket] = self.now()

    def stop(self) -> dict[str, float]:
        """Seconds per stage of :data:`STAGES`, the job having just returned."""
        end = self.now()
        out, before = {}, self.start
        for stage in STAGES:
            until = end if stage == STAGES[-1] else self.last.get(stage, before)
            out[stage] = max(until - before, 0.0)
            before = max(until, before)
        return out


@dataclass(frozen=True)
class Measured:
    """One plan's size and held-out figures (perplexity for language models, else None)."""

    total_bytes: int
    error: float
    perplexity: float | None

    @classmethod
    def of(cls, point: FrontierPoint) -> Measured:
        return cls(point.total_bytes, point.holdout["error"], point.holdout.get("perplexity"))


@dataclass
class JobRun:
    """One ``run_job`` at a budget: its best point within the budget, which rounding the best
    point's layers chose, its CPU seconds per stage and its wall-clock seconds."""

    rounding: list[str]
    best: Measured | None
    uniform: Measured | None
    roundings_used: dict[str, int]
    stages: dict[str, float]
    wall_s: float

    @property
    def seconds(self) -> float:
        return sum(self.stages.values())


@dataclass
class RoundingComparison:
    """Everything measured at the size of one uniform format on one model."""

    uniform: str
    budget_bytes: int
    uniform_gptq: Measured
    rtn_only: JobRun
    rounded: JobRun

    @property
    def uniform_rtn(self) -> Measured | None:
        return self.rtn_only.uniform

    @property
    def vs_rtn(self) -> float | None:
        if self.rounded.best is None or self.rtn_only.best is None:
            return None
        return ratio(self.rounded.best.error, self.rtn_only.best.error)

    @property
    def vs_uniform(self) -> float | None:
        if self.rounded.best is None or self.uniform_rtn is None:
            return None
        return ratio(self.rounded.best.error, self.uniform_rtn.error)


@dataclass
class RoundingResult:
    """One model: its size, the CPU seconds of one forward and of the statistics pass, and its
    comparisons."""

    name: str
    is_lm: bool
    planned_weights: int
    forward_s: float
    stats_s: float
    perplexity_ref: float | None
    comparisons: list[RoundingComparison] = field(default_factory=list)


def _run(spec: JobSpec, *, uniform: str, cap: int, out_dir: Path) -> JobRun:
    """``spec`` through the pipeline, sensitivity cache off, timed per stage."""
    clock, start = StageClock(), time.perf_counter()
    job = pipeline.run_job(spec, out_dir=out_dir, cache_dir=None, progress=clock)
    stages, wall_s = clock.stop(), time.perf_counter() - start
    best = best_within(job.points, cap)
    used: Counter[str] = Counter()
    if best is not None:
        used.update(layer.rounding for layer in read_plan(job.out_dir / best.plan).layers)
    same = next((p for p in job.uniform if p.source == f"uniform:{uniform}"), None)
    return JobRun(
        rounding=list(spec.rounding),
        best=None if best is None else Measured.of(best),
        uniform=None if same is None else Measured.of(same),
        roundings_used=dict(used),
        stages=stages,
        wall_s=wall_s,
    )


def forward_cpu_s(model: LoadedModel, calib: CalibData, *, batch_size: int) -> float:
    """CPU seconds of one full-precision pass over ``calib``: median of 3 after a warm-up."""
    forward_pass(model, calib, batch_size=batch_size)
    runs = []
    for _ in range(3):
        start = time.process_time()
        forward_pass(model, calib, batch_size=batch_size)
        runs.append(time.process_time() - start)
    return statistics.median(runs)


def bench_rounding(
    case: Case,
    *,
    formats: Sequence[str],
    uniform: Sequence[str] = UNIFORM,
    trials: int,
    work_dir: Path,
    warm_up: bool = True,
) -> RoundingResult:
    """The comparisons of the module docstring for one model (``warm_up``: run one untimed
    short job first, for times that do not carry one-off costs; a smoke run skips it)."""
    base = JobSpec(
        model=case.ref,
        calib=case.calib,
        budget="1x",
        formats=list(formats),
        rounding=["rtn"],
        trials=trials,
        device="cpu",
        max_length=case.max_length,
        max_samples=case.max_samples,
    )
    model, calib, holdout = pipeline.load_inputs(base)
    layers = fuse_layers(model.layers, base.fuse)  # as run_job groups them
    unplanned, fp16 = parameter_bytes(model.module, layers)
    forward_s = forward_cpu_s(model, calib, batch_size=base.batch_size)
    stats_dir = work_dir / f"{case.name}-rounding-stats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    start = time.process_time()
    rounder = rounder_for(model, calib, batch_size=base.batch_size, workdir=stats_dir)
    stats_s = time.process_time() - start
    options = [parse_format(u).with_rounding(r) for u in uniform for r in ("rtn", "gptq")]
    # The weight method needs no data pass; the table only lays out groups and bytes here.
    table = analyze(model, calib, method="weight", formats=options, rounder=rounder)
    problem = build_problem(table, layers, unplanned_bytes=unplanned, fp16_bytes=fp16)
    refs: dict[str, tuple[int, Measured]] = {}
    with PlanApplier(model.module, layers, workdir=stats_dir, rounder=rounder) as applier:
        reference = collect_reference(model, holdout, batch_size=base.batch_size)
        for u in uniform:
            rtn, gptq = (problem.uniform_choice(f) for f in options if f.base_name == u)
            if rtn is None or gptq is None:
                raise ValueError(f"{case.name}: some layer cannot take uniform {u}")
            cap = problem.cost(rtn)[0] + unplanned
            applier.apply(gptq)
            scores = measure(model, holdout, reference, batch_size=base.batch_size)
            refs[u] = (cap, Measured(cap, scores["error"], scores.get("perplexity")))
    result = RoundingResult(
        name=case.name,
        is_lm=reference.baseline.get("perplexity_ref") is not None,
        planned_weights=problem.planned_numel,
        forward_s=forward_s,
        stats_s=stats_s,
        perplexity_ref=reference.baseline.get("perplexity_ref"),
    )
    # One untimed short job first: the first job of a process pays one-off costs (imports,
    # kernel and allocator warm-up) that would otherwise land on whichever job runs first.
    if warm_up:
        warm = {"budget": f"{refs[uniform[0]][0]}B", "rounding": list(ROUNDINGS), "trials": 2}
        pipeline.run_job(
            JobSpec(**{**base.to_dict(), **warm}),
            out_dir=work_dir / f"{case.name}-warm-up",
            cache_dir=None,
        )
    for u in uniform:
        cap, gptq_row = refs[u]
        logger.info("%s: rounding comparison at uniform %s, %d bytes", case.name, u, cap)
        runs = [
            _run(
                JobSpec(**{**base.to_dict(), "budget": f"{cap}B", "rounding": rounding}),
                uniform=u,
                cap=cap,
                out_dir=work_dir / f"{case.name}-{u}-{'+'.join(rounding)}",
            )
            for rounding in (["rtn"], list(ROUNDINGS))
        ]
        result.comparisons.append(RoundingComparison(u, cap, gptq_row, *runs))
    return result


def _ppl(m: Measured | None) -> str:
    return fmt(None if m is None else m.perplexity)


def _err(m: Measured | None) -> str:
    return fmt(None if m is None else m.error)


def _used(run: JobRun) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(run.roundings_used.items())) or "–"


def render_rounding(
    results: Sequence[RoundingResult], *, trials: int, formats: Sequence[str]
) -> str:
    """The markdown section: setup, errors, perplexities, times, cost, and the verdicts."""
    comps = [(r, c) for r in results for c in r.comparisons]
    lines = [
        f"Machine: {machine_info()}",
        "",
        f"Formats {', '.join(formats)}; RTN-only jobs plan those formats, with-rounding jobs "
        f"plan every int format once per rounding ({', '.join(ROUNDINGS)}; same bytes). "
        f"Sensitivity method `{JobSpec.model_fields['method'].default}`, {trials} NSGA-II "
        "trials per job, 25 % of the calibration data held out, sensitivity cache off. Error = "
        "held-out KL divergence to the full-precision model; frontier = the lowest held-out "
        "error among a job's frontier points no larger than the budget (the uniform format's "
        "total bytes). Reproduce: `python -m benchmarks.frontier --rounding-only "
        f"--trials {trials}`. Times are this process's CPU seconds (all its threads), which other "
        "work on a shared machine barely changes, plus each job's wall clock; the 1-minute "
        f"load average was {os.getloadavg()[0]:.1f} when this was written.",
        "",
        f"**Held-out error at equal bytes** (targets on the LMs: with rounding / RTN-only <= "
        f"{VS_RTN_TARGET}, with rounding / uniform <= {VS_UNIFORM_TARGET})",
        "",
        "| model | size | bytes | uniform | uniform gptq | RTN-only frontier | with rounding "
        "| / RTN-only | / uniform | roundings of that plan |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r.name} | {c.uniform} | {c.budget_bytes} | {_err(c.uniform_rtn)} | "
        f"{_err(c.uniform_gptq)} | {_err(c.rtn_only.best)} | {_err(c.rounded.best)} | "
        f"{fmt(c.vs_rtn)} | {fmt(c.vs_uniform)} | {_used(c.rounded)} |"
        for r, c in comps
    ]
    lms = [(r, c) for r, c in comps if r.is_lm]
    if lms:
        lines += [
            "",
            "**Held-out perplexity of the same plans** (language models)",
            "",
            "| model | size | full precision | uniform | uniform gptq | RTN-only frontier "
            "| with rounding |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.name} | {c.uniform} | {fmt(r.perplexity_ref)} | {_ppl(c.uniform_rtn)} | "
            f"{_ppl(c.uniform_gptq)} | {_ppl(c.rtn_only.best)} | {_ppl(c.rounded.best)} |"
            for r, c in lms
        ]
    lines += [
        "",
        "**Time per stage, CPU seconds** (sensitivity includes the statistics pass; "
        "validation includes the uniform baselines and writing the plans)",
        "",
        f"| model | size | rounding | {' | '.join(STAGES)} | total | wall s |",
        "|---|---|---|" + "---:|" * (len(STAGES) + 2),
    ]
    lines += [
        f"| {r.name} | {c.uniform} | {'+'.join(run.rounding)} | "
        + " | ".join(f"{run.stages[s]:.1f}" for s in STAGES)
        + f" | {run.seconds:.1f} | {run.wall_s:.1f} |"
        for r, c in comps
        for run in (c.rtn_only, c.rounded)
    ]
    lines += ["", *_cost_table(results), "", *rounding_summary(results)]
    return "\n".join(lines)


def _extra_fe(r: RoundingResult, key: str) -> list[float]:
    """CPU seconds the with-rounding jobs spent beyond the RTN-only ones, in forward-equivalents."""
    if key == "total":
        return [(c.rounded.seconds - c.rtn_only.seconds) / r.forward_s for c in r.comparisons]
    return [(c.rounded.stages[key] - c.rtn_only.stages[key]) / r.forward_s for c in r.comparisons]


def _cost_table(results: Sequence[RoundingResult]) -> list[str]:
    sizes = " / ".join(c.uniform for c in results[0].comparisons) if results else ""
    lines = [
        "**Cost of rounding in forward-equivalents (FE)** (FE = CPU seconds / CPU seconds of "
        "one full-precision forward over the calibration split, median of 3; extra = "
        f"with-rounding job minus RTN-only job, per size: {sizes})",
        "",
        "| model | planned weights | forward CPU ms | statistics pass FE | extra sensitivity FE "
        "| extra search FE | extra job FE |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = [
            " / ".join(f"{x:.0f}" for x in _extra_fe(r, key))
            for key in ("sensitivity", "search", "total")
        ]
        lines.append(
            f"| {r.name} | {r.planned_weights} | {r.forward_s * 1000:.1f} | "
            f"{r.stats_s / r.forward_s:.1f} | {' | '.join(cells)} |"
        )
    return lines


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "no plan within the budget"
    if value <= target:
        return f"{value:.3g} (met)"
    return f"{value:.3g} (missed: {value / target:.3g}x the target)"


def rounding_summary(results: Sequence[RoundingResult]) -> list[str]:
    """Per LM and size, whether each target was met and by how much it was missed; then the
    largest model rounding ran on, its cost, and where it fell short."""
    out, short = [], []
    for r in results:
        for c in r.comparisons:
            if r.is_lm:
                short += [
                    f"{r.name} at {c.uniform} (with rounding / {name} {fmt(value)} > {target})"
                    for name, value, target in (
                        ("RTN-only", c.vs_rtn, VS_RTN_TARGET),
                        ("uniform", c.vs_uniform, VS_UNIFORM_TARGET),
                    )
                    if value is None or value > target
                ]
                vs_rtn = _verdict(c.vs_rtn, VS_RTN_TARGET)
                vs_uniform = _verdict(c.vs_uniform, VS_UNIFORM_TARGET)
            else:  # the issue sets the targets on the language models only
                vs_rtn = f"{fmt(c.vs_rtn)} (no target)"
                vs_uniform = f"{fmt(c.vs_uniform)} (no target)"
            out.append(
                f"- {r.name} at {c.uniform}: with rounding / RTN-only {vs_rtn}; "
                f"with rounding / uniform {vs_uniform}."
            )
    if results:
        big = max(results, key=lambda r: r.planned_weights)
        extra = ", ".join(
            f"{fe:.0f} FE at {c.uniform}"
            for c, fe in zip(big.comparisons, _extra_fe(big, "total"), strict=True)
        )
        out.append(
            f"- Largest model rounding ran on here: {big.name}, {big.planned_weights} planned "
            f"weights; its statistics pass cost {big.stats_s / big.forward_s:.1f} FE, and a "
            f"with-rounding job took, beyond the RTN-only job: {extra}."
        )
    out.append(
        "- Fell short of a target: "
        + ("; ".join(short) if short else "nowhere on the language models at these sizes")
        + "."
    )
    return out
