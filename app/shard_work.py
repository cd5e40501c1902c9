"""Computing sensitivity shards: the job's worker and idle workers split one table.

Both sides run the same step (:func:`_compute`): score the claimed shards' layers with
:func:`bitplan.sensitivity.analyzer.analyze` (``layers=``: the method's full data passes, the
per-layer scoring of these layers only), then, for each shard, renew its lease (a fence: a
worker that lost the shard writes nothing), write its table into the job's staging folder
(:func:`bitplan.sensitivity.shards.write_shard_table`, atomic) and mark it done. A thread
renews the leases every heartbeat meanwhile (:class:`_Leased`); the work stops between layers
and batches once they cannot be renewed.

* **The job's worker** (:class:`ShardedSensitivity`, the pipeline's table step) looks in the
  table cache first, then opens the shards (rows of :mod:`bitplan.app.sensitivity_shards`) and
  works through them with the model it already holds: one shard first, then every shard that
  nobody took meanwhile in one analysis (no idle worker came: one more data pass, not one per
  shard). It waits for the rest, taking over any whose lease runs out, merges the tables in
  the unsplit table's row order (computing here any table that is missing), closes the shards
  and stores the merged table in the cache like one it computed alone.
* **An idle worker** (:func:`take_sensitivity_shards`) claims a shard, loads the job's model
  and calibration split as the job did (:func:`bitplan.search.pipeline.load_inputs`, same
  spec, same seed), reads the job's rounding statistics from its staging folder (the integers
  that the job measures), and keeps taking shards of that job while there are free ones.

Why this gives the unsplit table: every method scores a layer from the full model's outputs or
inputs on the same batches (fisher's sampled labels come from one seeded generator per pass),
and a shard holds whole tie groups, whose score is split over their members. The staging folder
must be shared by the workers (the artifact folder of docker/compose.yaml is).
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd
from sqlalchemy import Engine

from bitplan.app.db import is_transient, retry_transient
from bitplan.app.queue import ClaimedJob
from bitplan.app.search_peers import staging_dir
from bitplan.app.sensitivity_shards import (
    ClaimedShard,
    claim_shards,
    close_shards,
    finish_shard,
    open_shards,
    release_shards,
    renew_shards,
    shards_done,
)
from bitplan.app.settings import Settings
from bitplan.app.states import JobKind
from bitplan.search.pipeline import load_inputs
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.analyzer import analyze, table_key
from bitplan.sensitivity.data import CalibData
from bitplan.sensitivity.format_spec import QuantFormat, parse_formats
from bitplan.sensitivity.fusion import fuse_layers
from bitplan.sensitivity.layers import QuantLayer
from bitplan.sensitivity.lazy_hf import SkeletonModel
from bitplan.sensitivity.models import LoadedModel
from bitplan.sensitivity.progress import CancelFn, Cancelled, ProgressFn, check_cancel, report
from bitplan.sensitivity.rounder import Rounder, needs_data
from bitplan.sensitivity.shards import (
    merge_tables,
    read_shard_table,
    split_layers,
    write_shard_table,
)
from bitplan.sensitivity.table import load_cached, store_cached

__all__ = ["SHARD_FOLDER", "ShardedSensitivity", "take_sensitivity_shards"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The folder inside a job's staging folder that the shards' tables meet in; removed after the
# merge, so nothing of it is published.
SHARD_FOLDER = "sensitivity-shards"
# Tries of one shard write (renew, finish) while the database says "not now": a few seconds.
_DB_ATTEMPTS = 4


@dataclass(frozen=True)
class _Analysis:
    """What every shard of one table is computed with, besides its layers."""

    method: str
    formats: tuple[str, ...]
    batch_size: int
    seed: int

    @classmethod
    def of(cls, spec: JobSpec) -> _Analysis:
        """The analysis a job's pipeline asks for (:func:`bitplan.search.pipeline._table`)."""
        return cls(spec.method, tuple(f.name for f in spec.options), spec.batch_size, spec.seed)

    def run(
        self,
        model: LoadedModel,
        calib: CalibData,
        *,
        layers: Sequence[QuantLayer] | None,
        rounder: Rounder | None,
        progress: ProgressFn | None,
        should_cancel: CancelFn | None,
    ) -> pd.DataFrame:
        return analyze(
            model,
            calib,
            method=self.method,
            formats=list(self.formats),
            batch_size=self.batch_size,
            seed=self.seed,
            progress=progress,
            should_cancel=should_cancel,
            rounder=rounder,
            layers=layers,
        )


