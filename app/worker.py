"""The job worker: claims jobs from the database queue and runs the pipeline on them.

A queued row is a planning job or a model export (:class:`~bitplan.app.states.JobKind`, see
app/model_exports.py); the same worker claims both in arrival order and runs each the same way,
with a runner per kind (the pipeline, :func:`bitplan.app.export_run.run_export`). One worker
runs one job at a time; with no job queued it may compute shards of a running job's
sensitivity table (:mod:`bitplan.app.shard_work`) or join a running job's search stage
(:mod:`bitplan.app.search_peers`). The job runs in its own thread while the main thread
renews the lease by heartbeat, watches the job's cancel flag and waits for SIGTERM. The
pipeline's ``should_cancel()`` turns True when the job was cancelled (it ends ``cancelled``),
when the lease was lost (another worker owns the job now: this one writes nothing more, not
even its results), or on SIGTERM (the job goes back to the queue for another worker). Progress
(per stage and overall, :mod:`bitplan.app.job_progress`) reaches the job row at most every
:data:`PROGRESS_INTERVAL_S`, fenced by the lease like every other write. The worker's clock is
injectable (``run_worker(clock=...)``), so tests drive heartbeats and throttling without sleeps.

The database may say "not now" at any moment (a locked SQLite file, a full pool, a restarted
PostgreSQL): such transient errors (:func:`bitplan.app.db.is_transient`) never end a worker.
Claims and reaps back off (capped exponential with jitter, logged) and try again; a heartbeat,
cancel check or progress write that fails is skipped until the next one (the lease outlasts
several heartbeats); the final write of a job is retried, and if the database stays away
longer than that, the lease runs out and the reaper gives the job to another attempt.

Artifacts are written to a private staging folder and moved to ``artifact_dir/<job_id>/`` only
by the lease holder, right before it marks the job succeeded; a crashed attempt leaves nothing
the API would serve. Run a standalone worker with ``python -m bitplan.app.worker`` (or
``bitplan worker``); :func:`spawn_workers` starts several as processes for ``bitplan serve``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Engine

from bitplan.app.allocator import return_freed_memory_for
from bitplan.app.db import Backoff, engine_for, is_transient, retry_transient
from bitplan.app.export_run import pack_export
from bitplan.app.job_progress import EXPORT_STAGE_WEIGHTS, STAGE_WEIGHTS, ProgressTracker
from bitplan.app.model_exports import (
    EXPORT_REFUSED,
    RUNTIME_UNAVAILABLE,
    ExportSpec,
    RuntimeUnavailable,
    plan_file,
)
from bitplan.app.queue import (
    ClaimedJob,
    claim_job,
    finish_job,
    heartbeat,
    is_cancel_requested,
    reap_expired,
    release_job,
    set_progress,
)
from bitplan.app.redact import path_names, redact
from bitplan.app.report import render_report
from bitplan.app.search_peers import (
    SearchOpening,
    join_running_search,
    staging_dir,
    study_name_for,
    study_storage,
)
from bitplan.app.settings import Settings, get_settings
from bitplan.app.shard_work import ShardedSensitivity, take_sensitivity_shards
from bitplan.app.states import JobKind, JobState
from bitplan.app.worker_presence import WorkerPresence
from bitplan.search.plans import BEST_PLAN_ID
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import Cancelled, check_cancel, report

__all__ = [
    "PROGRESS_INTERVAL_S",
    "Clock",
    "Runner",
    "StopReason",
    "load_runner",
    "run_worker",
    "spawn_workers",
    "study_name_for",
]

logger = logging.getLogger(__name__)

# At most one progress write per job every half second: a bar that looks live to a person
# polling the API, without turning a fast inner loop into a stream of database writes.
PROGRESS_INTERVAL_S = 0.5
# The folder inside an export's staging folder that the target is written into, before
# pack_export turns it into the one file served.
_EXPORT_FOLDER = "written"
# How often the main thread wakes to notice SIGTERM or a finished job thread (seconds).
_TICK_S = 0.1
# Retries of the write that ends a job: with Backoff's 10 s cap about a minute in all, past
# any burst; after that the lease expires and the reaper requeues the job instead.
_SETTLE_ATTEMPTS = 10
_BACKOFF = Backoff()

Runner = Callable[..., Any]
# Seconds on a monotonic scale (time.monotonic); tests hand in a clock they advance by hand.
Clock = Callable[[], float]


class StopReason(StrEnum):
    """Why the supervisor stopped a job before its runner returned."""

    CANCEL = "cancel"  # the user cancelled: the job ends cancelled
    LEASE_LOST = "lease lost"  # another worker or the reaper has the job: write nothing more
    SHUTDOWN = "shutdown"  # SIGTERM: the job goes back to the queue


def load_runner(dotted: str) -> Runner:
    """Import a ``"module:function"`` job runner (default: ``bitplan.search.pipeline:run_job``)."""
    module_name, _, attribute = dotted.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"worker runner {dotted!r} must look like 'package.module:function'")
    runner = getattr(importlib.import_module(module_name), attribute)
    if not callable(runner):
        raise ValueError(f"worker runner {dotted!r} is not callable")
    return cast(Runner, runner)


def _server_folders(settings: Settings) -> dict[str, str]:
    """The service's folders, as errors show them: named by role, not by place."""
    names: dict[str, str] = {}
    for folder, shown in (
        (settings.data_dir, "<data>"),
        (settings.upload_dir, "<uploads>"),
        (settings.cache_dir, "<cache>"),
        (settings.artifact_dir, "<artifacts>"),
    ):
        names.update(path_names(folder, shown))
    return names


