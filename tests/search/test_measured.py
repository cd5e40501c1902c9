"""Measured multi-objective search: Pareto set, budget, seeds, reproducibility, interruption."""

from __future__ import annotations

import itertools
import math
import time

import optuna
import pytest

from bitplan.search import measured
from bitplan.search.measured import SearchResult, measured_search, pareto_front
from bitplan.search.points import Choice, Point, choice_names
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat, parse_format
from bitplan.sensitivity.progress import Cancelled

# The tests spell choices by format name; the search takes and returns parsed formats.
FORMATS = {name: parse_format(name) for name in ("int8", "int4", "int2")}
# Per-group (numel, sensitivity): different sizes and weights so the front is not trivial.
GROUPS = {"a": (4096, 1.0), "b": (1024, 5.0), "c": (2048, 0.3), "d": (512, 2.0)}
OPTIONS = {g: list(FORMATS.values()) for g in GROUPS}
GROUP_BYTES = {g: {f: n * f.bits // 8 for f in FORMATS.values()} for g, (n, _) in GROUPS.items()}
FULL = sum(GROUP_BYTES[g][FORMATS["int8"]] for g in GROUPS)


def parsed(names: dict[str, str]) -> dict[str, QuantFormat]:
    return {g: parse_format(name) for g, name in names.items()}


def synthetic_error(choice: Choice) -> float:
    """Additive, deterministic: each group loses ``weight · 4^-(bits/2)``."""
    return sum(GROUPS[g][1] * 4.0 ** (-f.bits / 2) for g, f in choice.items())


class Recorder:
    """An evaluate function that records its calls (by format name) and can fail on a given
    call."""

    def __init__(self, *, raise_on: int | None = None, exc: BaseException | None = None) -> None:
        self.calls: list[dict[str, str]] = []
        self.raise_on, self.exc = raise_on, exc

    def __call__(self, choice: dict[str, QuantFormat]) -> float:
        if self.raise_on is not None and len(self.calls) == self.raise_on:
            raise self.exc  # type: ignore[misc]
        self.calls.append(choice_names(choice))
        return synthetic_error(choice)


def size(names: dict[str, str]) -> int:
    return sum(GROUP_BYTES[g][parse_format(f)] for g, f in names.items())


def run(evaluate=synthetic_error, *, seeds: list[dict[str, str]] = (), **kw) -> SearchResult:
    """The search over GROUPS; ``seeds`` by format names."""
    args = dict(options=OPTIONS, group_bytes=GROUP_BYTES, cap_bytes=FULL // 2, trials=12)
    args.update(kw)
    return measured_search(evaluate=evaluate, seeds=[parsed(s) for s in seeds], **args)


def all_choices() -> list[dict[str, str]]:
    return [dict(zip(GROUPS, fs, strict=True)) for fs in itertools.product(FORMATS, repeat=4)]


def names(found: list[Point]) -> list[dict[str, str]]:
    return [choice_names(p.choice) for p in found]


def points(found: list[Point]) -> list[tuple[int, float]]:
    return [(p.planned_bytes, p.error) for p in found]


def test_pareto_equals_brute_force_front_when_every_choice_is_seeded() -> None:
    cap = FULL // 2
    rec = Recorder()
    result = run(rec, seeds=all_choices(), trials=len(all_choices()), cap_bytes=cap)

    feasible = [(size(c), synthetic_error(parsed(c))) for c in all_choices() if size(c) <= cap]
    truth = [p for p in feasible if not any(q[0] <= p[0] and q[1] < p[1] for q in feasible)]
    truth = sorted(set(truth), key=lambda p: p[0])
    truth = [p for i, p in enumerate(truth) if all(p[1] < q[1] for q in truth[:i])]
    assert [c.planned_bytes for c in result.pareto] == [p[0] for p in truth]
    assert [c.error for c in result.pareto] == pytest.approx([p[1] for p in truth])
    assert not result.interrupted
    # The budget is never broken, not even by a forward pass, and nothing is evaluated twice.
    assert all(size(c) <= cap for c in rec.calls)
    assert len({tuple(c.values()) for c in rec.calls}) == len(rec.calls)
    for cand in result.trials:
        assert cand.planned_bytes == size(choice_names(cand.choice)) <= cap
        assert cand.error == pytest.approx(synthetic_error(cand.choice))
        # the caller's own format objects come back, not names re-parsed from Optuna
        assert all(any(f is o for o in OPTIONS[g]) for g, f in cand.choice.items())


def test_pareto_front_filters_dominated_infeasible_and_nan_points() -> None:
    def trial(name: str, nbytes: int, error: float, number: int) -> Point:
        return Point(parsed({"a": name}), nbytes, calibration={"error": error}, number=number)

    cands = [
        trial("int8", 100, 0.5, 0),
        trial("int4", 50, 0.5, 1),  # dominates trial 0
        trial("int2", 30, 0.9, 2),
        trial("int3", 30, 0.9, 3),  # same point as trial 2: the earlier one stays
        trial("int5", 20, math.inf, 4),  # broken measurement
        trial("int6", 200, 0.1, 5),  # over the cap
        Point(parsed({"a": "fp16"}), 10, predicted_error=0.0, number=6),  # never measured
    ]
    front = pareto_front(cands, cap_bytes=150)
    assert [c.number for c in front] == [2, 1]
    assert [c.number for c in pareto_front(cands, cap_bytes=None)] == [2, 1, 5]


def test_search_finds_points_near_the_true_front_and_respects_cap() -> None:
    cap = int(FULL * 0.45)
    result = run(cap_bytes=cap, trials=40, seeds=[{g: "int2" for g in GROUPS}])
    assert len(result.trials) == 40
    assert result.pareto and all(c.planned_bytes <= cap for c in result.pareto)
    assert [c.planned_bytes for c in result.pareto] == sorted(
        c.planned_bytes for c in result.pareto
    )
    best_true = min(synthetic_error(parsed(c)) for c in all_choices() if size(c) <= cap)
    # 40 trials over 81 choices: the best found is within 1.5x of the optimum under the cap.
    assert min(c.error for c in result.pareto) <= 1.5 * best_true


def test_seeds_run_first_in_order_and_deduplicated() -> None:
    s1, s2 = ({g: f for g in GROUPS} for f in ("int4", "int2"))
    s3 = {"a": "int2", "b": "int4", "c": "int4", "d": "int8"}
    rec = Recorder()
    result = run(rec, seeds=[s1, s2, s1, s3], trials=6)
    assert rec.calls[:3] == [s1, s2, s3]
    assert [(c.number, c.source) for c in result.trials[:4]] == [
        (0, "seed"), (1, "seed"), (2, "seed"), (3, "sampler"),
    ]  # fmt: skip


def test_infeasible_sample_is_repaired_by_shrinking_the_largest_group_first() -> None:
    # Group "a" is the largest; one notch down (int8 -> int4) saves 2048 bytes, enough to fit.
    rec = Recorder()
    cap = FULL - 2048
    result = run(rec, seeds=[{g: "int8" for g in GROUPS}], trials=1, cap_bytes=cap)
    assert rec.calls == [{"a": "int4", "b": "int8", "c": "int8", "d": "int8"}]
    assert names(result.trials) == rec.calls
    assert result.trials[0].planned_bytes == cap


def test_pinned_groups_are_fixed_and_not_suggested() -> None:
    options = {**OPTIONS, "d": [FORMATS["int4"]]}
    rec = Recorder()
    result = run(rec, options=options, trials=8, storage=None)
    assert all(c["d"] == "int4" for c in rec.calls)
    assert all(c["d"] == "int4" for c in names(result.trials))


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
def test_same_seed_gives_same_trials(sampler: str) -> None:
    a = run(seed=7, trials=15, sampler=sampler)
    b = run(seed=7, trials=15, sampler=sampler)
    c = run(seed=8, trials=15, sampler=sampler)
    assert [(t.choice, t.planned_bytes, t.error) for t in a.trials] == [
        (t.choice, t.planned_bytes, t.error) for t in b.trials
    ]
    assert [t.choice for t in a.trials] != [t.choice for t in c.trials]


def test_tpe_sampler_completes_within_budget() -> None:
    cap = FULL // 2
    result = run(sampler="tpe", trials=20, cap_bytes=cap)
    assert len(result.trials) == 20 and not result.interrupted
    assert result.pareto and all(c.planned_bytes <= cap for c in result.trials)


def test_cancel_mid_search_keeps_finished_trials() -> None:
    rec = Recorder()
    seeds = [{**{g: "int2" for g in GROUPS}, "a": f} for f in FORMATS]
    cancel = lambda: len(rec.calls) >= 2  # noqa: E731
    result = run(rec, seeds=seeds, trials=30, cap_bytes=None, should_cancel=cancel)
    assert result.interrupted
    assert [t.number for t in result.trials] == [0, 1]
    assert result.pareto


def test_cancel_before_start_runs_nothing() -> None:
    rec = Recorder()
    result = run(rec, should_cancel=lambda: True)
    assert result.interrupted and result.trials == [] and rec.calls == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), Cancelled("stop")])