class _Leased:
    """Renews ``worker_id``'s leases on ``shard_ids`` every heartbeat in a thread of its own
    while the caller's thread works; :attr:`lost` is set once any is no longer held."""

    def __init__(
        self, engine: Engine, settings: Settings, *, worker_id: str, shard_ids: list[int]
    ) -> None:
        self.engine, self.settings = engine, settings
        self.worker_id, self.shard_ids = worker_id, shard_ids
        self.lost = threading.Event()
        self._over = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="shard-lease", daemon=True)

    def __enter__(self) -> _Leased:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._over.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._over.wait(self.settings.heartbeat_seconds):
            try:
                held = renew_shards(
                    self.engine,
                    shard_ids=self.shard_ids,
                    worker_id=self.worker_id,
                    lease_s=self.settings.lease_seconds,
                )
            except Exception as error:  # noqa: BLE001 -- this thread must not die silently
                if is_transient(error):  # the lease outlasts several heartbeats
                    logger.warning("worker %s: shard lease not renewed (%s)", self.worker_id, error)
                    continue
                logger.exception("worker %s: renewing shard leases failed", self.worker_id)
                held = 0
            if held < len(self.shard_ids):
                logger.info("worker %s: a sensitivity shard is no longer its own", self.worker_id)
                self.lost.set()
                return


def _compute(
    engine: Engine,
    settings: Settings,
    *,
    worker_id: str,
    shards: list[ClaimedShard],
    model: LoadedModel,
    calib: CalibData,
    analysis: _Analysis,
    rounder: Rounder | None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn,
) -> None:
    """Score ``shards`` in one analysis, write each one's table and mark it done (see the
    module docstring); raises :class:`Cancelled` when ``should_cancel`` says so or a lease is
    lost during the analysis. A shard lost after it writes nothing."""
    staging = staging_dir(settings.artifact_dir, shards[0].job_id, shards[0].job_lease_version)
    if not staging.is_dir():
        raise RuntimeError(
            f"the staging folder of job {shards[0].job_id} is not on this worker's disk: "
            "sensitivity shards need an artifact folder that every worker shares"
        )
    names = {name for shard in shards for name in shard.layers}
    with _Leased(engine, settings, worker_id=worker_id, shard_ids=[s.id for s in shards]) as lease:
        table = analysis.run(
            model,
            calib,
            layers=[lay for lay in model.layers if lay.name in names],
            rounder=rounder,
            progress=progress,
            should_cancel=lambda: should_cancel() or lease.lost.is_set(),
        )

    for shard in shards:
        renew = functools.partial(
            renew_shards,
            engine,
            shard_ids=[shard.id],
            worker_id=worker_id,
            lease_s=settings.lease_seconds,
        )
        if not retry_transient(renew, what="renewing a shard", attempts=_DB_ATTEMPTS):
            logger.info("worker %s: shard %d is not its own any more", worker_id, shard.shard)
            continue  # its new holder writes it
        part = table[table["layer"].isin(shard.layers)]
        write_shard_table(staging / SHARD_FOLDER, shard.shard, part)
        finish = functools.partial(finish_shard, engine, shard_id=shard.id, worker_id=worker_id)
        retry_transient(finish, what="finishing a shard", attempts=_DB_ATTEMPTS)


def _shifted(progress: ProgressFn | None, *, before: int, total: int) -> ProgressFn | None:
    """``progress`` of the whole table from that of a computation of some of its shards, once
    ``before`` of its ``total`` layers were done."""
    if progress is None:
        return None

    def whole(stage: str, done: int, of: int) -> None:
        if stage == "analyze":
            progress(stage, before + done, total)
        else:
            progress(stage, done, of)

    return whole


def _release(engine: Engine, shards: list[ClaimedShard], *, worker_id: str, failed: bool) -> None:
    """Hand unfinished shards back now (best effort: their leases run out anyway)."""
    try:
        release_shards(engine, shard_ids=[s.id for s in shards], worker_id=worker_id, failed=failed)
    except Exception as error:
        if not is_transient(error):
            raise
        logger.warning("worker %s: shards not handed back (%s)", worker_id, error)


