"""One job's sensitivity table computed by several workers (app/sensitivity_shards.py,
app/shard_work.py, sensitivity/shards.py).

The split keeps tie and share groups whole and balances weights; the merged shard tables are the
whole model's table for every method; a shard goes to one claimer, an expired one to the next,
and none to anybody once its job is cancelled or reclaimed. Service-level runs use two workers
in threads of this process on SQLite and on PostgreSQL (``db_url``): the job's worker waits,
where the test says so, for a condition on the shards (never for a fixed time), so that both
workers take part however fast the tiny models are.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import Engine, func, select

from bitplan.app import crud, queue, shard_work, worker
from bitplan.app.db import make_sessionmaker
from bitplan.app.models import SensitivityShard, utcnow
from bitplan.app.sensitivity_shards import (
    claim_shards,
    close_shards,
    finish_shard,
    open_shards,
    release_shards,
    renew_shards,
)
from bitplan.app.settings import Settings
from bitplan.app.states import JobState
from bitplan.search.pipeline import load_inputs
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.analyzer import analyze, rounder_for, table_key
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.fusion import fuse_layers
from bitplan.sensitivity.layers import QuantLayer
from bitplan.sensitivity.shards import merge_tables, split_layers
from bitplan.sensitivity.table import load_cached
from tests.app._api_fixtures import enqueue_job
from tests.helpers import VOCAB_SIZE, wait_until, write_tiny_hf_model

WAIT_S = 60.0  # far beyond the seconds these runs take


def _layer(
    name: str, numel: int, *, tie: str | None = None, share: str | None = None
) -> QuantLayer:
    return QuantLayer(name, f"{name}.weight", "linear", (numel // 4, 4), numel, tie, None, share)


def test_split_keeps_tie_and_share_groups_whole_and_balances_weights() -> None:
    layers = [
        _layer("embed", 4096, tie="embed.weight"),
        _layer("q", 256, share="qkv"),
        _layer("k", 256, share="qkv"),
        _layer("v", 256, share="qkv"),
        _layer("mlp.up", 1024),
        _layer("mlp.down", 1024),
        _layer("mlp.gate", 512),
        _layer("head", 4096, tie="embed.weight"),
        _layer("small", 64),
    ]
    shards = split_layers(layers, 3)
    assert sorted(lay.name for shard in shards for lay in shard) == sorted(
        lay.name for lay in layers
    )
    where = {lay.name: i for i, shard in enumerate(shards) for lay in shard}
    assert where["embed"] == where["head"]  # one tensor
    assert where["q"] == where["k"] == where["v"]  # one decision of the plan
    order = [lay.name for lay in layers]
    for shard in shards:  # each in the model's order, shards by their first layer
        assert [lay.name for lay in shard] == [n for n in order if n in {x.name for x in shard}]
    assert [order.index(s[0].name) for s in shards] == sorted(
        order.index(s[0].name) for s in shards
    )
    heavy, *rest = sorted(shards, key=lambda shard: -sum(lay.numel for lay in shard))
    assert [lay.name for lay in heavy] == ["embed", "head"]  # heavier than the rest together
    light = [sum(lay.numel for lay in shard) for shard in rest]
    assert abs(light[0] - light[1]) <= max(lay.numel for shard in rest for lay in shard)
    assert len(split_layers(layers, 50)) == 6  # never more shards than groups
    assert split_layers(layers, 1) == [layers]


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A GPT-2 (its head tied to the embedding, Conv1D layers), a LLaMA (q/k/v and gate/up to
    fuse) and 16 calibration samples of 12 tokens."""
    root = tmp_path_factory.mktemp("tiny-lms")
    ids = torch.randint(5, VOCAB_SIZE, (16, 12), generator=torch.Generator().manual_seed(1))
    save_file({"input_ids": ids}, root / "calib.safetensors")
    return {
        "gpt2": write_tiny_hf_model(root / "gpt2", "gpt2", task="text-generation", tokenizer=False),
        "llama": write_tiny_hf_model(
            root / "llama", "llama", task="text-generation", tokenizer=False
        ),
        "calib": root / "calib.safetensors",
    }


