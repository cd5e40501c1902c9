"""Distributed search: one job's measured search on 1 and on 2 worker processes, PostgreSQL.

Why: a job's search stage is its longest (every trial is a forward pass over the calibration
split), and the service lets idle workers join a running job's search (app/search_peers.py):
all of them ask and tell trials of one Optuna study on PostgreSQL (Optuna's distributed
mode), and the study stops at the job's total. This measures what that buys on this machine.

What runs: the job's sensitivity table is computed once; then the search stage runs twice on
fresh studies in a private schema of the PostgreSQL database at ``--url``, first with one worker
process, then with two (alternating, ``--rounds`` times), each with one torch thread
(``OMP_NUM_THREADS=1``). Each process runs :func:`bitplan.search.joined.join_search` (the model
loaded, the problem rebuilt from the table, trials on the shared study, a seed per process); the
first one is the job's own worker (``guided``: seeds and guided trials, as in a job), the second
one joins it with sampler trials, as an idle worker of the service does.

Reported per run: the search stage's wall time (first trial started to last trial finished,
from the study's own timestamps: model loading is not the search), the speedup, the mean
time of one trial (``t``) and the coordination cost per trial (``o``: each process's time
between trials, i.e. sampling, the admission query and the database round trips), and the
frontier quality: the held-out error of the best plan found (all plans fit the budget).

The model behind the projection: with ``n`` trials on ``N`` workers the stage takes
``T(N) = ceil(n / N) * (t + o(N))``, so ``speedup(N) = n (t + o(1)) / (ceil(n / N) (t + o(N)))``:
near ``N`` while ``o(N) << t`` and ``N << n``. ``o(N) = o(1) + c (N - 1)`` grows with the
number of workers because they share one database (the admission reads the study's trials, and
Optuna's RDB storage writes every parameter and value): ``c`` is fitted from the 1- and
2-worker runs. For a whole job, the serial stages (load, analyze, validate) bound the gain as
in Amdahl's law: ``1 / ((1 - p) + p / speedup(N))`` with ``p`` the search's share of the job.

Run: ``python -m benchmarks.distributed [--trials 32] [--url postgresql+psycopg://...]
[--quick]``; it prints a table and (without ``--quick``) writes the "Distributed search"
section of ``benchmarks/RESULTS.md``. Needs PostgreSQL (``docker compose -f
docker/compose.yaml up postgres``, or any server; the default is ``127.0.0.1:5432/test``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # as a script its folder leads sys.path and benchmarks/sensitivity.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # would shadow the package

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import create_engine, text

from benchmarks._common import machine_info, publish_report
from bitplan.search.applier import PlanApplier
from bitplan.search.budgets import parse_budget
from bitplan.search.frontier import planned_cap
from bitplan.search.joined import TABLE_FILE, join_search
from bitplan.search.measured import pareto_front, rdb_storage, search_space
from bitplan.search.pipeline import _Evaluator, analyze_spec, load_inputs
from bitplan.search.points import Point
from bitplan.search.problem import Problem, build_problem
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.fusion import fuse_layers
from bitplan.sensitivity.layers import parameter_bytes
from bitplan.sensitivity.table import read_table

logger = logging.getLogger(__name__)

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SECTION = "Distributed search"
PROJECTED_WORKERS = (8, 16, 32, 64)
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Run:
    """One search stage on ``workers`` processes, read back from its study."""

    workers: int
    trials: int
    wall_s: float  # first trial started to last trial finished
    trial_s: float  # mean duration of one complete trial (t)
    overhead_s: float  # per trial, each process's time between its trials (o)
    by_worker: dict[str, int]
    holdout_error: float  # of the best plan found

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@contextmanager
def private_schema(url: str) -> Iterator[str]:
    """A fresh schema for Optuna's tables in the database at ``url``, dropped afterwards."""
    name = f"bench_distributed_{uuid.uuid4().hex[:8]}"
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        scoped = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{name}"
        optuna.storages.RDBStorage(scoped).engine.dispose()  # Optuna's tables, created once
        yield scoped
    finally:
        with engine.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        engine.dispose()


