"""The two baseline allocators and the HAWQ-V3 sensitivities, on problems small enough to solve
by hand: both allocators must respect the budget, and the ILP must find the true optimum."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from benchmarks.baselines import greedy_promotion, hawq_table, hessian_traces, ilp_allocation
from bitplan.search.frontier import best_under, exact_frontier
from bitplan.search.problem import Group, Problem
from bitplan.sensitivity.data import CalibData
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import fake_quantize, parse_format
from bitplan.sensitivity.layers import find_quant_layers
from bitplan.sensitivity.models import LoadedModel


def _problem(spec: dict[str, list[tuple[str, int, float]]]) -> Problem:
    """``{group: [(format, bytes, error), ...]}`` as a Problem."""
    groups = [
        Group(
            key=k,
            members=[k],
            numel=64,
            formats=[f for f, _, _ in opts],
            bytes=np.array([b for _, b, _ in opts], dtype=np.int64),
            error=np.array([e for _, _, e in opts], dtype=np.float64),
        )
        for k, opts in spec.items()
    ]
    return Problem(groups=groups, layers=[], unplanned_bytes=0, fp16_bytes=0)


# Greedy takes A's cheap big win first (gain 4.5/byte), then B's (0.3/byte) and is stuck at
# 8 bytes with error 1.4; the optimum under 10 bytes is A=int8, B=int2 with error 1.0.
HAND = _problem(
    {
        "A": [("int8", 8, 0.0), ("int4", 4, 1.0), ("int2", 2, 10.0)],
        "B": [("int8", 8, 0.0), ("int4", 4, 0.4), ("int2", 2, 1.0)],
    }
)


def _brute_force(problem: Problem, cap: int) -> float:
    best = np.inf
    for pick in itertools.product(*(range(len(g.formats)) for g in problem.groups)):
        nbytes, error = problem.cost(problem.choice_of(pick))
        if nbytes <= cap:
            best = min(best, error)
    return best


def _random_problem(rng: np.random.Generator, n_groups: int) -> Problem:
    spec = {}
    for i in range(n_groups):
        n = int(rng.integers(1, 5))
        spec[f"g{i}"] = [(f"f{j}", int(rng.integers(1, 50)), float(rng.random())) for j in range(n)]
    return _problem(spec)


def test_greedy_matches_hand_computed_steps() -> None:
    choice = greedy_promotion(HAND, 10)
    assert choice == {"A": "int4", "B": "int4"}
    assert HAND.cost(choice) == (8, pytest.approx(1.4))


def test_ilp_finds_the_optimum_greedy_misses() -> None:
    choice = ilp_allocation(HAND, 10)
    assert choice == {"A": "int8", "B": "int2"}
    assert HAND.cost(choice) == (10, pytest.approx(1.0))


@pytest.mark.parametrize("cap", [4, 6, 16])
def test_both_at_the_ends_of_the_budget_range(cap: int) -> None:
    expected = {
        4: {"A": "int2", "B": "int2"},
        6: {"A": "int4", "B": "int2"},
        16: {"A": "int8", "B": "int8"},
    }[cap]
    assert greedy_promotion(HAND, cap) == expected
    assert ilp_allocation(HAND, cap) == expected


def test_greedy_skips_dominated_options_and_can_jump_past_the_next_one() -> None:
    # int6 costs more than int4 for no gain; from int2 the best gain per byte is straight to
    # int8 (10 / 6) rather than to int4 (1 / 2).
    problem = _problem(
        {"A": [("int2", 2, 10.0), ("int4", 4, 9.0), ("int6", 6, 9.5), ("int8", 8, 0.0)]}
    )
    assert greedy_promotion(problem, 8) == {"A": "int8"}
    assert greedy_promotion(problem, 7) == {"A": "int4"}


@pytest.mark.parametrize("seed", range(8))
def test_random_problems_respect_the_cap_and_ilp_is_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    problem = _random_problem(rng, n_groups=5)
    floor = sum(int(g.bytes.min()) for g in problem.groups)
    top = sum(int(g.bytes.max()) for g in problem.groups)
    for cap in np.linspace(floor, top, 6).astype(int):
        greedy = greedy_promotion(problem, int(cap))
        ilp = ilp_allocation(problem, int(cap))
        assert problem.cost(greedy)[0] <= cap
        assert problem.cost(ilp)[0] <= cap
        optimum = _brute_force(problem, int(cap))
        assert problem.cost(ilp)[1] == pytest.approx(optimum, rel=1e-9, abs=1e-12)
        assert problem.cost(greedy)[1] >= optimum - 1e-12
        assert best_under(exact_frontier(problem), int(cap)).predicted_error == pytest.approx(
            optimum, rel=1e-9, abs=1e-12
        )


def test_tiny_errors_are_not_lost_to_solver_tolerances() -> None:
    problem = _problem(
        {"A": [("int8", 8, 3e-9), ("int4", 4, 5e-9)], "B": [("int8", 8, 1e-9), ("int4", 4, 9e-9)]}
    )
    assert ilp_allocation(problem, 12) == {"A": "int4", "B": "int8"}


def test_cap_below_the_smallest_plan_is_an_input_error() -> None:
    for allocate in (greedy_promotion, ilp_allocation):
        with pytest.raises(InputError, match="smallest reachable 4"):
            allocate(HAND, 3)


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(pixel_values)


@pytest.fixture
def linear_model() -> tuple[LoadedModel, CalibData]:
    torch.manual_seed(0)
    module = _Linear().eval()
    model = LoadedModel(
        ref="test:linear",
        sha256="0",
        module=module,
        task="image-classification",
        layers=find_quant_layers(module),
        tokenizer=None,
        device=torch.device("cpu"),
    )
    x = torch.randn(16, 4)
    data = CalibData(inputs={"pixel_values": x}, labels=torch.randint(0, 3, (16,)), sha256="d")
    return model, data


def test_hutchinson_trace_matches_the_exact_hessian(
    linear_model: tuple[LoadedModel, CalibData],
) -> None:
    model, data = linear_model
    module = model.module
    weight = module.fc.weight.detach().clone()
    x, y = data.inputs["pixel_values"], data.labels

    def loss(w: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(x @ w.T + module.fc.bias.detach(), y)

    exact = torch.autograd.functional.hessian(loss, weight)  # (3, 4, 3, 4)
    trace = float(exact.reshape(12, 12).diagonal().sum())  # (12, 12): 12 weights
    # 400 probes: Hutchinson's relative error falls as 1/sqrt(probes), ~5 % here.
    module.fc.weight.requires_grad_(False)  # a frozen weight: traced, then frozen again
    estimate = hessian_traces(model, data, probes=400, batch_size=16, max_batches=1)
    assert estimate["fc.weight"] == pytest.approx(trace, rel=0.1)
    assert not module.fc.weight.requires_grad and module.fc.weight.grad is None


def test_hawq_table_weighs_weight_error_by_trace_per_weight(
    linear_model: tuple[LoadedModel, CalibData],
) -> None:
    model, _ = linear_model
    weight = model.module.fc.weight.detach()
    table = hawq_table(model, {"fc.weight": 2.4}, ["int8", "int2-g32-asym"])
    for fmt in ("int8", "int2-g32-asym"):
        delta = fake_quantize(weight, parse_format(fmt)) - weight
        expected = 2.4 / 12 * float(delta.double().square().sum())
        got = table.loc[table["format"] == fmt, "error"].item()
        assert got == pytest.approx(expected, rel=1e-6)
    assert (hawq_table(model, {"fc.weight": -1.0}, ["int8"])["error"] == 0).all()
    assert isinstance(table, pd.DataFrame) and set(table["layer"]) == {"fc"}