def _spec(tiny_lms: dict[str, Path], model: str, **fields: Any) -> JobSpec:
    return JobSpec(
        model=str(tiny_lms[model]),
        calib=str(tiny_lms["calib"]),
        budget="5bpw",
        formats=["int8", "int4-g32"],
        device="cpu",
        batch_size=16,  # one batch: every data pass is one forward
        fuse=["qkv", "gate_up"] if model == "llama" else [],
        **fields,
    )


# Data-aware rounding (GPTQ, from the job's statistics) is checked on the LLaMA's Linear layers.
@pytest.mark.parametrize(
    ("model", "method", "rounding"),
    [
        ("gpt2", "fisher", ["rtn"]),
        ("gpt2", "layer", ["rtn"]),
        ("gpt2", "weight", ["rtn"]),
        ("gpt2", "e2e", ["rtn"]),
        ("llama", "fisher", ["rtn", "gptq"]),
        ("llama", "weight", ["rtn", "gptq"]),
    ],
)
def test_merged_shard_tables_are_the_whole_table(
    tiny_lms: dict[str, Path], tmp_path: Path, model: str, method: str, rounding: list[str]
) -> None:
    spec = _spec(tiny_lms, model, method=method, rounding=rounding)
    loaded, calib, _ = load_inputs(spec)
    options = {"method": method, "formats": spec.options, "batch_size": 16, "seed": 3}
    rounder = rounder_for(loaded, calib, batch_size=16, workdir=tmp_path)
    whole = analyze(loaded, calib, rounder=rounder, **options)
    shards = split_layers(fuse_layers(loaded.layers, spec.fuse), 3)
    assert len(shards) == 3
    parts = [analyze(loaded, calib, rounder=rounder, layers=s, **options) for s in shards]
    merged = merge_tables(parts[::-1], loaded.layers)  # in any order
    pd.testing.assert_frame_equal(merged, whole, check_exact=False, rtol=1e-6, atol=0)
    assert merged["error"].gt(0).all()


def test_analyze_scores_whole_tie_groups_of_planned_layers_only(tiny_lms: dict[str, Path]) -> None:
    loaded, calib, _ = load_inputs(_spec(tiny_lms, "gpt2", method="weight"))
    by_name = {lay.name: lay for lay in loaded.layers}
    with pytest.raises(InputError, match="whole tie groups; it lacks lm_head"):
        analyze(
            loaded, calib, method="weight", formats=["int8"], layers=[by_name["transformer.wte"]]
        )
    stranger = _layer("not.a.layer", 64)
    with pytest.raises(InputError, match="not.a.layer: not a planned layer"):
        analyze(loaded, calib, method="weight", formats=["int8"], layers=[stranger])
    with pytest.raises(InputError, match="the subset of layers is empty"):
        analyze(loaded, calib, method="weight", formats=["int8"], layers=[])


# -- the shards' rows: claims, leases, closing -----------------------------------------------


def _running_job(engine: Engine) -> queue.ClaimedJob:
    enqueue_job(engine, trials=1)
    job = queue.claim_job(engine, worker_id="job-worker", lease_s=60)
    assert job is not None
    return job


def _rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(SensitivityShard)) or 0)


def _claim_at(
    engine: Engine, start: threading.Barrier, name: str, won: dict[str, list[Any]]
) -> None:
    start.wait()  # both claim at once
    won[name] = claim_shards(engine, worker_id=name, lease_s=60)


def test_two_claimers_get_one_shard_once(engine: Engine) -> None:
    for _ in range(3):  # a few races: each has exactly one winner
        job = _running_job(engine)
        open_shards(engine, job_id=job.id, lease_version=job.lease_version, shards=[["a", "b"]])
        start = threading.Barrier(2)
        won: dict[str, list[Any]] = {}
        threads = [
            threading.Thread(target=_claim_at, args=(engine, start, name, won))
            for name in ("w1", "w2")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=WAIT_S)
        assert sorted(len(shards) for shards in won.values()) == [0, 1]
        (shard,) = won["w1"] or won["w2"]
        assert (shard.job_id, shard.shard, shard.layers) == (job.id, 0, ["a", "b"])
        assert shard.spec["model"] == "builtin:digits-cnn"  # what the claimer loads
        queue.finish_job(
            engine, job_id=job.id, lease_version=job.lease_version, state=JobState.SUCCEEDED
        )