def take_sensitivity_shards(
    engine: Engine, settings: Settings, *, worker_id: str, shutdown: threading.Event
) -> bool:
    """Claim shards of a running job's sensitivity table and compute them while that job has
    free ones; False when none was free (or sharding is off)."""
    if settings.sensitivity_shards < 2:
        return False
    try:
        claimed = claim_shards(engine, worker_id=worker_id, lease_s=settings.lease_seconds)
    except Exception as error:
        if not is_transient(error):
            raise
        logger.warning("worker %s: could not look for sensitivity shards (%s)", worker_id, error)
        return False
    if not claimed:
        return False
    job_id = claimed[0].job_id
    inputs: tuple[LoadedModel, CalibData, Rounder | None] | None = None
    while claimed:
        try:
            check_cancel(shutdown.is_set)
            spec = JobSpec(**claimed[0].spec)
            if inputs is None:  # under the first shard's lease, which outlasts a slow load
                with _Leased(
                    engine, settings, worker_id=worker_id, shard_ids=[s.id for s in claimed]
                ):
                    model, calib, _ = load_inputs(spec, cache_dir=settings.cache_dir)
                staging = staging_dir(settings.artifact_dir, job_id, claimed[0].job_lease_version)
                rounder = Rounder.from_folder(staging) if needs_data(spec.options) else None
                inputs = (model, calib, rounder)
            _compute(
                engine,
                settings,
                worker_id=worker_id,
                shards=claimed,
                model=inputs[0],
                calib=inputs[1],
                analysis=_Analysis.of(spec),
                rounder=inputs[2],
                should_cancel=shutdown.is_set,
            )
        except Cancelled:
            _release(engine, claimed, worker_id=worker_id, failed=False)
            return True
        except Exception:  # noqa: BLE001 -- the job's own worker computes it instead
            logger.exception("worker %s: sensitivity shards of job %s failed", worker_id, job_id)
            _release(engine, claimed, worker_id=worker_id, failed=True)
            return True
        try:
            claimed = claim_shards(
                engine, worker_id=worker_id, lease_s=settings.lease_seconds, job_id=job_id
            )
        except Exception as error:
            if not is_transient(error):
                raise
            claimed = []
    return True


