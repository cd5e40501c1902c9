"""One job, many workers, on PostgreSQL: a shared Optuna study counts trials across processes
(library level) and an idle worker joins a running job's search (service level).

Every test runs real processes on one study: two searches on one study stop at the shared total
with no trial number twice and no trial lost; a process killed mid-trial leaves a trial that
Optuna's heartbeat fails and another process samples again; two workers finish one job with
complete trials from both, the killed-peer case included. Trials are slowed by a pause (not by
timing assumptions) so that both processes take part; every wait is for a condition.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Engine, func, select, text

from bitplan.app import crud, worker
from bitplan.app.db import make_engine, make_sessionmaker
from bitplan.app.models import Job, SearchPeer
from bitplan.app.settings import Settings
from bitplan.sensitivity.models import LoadedModel
from tests.app._api_fixtures import enqueue_job
from tests.helpers import wait_until

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 12
WAIT_S = 55.0  # far beyond the seconds these runs take; each test stays under a minute
HOST = socket.gethostname()


@pytest.fixture
def optuna_url(postgres_url: str) -> str:
    """Optuna's tables in their own schema of the test database (never beside the app's)."""
    engine = make_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA optuna"))
    engine.dispose()
    url = f"{postgres_url}?options=-csearch_path%3Doptuna"
    # Optuna creates its tables on first use; two processes doing it at once race (CREATE
    # TYPE). The service never does: the job's worker creates the study before any place opens.
    optuna.storages.RDBStorage(url).engine.dispose()
    return url


@pytest.fixture
def app_engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


def _trials(url: str, study: str) -> list[FrozenTrial]:
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def _has_study(url: str, study: str) -> bool:
    storage = optuna.storages.RDBStorage(url)
    try:
        return study in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    finally:
        storage.engine.dispose()


def _running_in(url: str, study: str, pid: int) -> bool:
    """Whether process ``pid`` has a running trial in ``study``."""
    if not _has_study(url, study):
        return False
    return any(
        t.state == TrialState.RUNNING and t.user_attrs.get("worker") == f"{HOST}:{pid}"
        for t in _trials(url, study)
    )


def _assert_exact_total(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Exactly TRIALS complete trials, every number once, none left running or waiting."""
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == TRIALS, [t.state.name for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return complete


def _shared_search(url: str, seed: int, pause_s: float, out: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tests.app._shared_study_worker", url, "shared"]
    return subprocess.Popen([*command, str(seed), str(TRIALS), str(pause_s), str(out)], cwd=ROOT)


def test_two_processes_stop_at_the_studys_total(optuna_url: str, tmp_path: Path) -> None:
    outs = [tmp_path / f"{seed}.json" for seed in (0, 1)]
    procs = [_shared_search(optuna_url, seed, 0.2, out) for seed, out in enumerate(outs)]
    for proc in procs:
        assert proc.wait(timeout=WAIT_S) == 0
    complete = _assert_exact_total(_trials(optuna_url, "shared"))
    assert {t.user_attrs["worker"] for t in complete} == {f"{HOST}:{p.pid}" for p in procs}
    results = [json.loads(out.read_text()) for out in outs]
    numbers = sorted(t.number for t in complete)
    for result in results:  # each process read every complete trial, whoever measured it
        assert sorted(result["trials"]) == numbers and not result["interrupted"]
    assert results[0]["pareto"] == results[1]["pareto"]
    assert all(result["measured"] >= 1 for result in results)


def test_a_killed_processs_trial_is_failed_and_sampled_again(
    optuna_url: str, tmp_path: Path
) -> None:
    survivor = _shared_search(optuna_url, 0, 0.2, tmp_path / "0.json")
    doomed = _shared_search(optuna_url, 1, 30.0, tmp_path / "1.json")  # never ends a trial
    try:
        wait_until(
            lambda: _running_in(optuna_url, "shared", doomed.pid),
            "a running trial of the doomed process",
            within_s=WAIT_S,
        )
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=WAIT_S)
    assert survivor.wait(timeout=WAIT_S) == 0
    trials = _trials(optuna_url, "shared")
    complete = _assert_exact_total(trials)
    assert {t.user_attrs["worker"] for t in complete} == {f"{HOST}:{survivor.pid}"}
    killed = [t for t in trials if t.user_attrs.get("worker") == f"{HOST}:{doomed.pid}"]
    assert [t.state for t in killed] == [TrialState.FAIL]


def _settings(tmp_path: Path, postgres_url: str, optuna_url: str, cache_dir: Path) -> Settings:
    return Settings(
        database_url=postgres_url,
        data_dir=tmp_path / "data",
        cache_dir=cache_dir,  # builtin:digits-cnn trained once (the digits_model fixture)
        auth="off",
        lease_seconds=5.0,
        heartbeat_seconds=0.5,
        poll_seconds=0.1,
        optuna_storage=optuna_url,
        optuna_heartbeat_s=1.0,
        optuna_grace_s=2.0,
        search_peers=1,
        worker_runner="tests.app._slow_trials:run_job",
        workers=0,
    )


def _spawn(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> subprocess.Popen[bytes]:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("BITPLAN_TEST_TRIAL_PAUSE_S", "0.3")
    monkeypatch.setenv("BITPLAN_TEST_GATE_DIR", str(settings.data_dir.parent / "trial-gate"))
    (proc,) = worker.spawn_workers(settings, count=1)
    return proc


def _job(engine: Engine, job_id: str) -> Job:
    with make_sessionmaker(engine)() as session:
        return crud.get_job(session, job_id=job_id, owner_id=None)


def _state(engine: Engine, job_id: str) -> str:
    return str(_job(engine, job_id).state)


def _run_two_workers(
    settings: Settings,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    *,
    kill_peer: bool,
) -> dict[str, Any]:
    """Queue a job, start its worker, then an idle one; optionally SIGKILL the idle one in the
    middle of a trial of the job. Returns the job, the study and the two processes."""
    job_id = enqueue_job(engine, trials=TRIALS, device="cpu")
    study = worker.study_name_for(job_id, attempt=1)
    url = str(settings.optuna_storage)
    main = _spawn(settings, monkeypatch)
    procs = [main]
    try:
        wait_until(lambda: _state(engine, job_id) == "running", "job claimed", within_s=WAIT_S)
        peer = _spawn(settings, monkeypatch)  # the queue is empty: this one joins the search
        procs.append(peer)
        wait_until(lambda: _running_in(url, study, peer.pid), "a peer trial", within_s=WAIT_S)
        if kill_peer:
            peer.send_signal(signal.SIGKILL)
            peer.wait(timeout=WAIT_S)
        wait_until(
            lambda: _state(engine, job_id) not in ("queued", "running"),
            "job finished",
            within_s=WAIT_S,
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    return {"job": _job(engine, job_id), "trials": _trials(url, study), "main": main, "peer": peer}


def _best_search_error(settings: Settings, job_id: str) -> float:
    frontier = json.loads((settings.artifact_dir / job_id / "frontier.json").read_text())
    return min(
        p["metrics"]["calibration"]["error"] for p in frontier["points"] if p["source"] == "search"
    )


def test_two_workers_finish_one_jobs_search_together(
    tmp_path: Path,
    postgres_url: str,
    optuna_url: str,
    app_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    digits_model: LoadedModel,
    bitplan_cache_dir: Path,
) -> None:
    settings = _settings(tmp_path, postgres_url, optuna_url, bitplan_cache_dir)
    run = _run_two_workers(settings, app_engine, monkeypatch, kill_peer=False)
    job = run["job"]
    assert job.state == "succeeded", job.error
    complete = _assert_exact_total(run["trials"])
    workers = {t.user_attrs["worker"] for t in complete}
    assert workers == {f"{HOST}:{run['main'].pid}", f"{HOST}:{run['peer'].pid}"}
    # The job's Pareto set was built from all trials: its best error is the study's best
    # (every trial is repaired into the budget, so every one is a candidate).
    best = min(t.values[1] for t in complete)
    assert _best_search_error(settings, job.id) == pytest.approx(best, rel=1e-6)
    with app_engine.connect() as connection:  # the places closed with the search
        assert connection.scalar(select(func.count()).select_from(SearchPeer)) == 0


def test_a_killed_peer_leaves_the_job_its_full_trials(
    tmp_path: Path,
    postgres_url: str,
    optuna_url: str,
    app_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    digits_model: LoadedModel,
    bitplan_cache_dir: Path,
) -> None:
    settings = _settings(tmp_path, postgres_url, optuna_url, bitplan_cache_dir)
    run = _run_two_workers(settings, app_engine, monkeypatch, kill_peer=True)
    assert run["job"].state == "succeeded", run["job"].error
    complete = _assert_exact_total(run["trials"])
    peer = f"{HOST}:{run['peer'].pid}"
    (killed,) = [t for t in run["trials"] if t.state == TrialState.FAIL]
    assert killed.user_attrs.get("worker") == peer  # failed by its silent heartbeat
    # Its place was sampled again: the job's worker ran trials numbered after it.
    main = f"{HOST}:{run['main'].pid}"
    assert any(t.number > killed.number and t.user_attrs["worker"] == main for t in complete)