def test_an_expired_shard_is_claimed_again_and_its_old_holder_is_fenced(engine: Engine) -> None:
    job = _running_job(engine)
    open_shards(engine, job_id=job.id, lease_version=job.lease_version, shards=[["a"], ["b"]])
    now = utcnow()
    (first,) = claim_shards(engine, worker_id="dead", lease_s=5, now=now)
    (second,) = claim_shards(engine, worker_id="slow", lease_s=60, now=now)
    assert claim_shards(engine, worker_id="late", lease_s=60, now=now + timedelta(seconds=1)) == []
    later = now + timedelta(seconds=10)  # "dead" stopped renewing: its lease ran out
    (again,) = claim_shards(engine, worker_id="next", lease_s=60, now=later)
    assert (again.id, again.shard) == (first.id, 0)
    assert renew_shards(engine, shard_ids=[first.id], worker_id="dead", lease_s=60) == 0
    assert not finish_shard(engine, shard_id=first.id, worker_id="dead")
    assert finish_shard(engine, shard_id=first.id, worker_id="next")
    much_later = later + timedelta(hours=1)  # every lease ran out: only the unfinished is free
    assert [
        s.id for s in claim_shards(engine, worker_id="x", lease_s=60, limit=None, now=much_later)
    ] == [second.id]
    with engine.connect() as connection:
        done = dict(connection.execute(select(SensitivityShard.shard, SensitivityShard.done)).all())
    assert done == {0: True, 1: False}


def test_a_cancelled_or_reclaimed_jobs_shards_are_closed_to_every_worker(engine: Engine) -> None:
    job = _running_job(engine)
    open_shards(engine, job_id=job.id, lease_version=job.lease_version, shards=[["a"], ["b"]])
    (held,) = claim_shards(engine, worker_id="peer", lease_s=60)
    with make_sessionmaker(engine)() as session:
        crud.request_cancel(session, job_id=job.id, owner_id=None)
    assert claim_shards(engine, worker_id="other", lease_s=60) == []
    assert renew_shards(engine, shard_ids=[held.id], worker_id="peer", lease_s=60) == 0
    assert not finish_shard(engine, shard_id=held.id, worker_id="peer")

    job = _running_job(engine)
    open_shards(engine, job_id=job.id, lease_version=job.lease_version, shards=[["a"], ["b"]])
    (held,) = claim_shards(engine, worker_id="peer", lease_s=60)
    assert queue.reap_expired(engine, now=utcnow() + timedelta(hours=1)) == 2  # both jobs
    retry = queue.claim_job(engine, worker_id="job-worker-2", lease_s=60)
    assert retry is not None and retry.id == job.id  # the same job, its next attempt
    assert claim_shards(engine, worker_id="other", lease_s=60) == []  # the old attempt's
    assert renew_shards(engine, shard_ids=[held.id], worker_id="peer", lease_s=60) == 0
    opened = open_shards(engine, job_id=job.id, lease_version=retry.lease_version, shards=[["a"]])
    assert opened == 1 and _rows(engine) == 3  # the retry's shard replaced the old attempt's
    close_shards(engine, job_id=job.id, lease_version=job.lease_version)  # the old one's: none
    assert [s.job_id for s in claim_shards(engine, worker_id="other", lease_s=60)] == [job.id]
    close_shards(engine, job_id=job.id, lease_version=retry.lease_version)
    assert _rows(engine) == 2  # the cancelled job's two, until it is deleted


def test_a_shard_another_worker_failed_goes_to_the_jobs_own_worker(engine: Engine) -> None:
    job = _running_job(engine)
    open_shards(engine, job_id=job.id, lease_version=job.lease_version, shards=[["a"]])
    (shard,) = claim_shards(engine, worker_id="peer", lease_s=60)
    release_shards(engine, shard_ids=[shard.id], worker_id="peer", failed=True)
    assert claim_shards(engine, worker_id="peer", lease_s=60) == []
    assert claim_shards(engine, worker_id="another", lease_s=60, job_id=job.id) == []
    mine = claim_shards(engine, worker_id="job-worker", lease_s=60, job_id=job.id, own_job=True)
    assert [s.id for s in mine] == [shard.id]


# -- whole jobs: workers in threads of this process ------------------------------------------