def _shown_names(spec: JobSpec) -> dict[str, str]:
    """The job's uploaded files, as errors show them: by the names they were uploaded as."""
    names: dict[str, str] = {}
    if spec.model_name:
        names.update(path_names(spec.model, spec.model_name))
    if spec.calib_name:
        names.update(path_names(spec.calib, spec.calib_name))
    return names


class _InvalidSpec(Exception):
    """The row's spec does not describe a job this worker can run."""


class _JobRun:
    """One claimed job: the job thread runs the runner, the caller's thread supervises.

    A search job's runner is the pipeline; an export's (:class:`~bitplan.app.states.JobKind`)
    writes one plan for a runtime target, which this class then packs into one file. Both
    write into the same staging folder and are published, fenced and cleaned up alike.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        settings: Settings,
        worker_id: str,
        job: ClaimedJob,
        runner: Runner,
        shutdown: threading.Event,
        clock: Clock,
    ) -> None:
        self.engine, self.settings, self.worker_id = engine, settings, worker_id
        self.job, self.runner, self.shutdown, self.clock = job, runner, shutdown, clock
        self.stop = threading.Event()
        self.reason: StopReason | None = None
        # the state the runner asks for, and the error message when it failed
        self.outcome: tuple[JobState, str] = (JobState.FAILED, "the job thread did not finish")
        # the result fields of a success (besides artifact_dir), or of a failure (its kind)
        self.result: dict[str, Any] | None = None
        self.final_dir = settings.artifact_dir / job.id
        self.staging = staging_dir(settings.artifact_dir, job.id, job.lease_version)
        # places for idle workers in this job's search (app/search_peers.py)
        self.opening = SearchOpening(
            engine, settings, job_id=job.id, lease_version=job.lease_version, kind=job.kind
        )
        # the job's sensitivity table in shards that idle workers compute too (app/shard_work.py)
        self.shards = ShardedSensitivity(engine, settings, job=job, worker_id=worker_id)
        self.is_export = job.kind == JobKind.EXPORT
        weights = EXPORT_STAGE_WEIGHTS if self.is_export else STAGE_WEIGHTS
        self.tracker = ProgressTracker(interval_s=PROGRESS_INTERVAL_S, clock=clock, weights=weights)
        self._names = _server_folders(settings)  # server paths a job's error may quote

    def _halt(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
            logger.info("job %s: stopping (%s)", self.job.id, reason)
        self.stop.set()

    def should_cancel(self) -> bool:
        return self.stop.is_set()

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.reason == StopReason.LEASE_LOST:
            return  # the job is someone else's now
        self.opening.on_stage(stage)
        snapshot = self.tracker.update(stage, done, total)
        if snapshot is None:
            return
        try:
            held = set_progress(
                self.engine,
                job_id=self.job.id,
                lease_version=self.job.lease_version,
                snapshot=snapshot,
            )
        except Exception as error:
            if not is_transient(error):
                raise
            # Progress is advisory: the next write carries newer numbers anyway.
            logger.warning("job %s: progress not recorded (%s)", self.job.id, error)
            return
        if not held:
            self._halt(StopReason.LEASE_LOST)

    def _fail(self, message: str, *, problem: str | None = None) -> None:
        """End the job failed with ``message``, minus any server path it quotes; an export
        records what kind of ``problem`` it was (app/model_exports.py)."""
        self.outcome = (JobState.FAILED, redact(message, self._names))
        self.result = {"problem": problem} if problem else None

    def _target(self) -> None:
        try:
            self.result = self._export() if self.is_export else self._search()
            self.outcome = (JobState.SUCCEEDED, "")
        except _InvalidSpec as error:
            self._fail(f"invalid job spec: {error}")
        except Cancelled:
            self.outcome = (JobState.CANCELLED, "")
        except RuntimeUnavailable as error:
            self._fail(str(error), problem=RUNTIME_UNAVAILABLE)
        except InputError as error:
            self._fail(str(error), problem=EXPORT_REFUSED if self.is_export else None)
        except Exception as error:  # noqa: BLE001 -- any crash fails the job, with its reason
            logger.exception("job %s crashed", self.job.id)
            self._fail(f"internal error: {type(error).__name__}: {error}")

    def _search(self) -> dict[str, Any]:
        """Run the pipeline into the staging folder; the result lists the plans and what each
        stage cost (:mod:`bitplan.search.stage_stats`)."""
        try:
            spec = JobSpec(**self.job.spec)
        except (InputError, TypeError) as error:  # TypeError: unknown or missing fields
            raise _InvalidSpec(str(error)) from None
        self._names.update(_shown_names(spec))
        return_freed_memory_for(spec.model)  # a large checkpoint: see bitplan.app.allocator
        sharded = {"sensitivity": self.shards} if self.shards.enabled else {}
        with study_storage(self.settings) as storage:
            returned = self.runner(
                spec,
                out_dir=self.staging,
                cache_dir=self.settings.cache_dir,
                progress=self.progress,
                should_cancel=self.should_cancel,
                optuna_storage=storage,
                study_name=study_name_for(self.job.id, attempt=self.job.attempts),
                **sharded,
            )
        self._render_report()
        # best.json is a copy of one of the plans (a handle), not a plan of its own.
        plan_ids = sorted(
            path.stem
            for path in (self.staging / "plans").glob("*.json")
            if path.stem != BEST_PLAN_ID
        )
        result: dict[str, Any] = {"plan_ids": plan_ids}
        stages = getattr(returned, "stages", None)  # a JobResult's; a custom runner may have none
        if stages is not None:
            result["stages"] = stages
        return result

    def _export(self) -> dict[str, Any]:
        """Write the export's target into the staging folder and pack it into one file."""
        try:
            spec = ExportSpec.from_dict(self.job.spec)
        except InputError as error:
            raise _InvalidSpec(str(error)) from None
        if spec.model_name:
            self._names.update(path_names(spec.model, spec.model_name))
        written = self.staging / _EXPORT_FOLDER
        self.runner(
            spec,
            plan_path=plan_file(
                self.settings.artifact_dir, parent_id=spec.parent_id, plan_id=spec.plan_id
            ),
            out_dir=written,
            cache_dir=self.settings.cache_dir,
            progress=self.progress,
            should_cancel=self.should_cancel,
        )
        check_cancel(self.should_cancel)
        report(self.progress, "package", 0, 1)
        result = pack_export(written, self.staging)
        report(self.progress, "package", 1, 1)
        return result

    def _render_report(self) -> None:
        """The HTML report, linking to the API's download routes. A job whose report cannot be
        drawn keeps its results (the API answers 409 for the report)."""
        try:
            render_report(self.staging, links_base=f"/v1/jobs/{self.job.id}")
        except Exception:  # noqa: BLE001 -- the results stand without their report
            logger.exception("job %s: could not render the report", self.job.id)

    def _supervise(self, thread: threading.Thread) -> None:
        next_beat = self.clock() + self.settings.heartbeat_seconds
        failures = 0
        while thread.is_alive():
            thread.join(_TICK_S)
            if self.shutdown.is_set():
                self._halt(StopReason.SHUTDOWN)
            if self.clock() < next_beat or self.reason == StopReason.LEASE_LOST:
                continue
            try:
                self._beat()
            except Exception as error:
                if not is_transient(error):
                    raise
                # The lease outlasts several heartbeats: try again soon, not a beat later.
                wait = min(_BACKOFF.delay(failures), self.settings.heartbeat_seconds)
                failures += 1
                logger.warning(
                    "job %s: heartbeat failed (%s); retry in %.2f s", self.job.id, error, wait
                )
                next_beat = self.clock() + wait
                continue
            failures = 0
            next_beat = self.clock() + self.settings.heartbeat_seconds

    def _beat(self) -> None:
        """Renew the lease and look at the cancel flag."""
        if not self._renew():
            self._halt(StopReason.LEASE_LOST)
        elif is_cancel_requested(self.engine, job_id=self.job.id):
            self._halt(StopReason.CANCEL)

    def _renew(self) -> bool:
        """Heartbeat: extend the lease; False when this worker no longer holds it."""
        return heartbeat(
            self.engine,
            job_id=self.job.id,
            worker_id=self.worker_id,
            lease_version=self.job.lease_version,
            lease_s=self.settings.lease_seconds,
        )

    def run(self) -> None:
        for stale in self.settings.artifact_dir.glob(f".{self.job.id}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)  # attempts of workers that died
        self.staging.mkdir(parents=True)
        self.settings.cache_dir.mkdir(parents=True, exist_ok=True)
        thread = threading.Thread(target=self._target, name=f"job-{self.job.id}", daemon=True)
        thread.start()
        self._supervise(thread)
        self.opening.close()
        self.shards.close()
        self._settle()
        shutil.rmtree(self.staging, ignore_errors=True)

    def _settle(self) -> None:
        """Write the outcome (retried while the database is busy), unless the lease is gone."""
        try:
            retry_transient(
                self._write_outcome,
                what=f"recording the outcome of job {self.job.id}",
                attempts=_SETTLE_ATTEMPTS,
                backoff=_BACKOFF,
            )
        except Exception as error:
            if not is_transient(error):
                raise
            logger.error(
                "job %s: outcome not recorded (%s); its lease will expire and the job be retried",
                self.job.id,
                error,
            )

    def _write_outcome(self) -> None:
        """Write the outcome, unless the lease is gone (then another worker owns the job).
        Every write is fenced, so running this again after a failure is harmless."""
        job_id, version = self.job.id, self.job.lease_version
        kind, message = self.outcome
        if self.reason == StopReason.LEASE_LOST:
            logger.warning("job %s: lease lost; discarding this attempt", self.job.id)
        elif kind == JobState.SUCCEEDED:
            self._publish()
        elif kind == JobState.CANCELLED and self.reason == StopReason.SHUTDOWN:
            release_job(self.engine, job_id=job_id, lease_version=version)
        elif kind == JobState.CANCELLED:
            finish_job(self.engine, job_id=job_id, lease_version=version, state=JobState.CANCELLED)
        else:
            finish_job(
                self.engine,
                job_id=job_id,
                lease_version=version,
                state=JobState.FAILED,
                error=message,
                result=self.result,
            )

    def _publish(self) -> None:
        # Renewing right before the move fences it: a worker whose lease moved on (reaped,
        # reclaimed) since its last heartbeat never puts its results where the API serves them.
        if not self._renew():
            logger.warning("job %s: lease lost before publishing; discarding", self.job.id)
            return
        if self.staging.exists():  # absent when a first try moved it and then lost the database
            shutil.rmtree(self.final_dir, ignore_errors=True)  # a crashed attempt's leftovers
            self.staging.rename(self.final_dir)
        result = {"artifact_dir": str(self.final_dir), **(self.result or {})}
        finish_job(
            self.engine,
            job_id=self.job.id,
            lease_version=self.job.lease_version,
            state=JobState.SUCCEEDED,
            result=result,
        )


def _install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM and SIGINT set ``stop``; returns what puts the previous handlers back (a worker
    run inside another program, or a test, must not leave its handlers behind)."""

    def _handle(signum: int, _frame: Any) -> None:
        logger.info("received %s: finishing or releasing the current job", signal.strsignal(signum))
        stop.set()

    previous = {
        signum: signal.signal(signum, _handle) for signum in (signal.SIGTERM, signal.SIGINT)
    }

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def run_worker(
    settings: Settings,
    *,
    worker_id: str | None = None,
    stop_event: threading.Event | None = None,
    once: bool = False,
    runner: Runner | None = None,
    export_runner: Runner | None = None,
    clock: Clock = time.monotonic,
) -> int:
    """Claim and run jobs until ``stop_event`` is set (SIGTERM/SIGINT when none is given and
    this is the main thread). With ``once``, return as soon as the queue is empty. Returns the
    number of jobs (searches and exports) this worker ran. ``runner`` runs searches and
    ``export_runner`` exports (default: the settings' ``worker_runner`` and
    ``export_runner``). ``clock`` times heartbeats, reaping and progress writes."""
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    runners = {
        JobKind.SEARCH: runner or load_runner(settings.worker_runner),
        JobKind.EXPORT: export_runner or load_runner(settings.export_runner),
    }
    restore_signals: Callable[[], None] | None = None
    if stop_event is None:
        stop_event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            restore_signals = _install_signal_handlers(stop_event)
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    engine = engine_for(settings)
    ran = 0
    next_reap = -float("inf")  # reap before the first claim
    failures = 0  # consecutive transient database errors
    logger.info("worker %s started", worker_id)
    # presence row for health/readiness (app/worker_presence.py), beating beside the claim loop
    presence = WorkerPresence(engine, worker_id, interval_s=settings.heartbeat_seconds).start()
    try:
        while not stop_event.is_set():
            try:
                if clock() >= next_reap:  # every worker reaps; the reaper is idempotent
                    reap_expired(engine)
                    next_reap = clock() + settings.heartbeat_seconds
                job = claim_job(engine, worker_id=worker_id, lease_s=settings.lease_seconds)
            except Exception as error:
                if not is_transient(error):
                    raise
                wait = _BACKOFF.delay(failures)
                failures += 1
                logger.warning(
                    "worker %s: database unavailable (%s: %s); try %d failed, next in %.2f s",
                    worker_id,
                    type(error).__name__,
                    str(error).partition("\n")[0],
                    failures,
                    wait,
                )
                stop_event.wait(wait)
                continue
            failures = 0
            if job is None:
                if once:
                    break
                # no queued job: help a running job's sensitivity analysis, else its search
                if not take_sensitivity_shards(
                    engine, settings, worker_id=worker_id, shutdown=stop_event
                ) and not join_running_search(
                    engine, settings, worker_id=worker_id, shutdown=stop_event, clock=clock
                ):
                    stop_event.wait(settings.poll_seconds)
                continue
            _JobRun(
                engine=engine,
                settings=settings,
                worker_id=worker_id,
                job=job,
                runner=runners[JobKind(job.kind)],
                shutdown=stop_event,
                clock=clock,
            ).run()
            ran += 1
    finally:
        presence.stop()
        engine.dispose()
        if restore_signals is not None:
            restore_signals()
        logger.info("worker %s stopped after %d job(s)", worker_id, ran)
    return ran


def _settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as BITPLAN_* variables, so a child process rebuilds the same settings."""
    values = settings.model_dump(mode="json")
    return {
        f"BITPLAN_{name.upper()}": "" if value is None else str(value)
        for name, value in values.items()
    }


def spawn_workers(settings: Settings, *, count: int) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` worker processes (``python -m bitplan.app.worker``) with these settings."""
    env = {**os.environ, **_settings_env(settings)}
    command = [sys.executable, "-m", "bitplan.app.worker"]
    return [subprocess.Popen(command, env=env) for _ in range(count)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitplan.app.worker", description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--worker-id", default=None, help="name shown in the job's lease")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run_worker(get_settings(), worker_id=args.worker_id, once=args.once)
    return 0


if __name__ == "__main__":
    sys.exit(main())