class ShardedSensitivity:
    """The job's side: the pipeline's table step (a :class:`~bitplan.search.pipeline.
    SensitivityFn`) that splits the table into shards for every worker; see the module
    docstring. Tables that cannot be split (one shard, a skeleton model, arguments other than
    the spec's) are computed here as before."""

    def __init__(
        self, engine: Engine, settings: Settings, *, job: ClaimedJob, worker_id: str
    ) -> None:
        self.engine, self.settings, self.job, self.worker_id = engine, settings, job, worker_id
        self.count = settings.sensitivity_shards if job.kind == JobKind.SEARCH else 0
        self.folder = staging_dir(settings.artifact_dir, job.id, job.lease_version) / SHARD_FOLDER
        self.state = "before"  # before → open → closed

    @property
    def enabled(self) -> bool:
        return self.count >= 2

    def __call__(
        self,
        model: LoadedModel,
        calib: CalibData,
        *,
        method: str,
        formats: Sequence[QuantFormat],
        batch_size: int,
        seed: int,
        cache_dir: Path | None,
        progress: ProgressFn | None,
        should_cancel: CancelFn | None,
        rounder: Rounder | None,
    ) -> pd.DataFrame:
        here = functools.partial(
            analyze,
            model,
            calib,
            method=method,
            formats=formats,
            batch_size=batch_size,
            seed=seed,
            cache_dir=cache_dir,
            progress=progress,
            should_cancel=should_cancel,
            rounder=rounder,
        )
        spec = JobSpec(**self.job.spec)
        analysis = _Analysis(
            method, tuple(f.name for f in parse_formats(formats)), batch_size, seed
        )
        if not self.enabled or isinstance(model, SkeletonModel) or analysis != _Analysis.of(spec):
            return here()
        key = table_key(
            model, calib, method=method, formats=formats, batch_size=batch_size, seed=seed
        )
        cached = load_cached(cache_dir, key) if cache_dir is not None else None
        if cached is not None:
            logger.info("sensitivity table (%s) from cache, key %s", method, key[:12])
            report(progress, "analyze", len(model.layers), len(model.layers))
            return cached
        split = split_layers(fuse_layers(model.layers, spec.fuse), self.count)
        if len(split) < 2 or not self._open(split):
            return here()
        table = self._work_through(
            model, calib, analysis, split, rounder, progress, should_cancel or (lambda: False)
        )
        if cache_dir is not None:
            store_cached(cache_dir, key, table)
        return table

    def _open(self, split: list[list[QuantLayer]]) -> bool:
        names = [[lay.name for lay in shard] for shard in split]
        try:
            opened = open_shards(
                self.engine, job_id=self.job.id, lease_version=self.job.lease_version, shards=names
            )
        except Exception as error:
            if not is_transient(error):
                raise
            logger.warning("job %s: sensitivity not split (%s)", self.job.id, error)
            return False
        self.state = "open" if opened else self.state
        logger.info("job %s: sensitivity split into %d shards", self.job.id, opened)
        return opened > 0

    def _work_through(
        self,
        model: LoadedModel,
        calib: CalibData,
        analysis: _Analysis,
        split: list[list[QuantLayer]],
        rounder: Rounder | None,
        progress: ProgressFn | None,
        should_cancel: CancelFn,
    ) -> pd.DataFrame:
        """Compute free shards here until every shard is done, then merge their tables."""
        sizes, before = [len(shard) for shard in split], 0
        ask_done = functools.partial(
            shards_done, self.engine, job_id=self.job.id, lease_version=self.job.lease_version
        )
        claim = functools.partial(
            claim_shards,
            self.engine,
            worker_id=self.worker_id,
            lease_s=self.settings.lease_seconds,
            job_id=self.job.id,
            own_job=True,
        )
        limit: int | None = 1  # one first; what nobody took meanwhile, all at once
        while True:
            check_cancel(should_cancel)
            done = self._ask(ask_done, None)
            if done is not None:
                before = sum(sizes[i] for i, finished in done.items() if finished)
                report(progress, "analyze", before, sum(sizes))
                if all(done.values()):  # also when closed under us: the attempt is over
                    break
            no_claim: list[ClaimedShard] = []
            claimed = self._ask(functools.partial(claim, limit=limit), no_claim)
            if not claimed:
                time.sleep(self.settings.poll_seconds)
                continue
            limit = None
            shifted = _shifted(progress, before=before, total=sum(sizes))
            self._compute_here(claimed, model, calib, analysis, rounder, shifted, should_cancel)
        tables = [
            self._table_of(index, shard, model, calib, analysis, rounder, should_cancel)
            for index, shard in enumerate(split)
        ]
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        return merge_tables(tables, model.layers)

    def _compute_here(
        self,
        claimed: list[ClaimedShard],
        model: LoadedModel,
        calib: CalibData,
        analysis: _Analysis,
        rounder: Rounder | None,
        progress: ProgressFn | None,
        should_cancel: CancelFn,
    ) -> None:
        """Compute claimed shards with the job's model; a shard taken over is left to its
        new holder, the job's own stop ends the job."""
        try:
            _compute(
                self.engine,
                self.settings,
                worker_id=self.worker_id,
                shards=claimed,
                model=model,
                calib=calib,
                analysis=analysis,
                rounder=rounder,
                progress=progress,
                should_cancel=should_cancel,
            )
        except Cancelled:
            _release(self.engine, claimed, worker_id=self.worker_id, failed=False)
            check_cancel(should_cancel)  # the job's stop; else a shard was taken over: go on

    def _table_of(
        self,
        index: int,
        shard: list[QuantLayer],
        model: LoadedModel,
        calib: CalibData,
        analysis: _Analysis,
        rounder: Rounder | None,
        should_cancel: CancelFn,
    ) -> pd.DataFrame:
        """Shard ``index``'s table as a worker wrote it, or computed here when it is missing."""
        table = read_shard_table(self.folder, index)
        if table is not None and set(table["layer"]) == {lay.name for lay in shard}:
            return table
        logger.warning(
            "job %s: no table of sensitivity shard %d in the staging folder (is the artifact "
            "folder shared by every worker?); computing it here",
            self.job.id,
            index,
        )
        return analysis.run(
            model, calib, layers=shard, rounder=rounder, progress=None, should_cancel=should_cancel
        )

    def _ask(self, call: Callable[[], T], otherwise: T) -> T:
        """``call()``, or ``otherwise`` while the database says "not now" (asked again soon)."""
        try:
            return call()
        except Exception as error:
            if not is_transient(error):
                raise
            logger.warning("job %s: sensitivity shards not reached (%s)", self.job.id, error)
            return otherwise

    def close(self) -> None:
        """Delete this attempt's shards (best effort: a next attempt replaces them anyway)."""
        if self.state != "open":
            return
        self.state = "closed"
        try:
            close_shards(self.engine, job_id=self.job.id, lease_version=self.job.lease_version)
        except Exception as error:
            if not is_transient(error):
                raise
            logger.warning("job %s: could not close sensitivity shards (%s)", self.job.id, error)
