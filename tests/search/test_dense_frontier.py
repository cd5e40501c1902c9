"""A dense measured frontier near the budget: seeds, local moves, proxy correction, the gap.

The synthetic problem has a known measured error: the proxy with a per-group factor (some
groups matter more downstream than their local error says) plus a compounding term, so the
exact proxy frontier is close to, but not, the measured one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bitplan.app.summary import proxy_gap_note
from bitplan.search.frontier import Frontier, exact_frontier
from bitplan.search.guided import GuidedTrials
from bitplan.search.local_moves import Neighbourhood
from bitplan.search.measured import SearchResult, measured_search
from bitplan.search.pipeline import _seeds
from bitplan.search.points import Choice, Point
from bitplan.search.problem import LayerRow, Problem, build_problem
from bitplan.search.proxy_fit import ProxyFit, ProxyTable, fit_proxy, predicted, proxy_table
from bitplan.search.seeding import BAND, band_fractions
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import QuantFormat, parse_format, tensor_bytes

FORMATS = [
    parse_format(name)
    for name in (
        "int8",
        "int6-g128",
        "int5-g64",
        "int4-g128",
        "int4-g32",
        "int3-g64",
        "int2-g32-asym",
    )
]
SHAPES = [(256, 256), (512, 256), (256, 512), (1024, 256), (128, 512)]


class Synthetic:
    """24 layers of varied shapes; proxy error ``s_l · 4^-bpw`` per weight; measured error
    ``Σ φ_l e_l + 0.5 (Σ φ_l e_l)²`` with per-layer factors ``φ_l`` (log-normal, σ = 0.7)."""

    def __init__(self, seed: int, *, layers: int = 24) -> None:
        rng = np.random.default_rng(seed)
        rows, planned = [], []
        self.factor: dict[str, float] = {}
        for i in range(layers):
            r, c = SHAPES[rng.integers(len(SHAPES))]
            scale = float(rng.lognormal(0.0, 1.0))
            self.factor[f"l{i}"] = float(rng.lognormal(0.0, 0.7))
            for f in FORMATS:
                bpw = 8 * tensor_bytes(f, r, c) / (r * c)
                error = scale * 4.0**-bpw * r * c / 65536
                rows.append({"layer": f"l{i}", "format": f.name, "error": error})
            planned.append(
                LayerRow(
                    name=f"l{i}", param=f"l{i}.weight", numel=r * c, kind="linear", shape=(r, c)
                )
            )
        self.problem: Problem = build_problem(
            pd.DataFrame(rows),
            planned,
            unplanned_bytes=0,
            fp16_bytes=sum(2 * r.numel for r in planned),
        )
        self.proxy: ProxyTable = proxy_table(self.problem)
        self.frontier: Frontier = exact_frontier(self.problem)
        self.options = {g.key: g.formats for g in self.problem.groups}
        self.group_bytes = {
            g.key: dict(zip(g.formats, map(int, g.bytes), strict=True)) for g in self.problem.groups
        }

    def measured(self, choice: Choice) -> float:
        total = sum(self.factor[g] * self.proxy[g][f] for g, f in choice.items())
        return total + 0.5 * total**2

    def cap(self, fraction: float) -> int:
        """A cap ``fraction`` of the way from the smallest to the largest plan."""
        lo = sum(int(g.bytes.min()) for g in self.problem.groups)
        hi = sum(int(g.bytes.max()) for g in self.problem.groups)
        return int(lo + fraction * (hi - lo))

    def size(self, choice: Choice) -> int:
        return sum(self.group_bytes[g][f] for g, f in choice.items())

    def search(self, cap: int, *, trials: int, seed: int = 0, dense: bool = True) -> SearchResult:
        """The search as ``run_job`` runs it (``dense``), or as it ran before dense frontiers:
        four exact points just under the cap, eight spread over the range, uniform plans, no
        proxy."""
        seeds = _seeds(self.problem, self.frontier, cap, FORMATS) if dense else self.old_seeds(cap)
        return measured_search(
            options=self.options,
            group_bytes=self.group_bytes,
            cap_bytes=cap,
            evaluate=self.measured,
            seeds=seeds,
            proxy=self.proxy if dense else None,
            trials=trials,
            seed=seed,
        )

    def old_seeds(self, cap: int) -> list[Choice]:
        best = self.frontier.index_under(cap)
        assert best is not None
        picks = list(range(best, max(-1, best - 4), -1))
        picks += [i for i in self.frontier.spread(8) if self.frontier.bytes[i] <= cap]
        seeds: list[Choice] = [self.frontier.point(i).choice for i in picks]
        for fmt in FORMATS:
            choice = self.problem.uniform_choice(fmt)
            if choice is not None and self.size(choice) <= cap:
                seeds.append(choice)
        return seeds


def in_band(result: SearchResult, cap: int) -> int:
    """Measured frontier points with planned bytes in [0.85, 1] x cap."""
    return sum(BAND * cap <= p.planned_bytes <= cap for p in result.pareto)


@pytest.fixture(scope="module")
def synthetic() -> Synthetic:
    return Synthetic(3)


@pytest.mark.parametrize(("seed", "fraction"), [(0, 0.3), (1, 0.5), (3, 0.5)])
def test_16_trials_give_more_frontier_points_near_the_cap_than_the_old_seeding(
    seed: int, fraction: float
) -> None:
    case = Synthetic(seed)
    cap = case.cap(fraction)
    old = case.search(cap, trials=16, seed=seed, dense=False)
    new = case.search(cap, trials=16, seed=seed)
    # The old seeding measured four plans at the cap and spent the rest far below it.
    assert in_band(new, cap) >= in_band(old, cap) + 3
    assert in_band(new, cap) >= 7
    # ... and the plan the user is handed (the best under the cap) is no worse for it.
    assert min(p.error for p in new.pareto) <= min(p.error for p in old.pareto) * 1.001
    assert all(p.planned_bytes <= cap for p in new.trials)


def test_40_trials_give_a_dense_frontier(synthetic: Synthetic) -> None:
    cap = synthetic.cap(0.4)
    result = synthetic.search(cap, trials=40)
    assert in_band(result, cap) >= 14
    sources = [p.source for p in result.trials]
    assert {"seed", "local", "sampler"} <= set(sources)


def test_first_seeds_run_first_then_guided_and_sampler_trials_interleave(
    synthetic: Synthetic,
) -> None:
    cap = synthetic.cap(0.4)
    result = synthetic.search(cap, trials=20)
    sources = [p.source for p in result.trials]
    assert sources[:8] == ["seed"] * 8  # ceil(0.4 * 20) first seeds
    rest = sources[8:]
    assert "local" in rest[:2] and "sampler" in rest[:4]  # interleaved from the start
    assert rest.count("sampler") <= len(rest) // 4 + 1  # the sampler gets one slot in four


def _one_up_one_down(case: Synthetic, base: Choice, moved: Choice) -> None:
    """``moved`` differs from ``base`` in exactly two groups: one in its next larger format
    (fewest bytes above), the other in its next smaller one (most bytes below)."""
    changed = [g for g in base if base[g] != moved[g]]
    assert len(changed) == 2
    sizes = case.group_bytes
    ups = [g for g in changed if sizes[g][moved[g]] > sizes[g][base[g]]]
    downs = [g for g in changed if sizes[g][moved[g]] < sizes[g][base[g]]]
    assert len(ups) == len(downs) == 1
    (up,), (down,) = ups, downs
    above = [sizes[up][f] for f in case.options[up] if sizes[up][f] > sizes[up][base[up]]]
    below = [sizes[down][f] for f in case.options[down] if sizes[down][f] < sizes[down][base[down]]]
    assert sizes[up][moved[up]] == min(above)
    assert sizes[down][moved[down]] == max(below)


def test_local_moves_are_one_up_one_down_under_the_cap_best_value_first(
    synthetic: Synthetic,
) -> None:
    cap = synthetic.cap(0.4)
    base = synthetic.frontier.point(synthetic.frontier.index_under(cap)).choice
    hood = Neighbourhood(
        options=synthetic.options, group_bytes=synthetic.group_bytes, proxy=synthetic.proxy
    )
    fit = ProxyFit(log_scale=0.3, power=1.2, weights={"l0": 3.0, "l5": 0.2})
    moves = list(hood.moves(base, fit=fit, cap_bytes=cap, rate=1e-6))
    assert len(moves) > 50
    for move in moves:
        _one_up_one_down(synthetic, base, move.choice)
        assert move.nbytes == synthetic.size(move.choice) <= cap
        assert move.predicted == pytest.approx(fit.predict(move.choice, synthetic.proxy))
    values = [m.value for m in moves]
    assert values == sorted(values, reverse=True)
    # the cap binds: from the best plan under it many moves would overshoot and are left out
    unconstrained = list(hood.moves(base, fit=fit, cap_bytes=None, rate=1e-6))
    assert len(unconstrained) > len(moves)


def test_local_trials_of_a_search_are_moves_from_earlier_trials(synthetic: Synthetic) -> None:
    cap = synthetic.cap(0.4)
    result = synthetic.search(cap, trials=24)
    local = [p for p in result.trials if p.source == "local"]
    assert len(local) >= 6
    for point in local:
        earlier = [p for p in result.trials if p.number < point.number]
        bases = [p for p in earlier if sum(p.choice[g] != point.choice[g] for g in p.choice) == 2]
        assert bases, f"trial {point.number} is no one-up-one-down move of an earlier trial"
        _one_up_one_down(synthetic, bases[-1].choice, point.choice)
        assert point.planned_bytes <= cap


def test_later_seeds_go_by_the_corrected_proxy_and_uniform_plans_last(synthetic: Synthetic) -> None:
    cap = synthetic.cap(0.4)
    frontier = synthetic.frontier

    def exact(index: int) -> Choice:
        return frontier.point(index).choice

    def measured(choice: Choice, number: int) -> Point:
        size, error = synthetic.size(choice), synthetic.measured(choice)
        return Point(choice, size, calibration={"error": error}, source="seed", number=number)

    top, band = frontier.index_under(cap), frontier.index_under(int(BAND * cap))
    assert top is not None and band is not None
    uniform = synthetic.problem.uniform_choice(parse_format("int4-g128"))
    assert uniform is not None
    # larger than the measured plan at the band's bottom, and worse: dominated where it lies
    assert synthetic.size(exact(band)) < synthetic.size(uniform) <= cap
    assert synthetic.measured(uniform) > synthetic.measured(exact(band))
    # two exact plans in the gap between the measured ones at the band's bottom and the cap
    gap = [exact((2 * band + top) // 3), exact((band + top) // 2)]
    guided = GuidedTrials(
        neighbourhood=Neighbourhood(
            options=synthetic.options, group_bytes=synthetic.group_bytes, proxy=synthetic.proxy
        ),
        proxy=synthetic.proxy,
        later=[uniform, *gap],
        cap_bytes=cap,
        known=[measured(exact(top), 0), measured(exact(band), 1)],
    )
    picks = [guided.pick(1) for _ in range(3)]  # slot 1 is a later seed's
    assert [p[1] for p in picks if p] == ["seed", "seed", "local"]
    # the one predicted furthest below the measured frontier first: the larger, here
    assert [p[0] for p in picks[:2] if p] == [gap[1], gap[0]]
    # the uniform plan is predicted above the measured plan below it: it waits
    assert guided.later == [uniform]
    assert guided.pick(3) is None  # the sampler's slot


def test_later_seeds_with_nothing_measured_below_them_run_in_the_given_order(
    synthetic: Synthetic,
) -> None:
    cap = synthetic.cap(0.4)
    frontier = synthetic.frontier
    top = frontier.point(frontier.index_under(cap)).choice
    fitting = [
        u
        for f in FORMATS
        if (u := synthetic.problem.uniform_choice(f)) is not None and synthetic.size(u) <= cap
    ]
    guided = GuidedTrials(
        neighbourhood=Neighbourhood(
            options=synthetic.options, group_bytes=synthetic.group_bytes, proxy=synthetic.proxy
        ),
        proxy=synthetic.proxy,
        later=fitting,
        cap_bytes=cap,
        known=[
            Point(
                top, synthetic.size(top), calibration={"error": synthetic.measured(top)}, number=0
            )
        ],
    )
    # every uniform plan fits under the one measured plan's bytes and nothing is measured
    # below it: no prediction to compare, so they are neutral and run in the given order
    assert [guided.pick(1) for _ in range(len(fitting))] == [(dict(u), "seed") for u in fitting]


def _perturbed_plans(case: Synthetic, count: int, seed: int) -> list[tuple[Choice, float]]:
    """Plans near the exact frontier (three groups reassigned at random), measured."""
    rng = np.random.default_rng(seed)
    n = len(case.frontier)
    out = []
    for index in rng.integers(n // 4, 3 * n // 4, size=count):
        choice = dict(case.frontier.point(int(index)).choice)
        for g in rng.choice(list(choice), size=3, replace=False):
            choice[g] = case.options[g][rng.integers(len(case.options[g]))]
        out.append((choice, case.measured(choice)))
    return out


def _median_log_error(predict: list[float], measured: list[float]) -> float:
    return float(np.median(np.abs(np.log(np.asarray(predict) / np.asarray(measured)))))


@pytest.mark.parametrize("seed", [0, 2, 4])
def test_correction_reduces_the_proxy_error_on_held_out_trials(seed: int) -> None:
    case = Synthetic(seed)
    plans = _perturbed_plans(case, 80, seed)
    train, held_out = plans[:40], plans[40:]
    fit = fit_proxy(train, case.proxy)
    assert fit.model == "groups"
    # the baseline: the proxy times its best single scale on the same training trials
    scale = math.exp(np.mean([math.log(y / predicted(c, case.proxy)) for c, y in train]))
    measured = [y for _, y in held_out]
    scaled = _median_log_error([scale * predicted(c, case.proxy) for c, _ in held_out], measured)
    corrected = _median_log_error([fit.predict(c, case.proxy) for c, _ in held_out], measured)
    assert corrected < 0.7 * scaled
    # the learnt weights point the way of the true per-group factors
    groups = sorted(case.factor)
    rho = np.corrcoef(
        [math.log(fit.weights.get(g, 1.0)) for g in groups],
        [math.log(case.factor[g]) for g in groups],
    )[0, 1]
    assert rho > 0.5


def test_correction_of_an_exact_proxy_is_its_scale_and_stays_monotone(synthetic: Synthetic) -> None:
    plans = [
        (c, 2.5 * predicted(c, synthetic.proxy)) for c, _ in _perturbed_plans(synthetic, 30, 1)
    ]
    fit = fit_proxy(plans, synthetic.proxy)
    for choice, y in plans:
        assert fit.predict(choice, synthetic.proxy) == pytest.approx(y, rel=1e-6)
    assert fit.loo_error < 1e-6
    # no measurement, nothing usable, or one: the identity, or a scale
    assert fit_proxy([], synthetic.proxy) == ProxyFit()
    assert fit_proxy([(plans[0][0], -1.0)], synthetic.proxy) == ProxyFit()
    single = fit_proxy(plans[:1], synthetic.proxy)
    assert single.model == "scale" and single.log_scale == pytest.approx(math.log(2.5))
    # a format up never predicts more error, whatever the weights
    learnt = fit_proxy(_perturbed_plans(synthetic, 40, 2), synthetic.proxy)
    base = dict(plans[0][0])
    for g in base:
        ranked = sorted(synthetic.options[g], key=lambda f: synthetic.group_bytes[g][f])
        predictions = [learnt.predict({**base, g: f}, synthetic.proxy) for f in ranked]
        proxies = [synthetic.proxy[g][f] for f in ranked]
        for k in range(len(ranked) - 1):
            if proxies[k + 1] <= proxies[k]:  # a larger format with no more proxy error
                assert predictions[k + 1] <= predictions[k] + 1e-12


def test_dense_search_is_reproducible_with_a_seed(synthetic: Synthetic) -> None:
    cap = synthetic.cap(0.5)

    def trace(seed: int) -> list[tuple[str, tuple[QuantFormat, ...], float]]:
        result = synthetic.search(cap, trials=24, seed=seed)
        return [(p.source, tuple(p.choice.values()), p.error) for p in result.trials]

    first = trace(5)
    assert first == trace(5)
    assert first != trace(6)  # the sampler's trials follow the seed


def test_the_proxy_gap_is_reported(synthetic: Synthetic) -> None:
    cap = synthetic.cap(0.4)
    result = synthetic.search(cap, trials=30)
    gap = result.proxy_gap
    assert gap is not None and gap.trials == len(result.trials) == 30
    ratios = [p.error / predicted(p.choice, synthetic.proxy) for p in result.trials]
    assert gap.median_ratio == pytest.approx(float(np.median(ratios)))
    assert 0.5 < gap.spearman <= 1.0
    assert gap.corrected_error < gap.scaled_error
    note = proxy_gap_note(gap)
    assert note is not None and "30 trials" in note and f"{gap.spearman:.2f}" in note
    assert proxy_gap_note(None) is None
    # without a proxy there is no gap to report
    assert synthetic.search(cap, trials=4, dense=False).proxy_gap is None


def test_seeds_cover_the_band_coarse_to_fine_then_below_then_uniform(
    synthetic: Synthetic,
) -> None:
    fractions = band_fractions(16)
    assert fractions[:3] == pytest.approx([1.0, BAND, (1.0 + BAND) / 2])
    assert len(set(fractions)) == 16 and all(BAND <= f <= 1.0 for f in fractions)
    for head in (4, 8):  # every head is spread: no gap wider than twice the even spacing
        gaps = np.diff(sorted(fractions[: head + 1]))
        assert gaps.max() <= 2 * (1.0 - BAND) / head + 1e-12
    cap = synthetic.cap(0.4)
    seeds = _seeds(synthetic.problem, synthetic.frontier, cap, FORMATS)
    sizes = [synthetic.size(c) for c in seeds]
    assert all(s <= cap for s in sizes)
    assert sum(BAND * cap <= s for s in sizes) >= 16  # the band, with the plans next to the cap
    assert any(s < 0.6 * cap for s in sizes)  # a few below it
    assert seeds[0] == synthetic.frontier.point(synthetic.frontier.index_under(cap)).choice
    uniform = [synthetic.problem.uniform_choice(f) for f in FORMATS]
    fitting = [u for u in uniform if u is not None and synthetic.size(u) <= cap]
    assert fitting and seeds[-len(fitting) :] == fitting
    assert len({tuple(c.values()) for c in seeds}) == len(seeds)


def test_a_proxy_missing_a_format_is_rejected(synthetic: Synthetic) -> None:
    proxy = {g: dict(errors) for g, errors in synthetic.proxy.items()}
    del proxy["l3"][FORMATS[0]]
    with pytest.raises(InputError, match="l3.*int8"):
        measured_search(
            options=synthetic.options,
            group_bytes=synthetic.group_bytes,
            cap_bytes=synthetic.cap(0.5),
            evaluate=synthetic.measured,
            proxy=proxy,
            trials=2,
        )