def _service_settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        database_url=db_url,
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",  # the test's own: no table cached by an earlier run
        auth="off",
        lease_seconds=5.0,
        heartbeat_seconds=0.3,
        poll_seconds=0.05,
        optuna_storage=None,
        sensitivity_shards=2,
        workers=0,
    )


def _enqueue_lm_job(engine: Engine, tiny_lms: dict[str, Path]) -> tuple[str, JobSpec]:
    spec = _spec(tiny_lms, "llama", method="fisher", rounding=["rtn", "gptq"], trials=2)
    return enqueue_job(engine, **spec.to_dict()), spec


def _state(engine: Engine, job_id: str) -> JobState:
    with make_sessionmaker(engine)() as session:
        job = crud.get_job(session, job_id=job_id, owner_id=None)
        assert job is not None
        return job.state


def _holders(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        rows = connection.execute(select(SensitivityShard.worker_id)).scalars().all()
    return {worker_id for worker_id in rows if worker_id is not None}


class _Computations:
    """Every shard computation as ``(worker, shards)``. The job's worker's first one waits
    until ``gate()`` holds, then runs ``then()``: the test's say in who computes what."""

    def __init__(self) -> None:
        self.record: list[tuple[str, list[int]]] = []
        self.gate: Callable[[], bool] = lambda: True
        self.then: Callable[[], None] = lambda: None


@pytest.fixture
def computations(monkeypatch: pytest.MonkeyPatch) -> _Computations:
    seen = _Computations()
    original = shard_work._compute

    def tracked(engine: Engine, settings: Settings, **kwargs: Any) -> None:
        worker_id = kwargs["worker_id"]
        if worker_id == "job-worker" and not seen.record:
            wait_until(seen.gate, "the test's condition on the shards", within_s=WAIT_S)
            seen.then()
        seen.record.append((worker_id, [shard.shard for shard in kwargs["shards"]]))
        original(engine, settings, **kwargs)

    monkeypatch.setattr(shard_work, "_compute", tracked)
    return seen


def _run(
    engine: Engine, settings: Settings, job_id: str, *, peers: dict[str, Settings]
) -> JobState:
    """Start the job's worker, then once it runs the job the ``peers`` (name: their settings);
    wait for the job's end."""
    stop = threading.Event()
    main, *others = [
        threading.Thread(
            target=worker.run_worker,
            args=(their_settings,),
            kwargs={"worker_id": name, "stop_event": stop},
        )
        for name, their_settings in {"job-worker": settings, **peers}.items()
    ]
    main.start()
    try:
        wait_until(
            lambda: _state(engine, job_id) == JobState.RUNNING, "job claimed", within_s=WAIT_S
        )
        for thread in others:
            thread.start()
        wait_until(
            lambda: _state(engine, job_id) not in (JobState.QUEUED, JobState.RUNNING),
            "job finished",
            within_s=WAIT_S,
        )
    finally:
        stop.set()
        for thread in (main, *others):
            if thread.ident is not None:  # started
                thread.join(timeout=WAIT_S)
    return _state(engine, job_id)


def _reference_table(spec: JobSpec, tmp_path: Path) -> pd.DataFrame:
    model, calib, _ = load_inputs(spec)
    rounder = rounder_for(model, calib, batch_size=spec.batch_size, workdir=tmp_path)
    options = {"method": spec.method, "formats": spec.options, "seed": spec.seed}
    return analyze(model, calib, batch_size=spec.batch_size, rounder=rounder, **options)


def _left_on_disk(settings: Settings, job_id: str) -> list[Path]:
    """Shard files in the published folder, and staging folders of any attempt."""
    return [
        *(settings.artifact_dir / job_id).rglob("*shard*"),
        *settings.artifact_dir.glob(".*.partial"),
    ]


def test_two_workers_compute_one_jobs_table_together(
    tmp_path: Path,
    db_url: str,
    engine: Engine,
    tiny_lms: dict[str, Path],
    computations: _Computations,
) -> None:
    settings = _service_settings(tmp_path, db_url)
    job_id, spec = _enqueue_lm_job(engine, tiny_lms)
    computations.gate = lambda: bool(_holders(engine) - {"job-worker"})  # the peer took one
    assert _run(engine, settings, job_id, peers={"peer": settings}) == JobState.SUCCEEDED
    assert {who for who, _ in computations.record} == {"job-worker", "peer"}
    assert sorted(i for _, shards in computations.record for i in shards) == [0, 1]
    reference = _reference_table(spec, tmp_path / "reference")
    model, calib, _ = load_inputs(spec)
    key = table_key(model, calib, method="fisher", formats=spec.options, batch_size=16, seed=0)
    cached = load_cached(settings.cache_dir, key)  # stored like a table computed alone
    assert cached is not None
    pd.testing.assert_frame_equal(cached, reference, check_exact=False, rtol=1e-6, atol=0)
    published = pd.read_csv(settings.artifact_dir / job_id / "sensitivity.csv")
    assert published["layer"].tolist() == reference["layer"].tolist()
    assert _rows(engine) == 0 and _left_on_disk(settings, job_id) == []


def test_a_dead_workers_shard_is_taken_again(
    tmp_path: Path,
    db_url: str,
    engine: Engine,
    tiny_lms: dict[str, Path],
    computations: _Computations,
) -> None:
    settings = _service_settings(tmp_path, db_url)
    job_id, _ = _enqueue_lm_job(engine, tiny_lms)
    ghost: list[Any] = []

    def ghost_claims() -> bool:  # a worker that takes a shard and dies at once
        ghost.extend(claim_shards(engine, worker_id="ghost", lease_s=0.5))
        return bool(ghost)

    computations.gate = ghost_claims
    assert _run(engine, settings, job_id, peers={}) == JobState.SUCCEEDED
    (taken,) = ghost
    assert computations.record == [("job-worker", [1 - taken.shard]), ("job-worker", [taken.shard])]
    assert _rows(engine) == 0 and _left_on_disk(settings, job_id) == []


def test_cancelling_the_job_closes_its_shards(
    tmp_path: Path,
    db_url: str,
    engine: Engine,
    tiny_lms: dict[str, Path],
    computations: _Computations,
) -> None:
    settings = _service_settings(tmp_path, db_url)
    job_id, _ = _enqueue_lm_job(engine, tiny_lms)
    ghost: list[Any] = []

    def cancel() -> None:
        with make_sessionmaker(engine)() as session:
            crud.request_cancel(session, job_id=job_id, owner_id=None)

    def ghost_claims() -> bool:  # holds its shard and never finishes it
        ghost.extend(claim_shards(engine, worker_id="ghost", lease_s=60))
        return bool(ghost)

    computations.gate, computations.then = ghost_claims, cancel
    assert _run(engine, settings, job_id, peers={}) == JobState.CANCELLED
    assert _rows(engine) == 0
    (held,) = ghost
    assert renew_shards(engine, shard_ids=[held.id], worker_id="ghost", lease_s=60) == 0
    assert claim_shards(engine, worker_id="idle", lease_s=60) == []
    assert not (settings.artifact_dir / job_id).exists() and _left_on_disk(settings, job_id) == []


def test_a_worker_without_the_shared_folder_leaves_its_shard_to_the_job(
    tmp_path: Path,
    db_url: str,
    engine: Engine,
    tiny_lms: dict[str, Path],
    computations: _Computations,
) -> None:
    settings = _service_settings(tmp_path, db_url)
    elsewhere = settings.model_copy(update={"artifact_dir": tmp_path / "not-shared"})
    job_id, spec = _enqueue_lm_job(engine, tiny_lms)

    def peer_failed() -> bool:
        with engine.connect() as connection:
            return bool(connection.scalar(select(func.max(SensitivityShard.failures))))

    computations.gate = peer_failed
    assert _run(engine, settings, job_id, peers={"peer": elsewhere}) == JobState.SUCCEEDED
    (tried,) = [shards for who, shards in computations.record if who == "peer"]
    by_job = sorted(i for who, shards in computations.record if who == "job-worker" for i in shards)
    assert by_job == [0, 1] and tried in ([0], [1])  # the job's worker took the failed one over
    model, calib, _ = load_inputs(spec)
    key = table_key(model, calib, method="fisher", formats=spec.options, batch_size=16, seed=0)
    cached = load_cached(settings.cache_dir, key)
    assert cached is not None
    reference = _reference_table(spec, tmp_path / "reference")
    pd.testing.assert_frame_equal(cached, reference, check_exact=False, rtol=1e-6, atol=0)
    assert _rows(engine) == 0 and not list((tmp_path / "not-shared").rglob("*.csv"))