def _join(argv: list[str]) -> None:
    """One worker process: ``--join URL STUDY SEED TABLE_DIR SPEC_JSON lead|join``."""
    import torch

    torch.set_num_threads(1)
    url, study, seed, table_dir, spec_json, lead = argv
    storage = rdb_storage(url)
    join_search(
        JobSpec(**json.loads(spec_json)),
        table_dir=Path(table_dir),
        storage=storage,
        study_name=study,
        seed=int(seed),
        guided=lead == "lead",  # the job's own worker: seeds and guided trials
    )
    storage.engine.dispose()


def _search(url: str, study: str, workers: int, table_dir: Path, spec: JobSpec) -> None:
    env = {**os.environ, **_ONE_THREAD}
    command = [sys.executable, "-m", "benchmarks.distributed", "--join", url, study]
    spec_json = json.dumps(spec.to_dict())
    procs = [
        subprocess.Popen(
            [*command, str(spec.seed + i), str(table_dir), spec_json, "join" if i else "lead"],
            env=env,
        )
        for i in range(workers)
    ]
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"a search process exited with {proc.returncode}")


def _points(trials: list[FrozenTrial], problem: Problem) -> list[Point]:
    """The complete trials as points: the choice each evaluated (repaired, if it was)."""
    options, _ = search_space(problem)
    by_name = {g: {f.name: f for f in fs} for g, fs in options.items()}
    points = []
    for t in trials:
        # pinned groups have one format; the free ones' are the params, repaired or not
        names = {g: fs[0].name for g, fs in options.items()} | t.params
        names |= t.user_attrs.get("repaired", {})
        points.append(
            Point(
                choice={g: by_name[g][n] for g, n in names.items()},
                planned_bytes=int(t.user_attrs["bytes"]),
                calibration={"error": float(t.values[1])},
                number=t.number,
            )
        )
    return points


def _read_run(
    url: str, study: str, workers: int, problem: Problem, cap: int, on_holdout: _Evaluator
) -> Run:
    trials = optuna.load_study(study_name=study, storage=url).get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,)
    )
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds()
    durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
    by_worker: dict[str, int] = {}
    for t in trials:
        by_worker[t.user_attrs["worker"]] = by_worker.get(t.user_attrs["worker"], 0) + 1
    best = pareto_front(_points(trials, problem), cap_bytes=cap)[-1]  # lowest error
    return Run(
        workers=workers,
        trials=len(trials),
        wall_s=wall,
        trial_s=sum(durations) / len(durations),
        overhead_s=max(0.0, (workers * wall - sum(durations)) / len(trials)),
        by_worker=by_worker,
        holdout_error=on_holdout(best.choice),
    )


def projection(rounds: list[tuple[Run, Run]], *, trials: int) -> list[tuple[int, float]]:
    """``(N, speedup)`` of the model in the module docstring, from the measured medians."""
    t = statistics.median(run.trial_s for pair in rounds for run in pair)
    o1 = statistics.median(one.overhead_s for one, _ in rounds)
    o2 = statistics.median(two.overhead_s for _, two in rounds)
    slope = max(0.0, o2 - o1)  # c: the cost per trial of one more worker

    def stage(workers: int) -> float:
        return math.ceil(trials / workers) * (t + o1 + slope * (workers - 1))

    return [(n, stage(1) / stage(n)) for n in PROJECTED_WORKERS]