@pytest.mark.parametrize("trials", [9, 4])  # 4: the interrupted trial is the last one
def test_interrupt_inside_evaluate_keeps_earlier_trials(
    exc: BaseException, trials: int, caplog: pytest.LogCaptureFixture
) -> None:
    seeds = [{**{g: "int2" for g in GROUPS}, "a": f, "b": h} for f in FORMATS for h in FORMATS]
    rec = Recorder(raise_on=3, exc=exc)
    optuna.logging.enable_propagation()  # let caplog see Optuna's own failure reports
    try:
        result = run(rec, seeds=seeds, trials=trials, cap_bytes=None)
    finally:
        optuna.logging.disable_propagation()
    assert result.interrupted
    assert [t.number for t in result.trials] == [0, 1, 2]
    assert names(result.trials) == seeds[:3]
    assert result.pareto
    assert not any(r.exc_info for r in caplog.records)  # one line, no traceback spam


def test_timeout_stops_early_and_keeps_trials() -> None:
    def slow(choice: Choice) -> float:
        time.sleep(0.02)  # long enough that 1000 trials cannot fit in the timeout
        return synthetic_error(choice)

    result = run(slow, trials=1000, timeout=0.3, cap_bytes=None)
    assert result.interrupted
    assert 0 < len(result.trials) < 1000
    assert result.wall_s < 5.0
    assert 0.0 < result.eval_s <= result.wall_s


