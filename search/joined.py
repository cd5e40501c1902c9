"""Join a running job's measured search from another process: more trials, same study.

One job's search stage is its longest (DESIGN §7: every trial is a forward pass over the
calibration split). Optuna's distributed mode lets any number of processes ask and tell trials
of one RDB study; :func:`bitplan.search.measured.measured_search` on a shared storage counts the
study's trials across processes and stops at the job's total. This module is what a second
process runs to take part: it rebuilds exactly the problem the job's own process searches from
the job's sensitivity table (``sensitivity.csv``, already written by the analyze stage: no
re-analysis), loads the same model and data split (same spec, same seed), measures the same
error on the calibration split, and runs sampler trials on the study under its own seed.

The job's process keeps the parts that need one owner: seeds and guided trials (it enqueues
them; any process may run them), validation on the held-out split and the artifacts. A joining
process writes nothing but trials.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import optuna

from bitplan.search.applier import PlanApplier
from bitplan.search.budgets import parse_budget
from bitplan.search.frontier import exact_frontier, planned_cap
from bitplan.search.measured import measured_search, search_space
from bitplan.search.pipeline import _Evaluator, load_inputs
from bitplan.search.problem import build_problem
from bitplan.search.proxy_fit import proxy_table
from bitplan.search.seeding import dense_seeds
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.analyzer import rounder_for
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.fusion import fuse_layers
from bitplan.sensitivity.layers import parameter_bytes
from bitplan.sensitivity.progress import CancelFn
from bitplan.sensitivity.rounder import needs_data
from bitplan.sensitivity.table import read_table

__all__ = ["join_search"]

logger = logging.getLogger(__name__)

TABLE_FILE = "sensitivity.csv"


def join_search(
    spec: JobSpec,
    *,
    table_dir: Path,
    storage: str | optuna.storages.BaseStorage,
    study_name: str,
    seed: int,
    cache_dir: Path | None = None,
    should_cancel: CancelFn | None = None,
    guided: bool = False,
) -> int:
    """Run trials of the job's study ``study_name`` until it holds ``spec.trials`` complete
    trials, ``should_cancel()`` turns true or ``spec.timeout`` passes; returns how many trials
    this call measured. ``table_dir`` holds the job's ``sensitivity.csv``; ``seed`` should
    differ from every other process's on the study (or they sample the same choices). With
    ``guided`` this process also enqueues the job's seeds and guided trials, as the job's own
    worker does (:mod:`bitplan.search.guided`); one process per study should."""
    table_path = table_dir / TABLE_FILE
    if not table_path.is_file():
        raise InputError(f"no sensitivity table to join the search from ({TABLE_FILE} missing)")
    model, calib, _ = load_inputs(spec, cache_dir=cache_dir)
    layers = fuse_layers(model.layers, spec.fuse)
    unplanned, fp16 = parameter_bytes(model.module, layers)
    problem = build_problem(
        read_table(table_path), layers, unplanned_bytes=unplanned, fp16_bytes=fp16
    )
    cap = planned_cap(problem, parse_budget(spec.budget))
    options, group_bytes = search_space(problem)
    seeds = dense_seeds(problem, exact_frontier(problem), cap, spec.formats) if guided else []
    with tempfile.TemporaryDirectory(prefix="bitplan-join-") as work:
        rounder = (
            rounder_for(
                model,
                calib,
                batch_size=spec.batch_size,
                workdir=Path(work),
                should_cancel=should_cancel,
            )
            if needs_data(spec.options)
            else None
        )
        with PlanApplier(model.module, layers, workdir=Path(work), rounder=rounder) as applier:
            on_calib = _Evaluator(model, applier, calib, batch_size=spec.batch_size)
            result = measured_search(
                options=options,
                group_bytes=group_bytes,
                cap_bytes=cap,
                evaluate=on_calib,
                seeds=seeds,
                proxy=proxy_table(problem) if guided else None,
                trials=spec.trials,
                timeout=spec.timeout,
                seed=seed,
                sampler=spec.sampler,
                storage=storage,
                study_name=study_name,
                should_cancel=should_cancel,
            )
    measured = len(on_calib.metrics)
    logger.info(
        "joined study %s: %d of its %d trials measured here",
        study_name, measured, len(result.trials),
    )  # fmt: skip
    return measured