def _markdown(
    rounds: list[tuple[Run, Run]], spec: JobSpec, projected: list[tuple[int, float]], load: float
) -> str:
    lines = [
        f"Machine: {machine_info()}; load average {load:.1f} on {os.cpu_count()} cores when the "
        "runs started: two one-thread workers get two cores only on an otherwise idle machine, "
        "and `t` and `o` carry the other processes' noise. The 1- and 2-worker runs alternate, "
        "so both see the same load.",
        "",
        f"`{spec.model}`, budget {spec.budget}, {spec.trials} trials, {spec.sampler}; each worker "
        "a process with one torch thread; Optuna's RDB study on PostgreSQL (a private schema).",
        "",
        "| round | workers | search wall (s) | speedup | trial t (s) | overhead o per trial (s) "
        "| trials per worker | best plan's held-out error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index, (one, two) in enumerate(rounds, start=1):
        for run in (one, two):
            share = ", ".join(str(v) for v in sorted(run.by_worker.values(), reverse=True))
            lines.append(
                f"| {index} | {run.workers} | {run.wall_s:.1f} | {one.wall_s / run.wall_s:.2f}x "
                f"| {run.trial_s:.3f} | {run.overhead_s:.3f} | {share} "
                f"| {run.holdout_error:.4g} |"
            )
    speedup = statistics.median(one.wall_s / two.wall_s for one, two in rounds)
    lines += [
        "",
        f"Median speedup of the search stage on 2 workers: **{speedup:.2f}x**.",
        "",
        "Model: `T(N) = ceil(n/N) * (t + o(N))`, `o(N) = o(1) + c (N - 1)` with `t`, `o(1)` and "
        "`o(2)` the medians above and `c = o(2) - o(1)`; `speedup(N) = T(1) / T(N)`. Projected "
        f"for this job (n = {spec.trials}) and for a job of 512 trials:",
        "",
        "| workers N | " + " | ".join(str(n) for n, _ in projected) + " |",
        "|---|" + "---|" * len(projected),
        "| speedup, n = " + f"{spec.trials} | "
        + " | ".join(f"{s:.1f}x" for _, s in projected) + " |",
        "| speedup, n = 512 | "
        + " | ".join(f"{s:.1f}x" for _, s in projection(rounds, trials=512)) + " |",
        "",
        "The search stage only: loading, analysis and validation run once, on the job's own "
        "worker (Amdahl: a job whose search is a share `p` of its time gains "
        "`1 / ((1 - p) + p / speedup)`). `c` is the database's share: every trial's admission "
        "reads the study's trials and Optuna writes each parameter, so past a few dozen workers "
        "the shared database, not the model, sets the pace. Frontier quality is the held-out "
        "error of the best plan each run found (all plans fit the budget); runs differ by their "
        "sampler seeds. Reproduce: `python -m benchmarks.distributed` (PostgreSQL at "
        "127.0.0.1:5432).",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--join"]:
        _join(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--model", default="builtin:tiny-lm")
    parser.add_argument("--budget", default="4bpw")
    parser.add_argument("--url", default=DEFAULT_URL, help="a PostgreSQL database (SQLAlchemy)")
    parser.add_argument("--rounds", type=int, default=3, help="1- and 2-worker runs, alternated")
    parser.add_argument("--quick", action="store_true", help="8 trials, results not recorded")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = JobSpec(
        model=args.model, budget=args.budget, trials=8 if args.quick else args.trials, device="cpu"
    )
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bitplan-distributed-") as folder:
        table_dir = Path(folder)
        analyze_spec(spec, out_dir=table_dir)
        model, _, holdout = load_inputs(spec)
        layers = fuse_layers(model.layers, spec.fuse)
        unplanned, fp16 = parameter_bytes(model.module, layers)
        problem = build_problem(
            read_table(table_dir / TABLE_FILE), layers, unplanned_bytes=unplanned, fp16_bytes=fp16
        )
        cap = planned_cap(problem, parse_budget(spec.budget))
        with (
            private_schema(args.url) as url,
            PlanApplier(model.module, layers, workdir=table_dir) as applier,
        ):
            on_holdout = _Evaluator(model, applier, holdout, batch_size=spec.batch_size)
            rounds = []
            for index in range(args.rounds):
                pair = []
                for workers in (1, 2):
                    study = f"round{index}-workers{workers}"
                    _search(url, study, workers, table_dir, spec)
                    pair.append(_read_run(url, study, workers, problem, cap, on_holdout))
                rounds.append((pair[0], pair[1]))
    projected = projection(rounds, trials=spec.trials)
    report = {
        "rounds": [[one.as_dict(), two.as_dict()] for one, two in rounds],
        "projection": projected,
    }
    publish_report(
        _markdown(rounds, spec, projected, load),
        report,
        section=SECTION,
        json_path=args.json,
        record=not args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