def test_progress_reported_after_each_trial() -> None:
    seen: list[tuple[str, int, int]] = []
    run(trials=5, progress=lambda *a: seen.append(a))
    assert seen == [("search", i, 5) for i in range(1, 6)]


def test_rdb_storage_continues_one_study(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    seeds = [{g: "int4" for g in GROUPS}]
    first_rec, second_rec = Recorder(), Recorder()
    first = run(first_rec, trials=5, seeds=seeds, storage=url, study_name="job-1")
    # On a shared storage ``trials`` is the study's total: 4 more make 9.
    second = run(second_rec, trials=9, seeds=seeds, storage=url, study_name="job-1", seed=1)
    assert [t.number for t in second.trials] == list(range(9))
    assert points(second.trials[:5]) == points(first.trials)
    # The seed already ran in the first call, and no known choice is measured again.
    assert not any(c in first_rec.calls for c in second_rec.calls)
    assert all(t.source == "sampler" for t in second.trials[5:])


@pytest.mark.filterwarnings(  # this test plays the dead worker with Optuna's own calls
    "ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage:UserWarning"
)
def test_a_dead_workers_running_trial_is_failed_when_its_heartbeat_stops(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(measured, "OPTUNA_GRACE_S", 1)  # 60 s in service; 1 s keeps this fast
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    run(trials=2, storage=url, study_name="job-1")
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.load_study(study_name="job-1", storage=storage)
    orphan = study.ask()  # a worker asked for a trial, beat once, then died
    storage.record_heartbeat(orphan._trial_id)
    time.sleep(2.1)  # SQLite's CURRENT_TIMESTAMP has whole seconds: 2 s apart is > 1 s late
    run(trials=2, storage=url, study_name="job-1", seed=1)
    state = optuna.load_study(study_name="job-1", storage=url).trials[orphan.number].state
    assert state == optuna.trial.TrialState.FAIL


def test_optuna_verbosity_is_restored() -> None:
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        run(trials=2)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_nan_error_is_ranked_worst_and_never_on_the_front() -> None:
    int2 = FORMATS["int2"]
    result = run(lambda c: math.nan if c["a"] == int2 else synthetic_error(c), trials=12)
    assert any(t.choice["a"] == int2 and t.error == math.inf for t in result.trials)
    assert all(c.choice["a"] != int2 for c in result.pareto)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"sampler": "cmaes"}, "unknown sampler 'cmaes'"),
        ({"trials": -1}, "trials must be >= 0"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"storage": "sqlite:///x.db"}, "needs a study_name"),
        ({"cap_bytes": 10}, f"smallest reachable {sum(n // 4 for n, _ in GROUPS.values())}"),
        ({"seeds": [{**{g: "int8" for g in GROUPS}, "a": "fp16"}]}, "allowed: int8, int4, int2"),
        ({"seeds": [{"a": "int8"}]}, "seed 0 gives no format for b, c, d"),
        ({"seeds": [{"zz": "int8"}]}, "unknown group 'zz'"),
        (
            {"group_bytes": {**GROUP_BYTES, "a": {FORMATS["int8"]: 1}}},
            "no byte count for int4, int2",
        ),
    ],
)
def test_bad_input_is_rejected(kw: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        run(**kw)
