"""``bitplan.analyze`` and ``bitplan.search``: the CLI's ``analyze`` and ``search`` as functions.

Both build the same :class:`~bitplan.search.spec.JobSpec` the CLI builds and call the same
pipeline (:func:`~bitplan.search.pipeline.analyze_spec`, :func:`~bitplan.search.pipeline.run_job`),
with the same sensitivity cache (``BITPLAN_CACHE_DIR``), so a script and the command line give
the same plans for the same arguments. Argument names are JobSpec's; defaults are JobSpec's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from bitplan._spec import (
    DEFAULT_EXCLUDE,
    DEFAULT_FORMATS,
    DEFAULT_FUSE,
    DEFAULT_PINS,
    DEFAULTS,
    PathLike,
    job_spec,
)
from bitplan.search.pipeline import JobResult, ScoreFn, UserMetric, analyze_spec, run_job
from bitplan.search.spec import ANALYZE_BUDGET
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.models import resolve_cache_dir
from bitplan.sensitivity.progress import ProgressFn

__all__ = ["analyze", "search"]

logger = logging.getLogger(__name__)


def analyze(
    *,
    model: PathLike,
    out_dir: PathLike,
    calib: PathLike = DEFAULTS.calib,
    task: str | None = DEFAULTS.task,
    formats: Sequence[str] | str = DEFAULT_FORMATS,
    method: str = DEFAULTS.method,
    exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
    pins: Mapping[str, str] = DEFAULT_PINS,
    seed: int = DEFAULTS.seed,
    holdout: float = DEFAULTS.holdout,
    max_length: int = DEFAULTS.max_length,
    max_samples: int | None = DEFAULTS.max_samples,
    batch_size: int = DEFAULTS.batch_size,
    device: str = DEFAULTS.device,
    progress: ProgressFn | None = None,
) -> pd.DataFrame:
    """Measure every layer's error in every format, like ``bitplan analyze``.

    Writes ``sensitivity.csv`` and ``layers.json`` into ``out_dir`` and returns the table: one
    row per (layer, format) with columns ``layer, param, format, error, numel, bytes, tie``.
    Tables are cached by (model, data, method, formats), so a second call is instant.

    ``model`` is ``builtin:<name>``, a Hugging Face folder or a ``.zip`` of one; ``calib`` is
    ``builtin`` or a ``.txt``/``.jsonl``/``.safetensors`` file (its held-out share, ``holdout``,
    is left out exactly as a search would leave it out); ``method`` is ``weight``, ``layer``,
    ``fisher`` or ``e2e``; ``formats`` a list of format names (or ``"int4-g128,int8"``);
    ``exclude`` fnmatch patterns of layers to leave unquantized; ``pins`` maps patterns to the
    format those layers must use; ``progress(stage, done, total)`` is called as work proceeds.
    Bad input raises :class:`~bitplan.sensitivity.errors.InputError` (a ``ValueError``).

    Example::

        table = bitplan.analyze(model="builtin:tiny-lm", out_dir="sens", method="fisher")
        table.pivot(index="layer", columns="format", values="error")
    """
    spec = job_spec(
        model=model,
        budget=ANALYZE_BUDGET,
        calib=calib,
        formats=formats,
        exclude=exclude,
        pins=pins,
        task=task,
        method=method,
        seed=seed,
        holdout=holdout,
        max_length=max_length,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
    )
    return analyze_spec(
        spec, out_dir=Path(out_dir), cache_dir=resolve_cache_dir(), progress=progress
    )


def search(
    *,
    model: PathLike,
    budget: str,
    out_dir: PathLike,
    metric: ScoreFn | None = None,
    holdout_metric: ScoreFn | None = None,
    higher_is_better: bool | None = None,
    calib: PathLike = DEFAULTS.calib,
    task: str | None = DEFAULTS.task,
    formats: Sequence[str] | str = DEFAULT_FORMATS,
    method: str = DEFAULTS.method,
    trials: int = DEFAULTS.trials,
    timeout: float | None = DEFAULTS.timeout,
    seed: int = DEFAULTS.seed,
    sampler: str = DEFAULTS.sampler,
    exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
    pins: Mapping[str, str] = DEFAULT_PINS,
    fuse: Sequence[str] | str = DEFAULT_FUSE,
    holdout: float = DEFAULTS.holdout,
    max_length: int = DEFAULTS.max_length,
    max_samples: int | None = DEFAULTS.max_samples,
    batch_size: int = DEFAULTS.batch_size,
    device: str = DEFAULTS.device,
    progress: ProgressFn | None = None,
) -> JobResult:
    """Find the size/quality Pareto frontier under ``budget``, like ``bitplan search``.

    Runs sensitivity → exact proxy frontier → measured Optuna search (``trials`` plans,
    ``timeout`` seconds at most) → every frontier point re-measured on held-out data, and writes
    ``frontier.json``, ``frontier.csv``, ``plans/*.json``, ``sensitivity.csv`` and
    ``layers.json`` into ``out_dir``, and the best plan under the budget (lowest calibration
    error) also as ``plans/best.json``. Returns the job's result: ``.frontier`` is the frontier
    file written (a :class:`Frontier`: its ``points``, smallest first, and ``uniform``
    baselines, each with ``plan_id``, ``total_bytes``, ``bpw``, ``metrics`` and ``plan``, the
    plan file's path within ``out_dir``), ``.best_plan_id``, ``.interrupted`` (the search
    stopped early) and ``.budget_note`` (set when the budget constrains nothing).
    ``budget`` is ``4.5bpw``, ``60MB``/``58MiB``, or ``0.3x`` of the fp16 size; the other
    arguments are :func:`analyze`'s and the CLI's (``sampler``: ``nsga2`` or ``tpe``).
    ``fuse`` names fusion rules whose layers must take one format, as a runtime that fuses them
    needs: ``qkv`` (the q/k/v projections of one attention module) and ``gate_up`` (an MLP's
    gate and up projections), e.g. ``fuse="qkv,gate_up"``; each keeps its own bytes.

    **Your own metric.** By default quality is bitplan's task metric against the full-precision
    model (KL for classifiers and LMs, 1 − cosine for embeddings, relative MSE otherwise).
    ``metric`` replaces it: a callable that takes the model (a ``torch.nn.Module``, on
    ``device``, with the plan's layers quantized in place) and returns a float, e.g. accuracy on
    your own data or a sentence-transformers evaluator's score (for a Hugging Face folder the
    module is the transformers model, e.g. ``BertModel``: put it into your
    ``SentenceTransformer`` with ``st[0].auto_model = model``). It is called once on the
    full-precision model, then once per plan the search measures, under ``torch.no_grad()``;
    it must not change the model. ``holdout_metric`` scores the final frontier and the uniform
    baselines for the held-out figures: give it data ``metric`` never sees (by default it is
    ``metric`` itself, and the held-out figures are the search's own). ``higher_is_better``
    (default True) says which way the metric improves.

    The search still minimises an error relative to the full-precision model:
    ``reference − score`` (``score − reference`` when lower is better), not clipped, so a plan
    that scores above full precision has a negative error. Each point's ``metrics`` then hold
    ``error``, ``metric`` (its score) and ``metric_ref`` (the full-precision score) for the
    ``calibration`` and ``holdout`` splits. The sensitivity analysis (``method``) and its
    ``calib`` data stay bitplan's: they only seed the search.

    Bad input (an infeasible budget among it, before anything is measured) and a metric that
    raises or returns anything but a finite number raise
    :class:`~bitplan.sensitivity.errors.InputError`. A Ctrl-C during the search keeps every
    finished trial: the frontier found so far is validated, written and returned.

    Example::

        def accuracy(model: torch.nn.Module) -> float:
            logits = model(pixel_values=images)
            return (logits.argmax(-1) == labels).float().mean().item()

        result = bitplan.search(
            model="builtin:digits-cnn", budget="4bpw", out_dir="job", metric=accuracy
        )
        for point in result.frontier.points:
            print(point.plan_id, point.bpw, point.metrics["holdout"]["metric"])
        plan = bitplan.load_plan(path="job/plans/best.json")
    """
    user = _user_metric(metric, holdout_metric, higher_is_better)
    spec = job_spec(
        model=model,
        budget=budget,
        calib=calib,
        formats=formats,
        exclude=exclude,
        pins=pins,
        fuse=fuse,
        task=task,
        method=method,
        trials=trials,
        timeout=timeout,
        seed=seed,
        sampler=sampler,
        holdout=holdout,
        max_length=max_length,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
    )
    result = run_job(
        spec, out_dir=Path(out_dir), cache_dir=resolve_cache_dir(), progress=progress, metric=user
    )
    if result.interrupted:
        logger.warning("the search stopped early: the frontier holds the trials that finished")
    return result


def _user_metric(
    metric: ScoreFn | None, holdout_metric: ScoreFn | None, higher_is_better: bool | None
) -> UserMetric | None:
    """The pipeline's :class:`UserMetric`, or None for the built-in metrics; rejects
    arguments that would be silently ignored."""
    if metric is None:
        given = {"holdout_metric": holdout_metric, "higher_is_better": higher_is_better}
        stray = [name for name, value in given.items() if value is not None]
        if stray:
            raise InputError(
                f"{stray[0]} only applies to a user metric: pass metric= too (the score the "
                f"search optimises), or drop {stray[0]}"
            )
        return None
    for name, fn in (("metric", metric), ("holdout_metric", holdout_metric)):
        if fn is not None and not callable(fn):
            raise InputError(
                f"{name} must be a callable that takes the model (a torch.nn.Module) and "
                f"returns a float; got {type(fn).__name__}"
            )
    if holdout_metric is None:
        logger.info("no holdout_metric: the held-out figures are the metric's own scores")
    return UserMetric(
        calibration=metric,
        holdout=metric if holdout_metric is None else holdout_metric,
        higher_is_better=True if higher_is_better is None else higher_is_better,
    )
