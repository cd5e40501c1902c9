"""The documented Python API (``import bitplan``): light import, keyword-only functions with
JobSpec's defaults, the user-metric hook of ``search``, and the README's example, run verbatim."""

from __future__ import annotations

import inspect
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import bitplan
from bitplan._spec import DEFAULT_FORMATS, job_spec
from bitplan.search.artifact import tensor_bytes_of
from bitplan.search.plans import FrontierFile, Plan, read_frontier, read_plan
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.models import LoadedModel

README = Path(__file__).resolve().parents[1] / "README.md"
# The smallest search that still has a frontier: few trials, one batch per forward pass.
FAST = {"model": "builtin:digits-cnn", "budget": "4bpw", "trials": 6, "device": "cpu"}
FAST_BATCH = 512
HEAVY = ("torch", "pandas", "optuna", "numpy", "sklearn", "sqlalchemy", "fastapi")


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (N, 1, 8, 8)
    return x, torch.tensor(digits.target)


class Recorder:
    """A user metric (accuracy on sklearn's digits) that records, per call, whether the model
    it was given differs from the full-precision weights."""

    def __init__(self, full_precision: LoadedModel, rows: slice) -> None:
        self.original = {n: p.detach().clone() for n, p in full_precision.module.named_parameters()}
        x, y = _digits()
        self.x, self.y = x[rows], y[rows]
        self.quantized: list[bool] = []
        self.scores: list[float] = []

    def __call__(self, model: nn.Module) -> float:
        params = dict(model.named_parameters())
        assert params.keys() == self.original.keys()
        self.quantized.append(any(not torch.equal(params[n], w) for n, w in self.original.items()))
        score = (model(pixel_values=self.x).argmax(-1) == self.y).float().mean().item()
        self.scores.append(score)
        return score


@pytest.fixture(scope="module")
def metric_job(
    tmp_path_factory: pytest.TempPathFactory, digits_model: LoadedModel
) -> tuple[Path, FrontierFile, Recorder, Recorder]:
    out = tmp_path_factory.mktemp("metric-job")
    on_calib, on_holdout = (
        Recorder(digits_model, slice(0, 900)),
        Recorder(digits_model, slice(900, None)),
    )
    result = bitplan.search(
        **FAST,
        out_dir=out,
        batch_size=FAST_BATCH,
        metric=on_calib,
        holdout_metric=on_holdout,
    )
    return out, result.frontier, on_calib, on_holdout


def test_import_is_light() -> None:
    code = (
        "import json, sys, bitplan\n"
        "print(json.dumps({'all': bitplan.__all__, 'modules': sorted(sys.modules)}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout)
    assert set(loaded["all"]) == {
        "analyze",
        "search",
        "solve",
        "apply",
        "load_plan",
        "Plan",
        "Frontier",
    }
    heavy = [m for m in loaded["modules"] if m.split(".")[0] in HEAVY]
    assert "bitplan" in loaded["modules"] and heavy == []


def test_public_names_resolve_to_the_library() -> None:
    assert bitplan.Plan is Plan and bitplan.Frontier is FrontierFile
    for name in ("analyze", "search", "solve", "apply", "load_plan"):
        assert callable(getattr(bitplan, name)) and getattr(bitplan, name).__doc__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = bitplan.nope  # type: ignore[attr-defined]


def test_search_is_the_function_though_its_subpackage_is_imported() -> None:
    from bitplan.search import pipeline  # the subpackage stays importable under the same name

    assert sys.modules["bitplan.search"].__path__  # the package, in sys.modules
    assert inspect.isfunction(bitplan.search) and bitplan.search.__module__ == "bitplan._jobs"
    assert pipeline.run_job is not None


@pytest.mark.parametrize("name", ["analyze", "search", "solve", "apply", "load_plan"])
def test_every_argument_is_keyword_only(name: str) -> None:
    params = inspect.signature(getattr(bitplan, name)).parameters.values()
    assert params and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)


def test_positional_arguments_are_rejected() -> None:
    with pytest.raises(TypeError, match="positional"):
        bitplan.search("builtin:digits-cnn", "4bpw", "out")  # type: ignore[misc]
    with pytest.raises(TypeError, match="positional"):
        bitplan.load_plan("plan.json")  # type: ignore[misc]


@pytest.mark.parametrize("name", ["analyze", "search"])
def test_defaults_are_jobspecs(name: str) -> None:
    spec = JobSpec(model="m", budget="4bpw").to_dict()  # formats and pins by name
    params = inspect.signature(getattr(bitplan, name)).parameters
    shared = [p for p in params.values() if p.name in spec and p.name not in ("model", "budget")]
    assert len(shared) >= 12  # every job option but model and budget
    for p in shared:
        default = p.default
        if isinstance(default, tuple):
            default = list(default)
        elif not isinstance(default, str | int | float | type(None)):
            default = dict(default)  # the read-only pins mapping
        assert default == spec[p.name], p.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"holdout_metric": lambda m: 1.0},
            "holdout_metric only applies to a user metric: pass metric=",
        ),
        (
            {"higher_is_better": False},
            "higher_is_better only applies to a user metric: pass metric=",
        ),
        ({"metric": 0.9}, "metric must be a callable that takes the model"),
        ({"metric": lambda m: 1.0, "holdout_metric": "acc"}, "holdout_metric must be a callable"),
        ({"pins": ["fc1=int8"]}, "pins must be a mapping of layer pattern to format"),
        ({"trials": -1}, "trials"),
    ],
)
def test_conflicting_or_bad_arguments_say_the_fix(
    kwargs: dict[str, object], message: str, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        bitplan.search(**{**FAST, **kwargs}, out_dir=tmp_path / "job")  # type: ignore[arg-type]
    assert not (tmp_path / "job").exists()  # rejected before anything ran


@pytest.mark.parametrize(
    ("fuse", "rules"),
    [("qkv, gate_up", ["qkv", "gate_up"]), ([" gate_up ", ""], ["gate_up"]), ("", [])],
)
def test_fuse_names_are_stripped_as_the_cli_strips_them(
    fuse: str | list[str], rules: list[str]
) -> None:
    spec = job_spec(
        model="builtin:digits-cnn",
        budget="4bpw",
        calib="builtin",
        formats=DEFAULT_FORMATS,
        exclude=(),
        pins={},
        fuse=fuse,
    )
    assert spec.fuse == rules


def test_metric_scores_quantized_models(metric_job: tuple) -> None:
    _, _, on_calib, on_holdout = metric_job
    for recorder in (on_calib, on_holdout):
        # Called first on the full-precision model (the reference), then only on quantized ones.
        assert recorder.quantized[0] is False
        assert len(recorder.quantized) >= 3 and all(recorder.quantized[1:])


def test_metric_is_the_search_objective_and_the_held_out_figure(metric_job: tuple) -> None:
    out, frontier, on_calib, on_holdout = metric_job
    assert frontier.points and frontier.uniform
    for point in frontier.points + frontier.uniform:
        plan = read_plan(out / point.plan)
        for split, recorder in (("calibration", on_calib), ("holdout", on_holdout)):
            got = point.metrics[split]
            assert set(got) == {"error", "metric", "metric_ref"}
            assert got["metric_ref"] == recorder.scores[0]
            assert got["metric"] in recorder.scores[1:]
            assert got["error"] == got["metric_ref"] - got["metric"]  # higher is better
            assert plan.metrics[split] == got
    # The search ranked plans by the metric: bigger frontier plans score better on it.
    errors = [p.metrics["calibration"]["error"] for p in frontier.points]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)
    assert read_frontier(out / "frontier.json") == frontier


def test_lower_is_better_metric_flips_the_error(tmp_path: Path) -> None:
    x, y = _digits()

    def loss(model: nn.Module) -> float:
        return nn.functional.cross_entropy(model(pixel_values=x), y).item()

    result = bitplan.search(
        **FAST, out_dir=tmp_path, batch_size=FAST_BATCH, metric=loss, higher_is_better=False
    )
    for point in result.frontier.points + result.frontier.uniform:
        got = point.metrics["holdout"]  # the metric itself, as no holdout_metric was given
        assert got == point.metrics["calibration"]
        assert got["error"] == got["metric"] - got["metric_ref"]


def _quantized_only(value: object) -> Callable[[nn.Module], object]:
    """A metric returning 1.0 on the first (full-precision) call and ``value`` afterwards."""
    calls = []

    def metric(model: nn.Module) -> object:
        calls.append(model)
        return 1.0 if len(calls) == 1 else value

    return metric


def _raises(model: nn.Module) -> float:
    return 1 / 0


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        (
            _raises,
            "the metric raised ZeroDivisionError: division by zero (scoring the full-precision",
        ),
        (
            lambda m: math.nan,
            "the metric returned nan for the full-precision model; it must return a finite",
        ),
        (
            lambda m: torch.tensor(0.5),
            "the metric returned Tensor tensor(0.5000) for the full-precision model; "
            "it must return a float (use .item() for a tensor)",
        ),
        (
            lambda m: None,
            "the metric returned NoneType None for the full-precision model; "
            "it must return a float",
        ),
        (lambda m: True, "the metric returned bool True"),
        (_quantized_only(math.inf), "the metric returned inf for a quantized model"),
    ],
)
def test_a_bad_metric_is_an_input_error(
    metric: Callable[[nn.Module], float], message: str, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        bitplan.search(**FAST, out_dir=tmp_path, batch_size=FAST_BATCH, metric=metric)


def test_a_bad_holdout_metric_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="the held-out metric returned str 'x'"):
        bitplan.search(
            **FAST,
            out_dir=tmp_path,
            batch_size=FAST_BATCH,
            metric=lambda m: 1.0,
            holdout_metric=lambda m: "x",
        )


def test_analyze_solve_load_and_apply_mirror_the_cli(metric_job: tuple, tmp_path: Path) -> None:
    out, frontier, _, _ = metric_job
    table = bitplan.analyze(
        model="builtin:digits-cnn",
        out_dir=tmp_path / "sens",
        method="weight",
        formats="int8,int4-g128",
    )
    assert set(table["format"]) == {"int8", "int4-g128"}
    assert (tmp_path / "sens" / "sensitivity.csv").is_file()

    solved = bitplan.solve(
        table=tmp_path / "sens" / "sensitivity.csv", budget="6bpw", out_dir=tmp_path / "solved"
    )
    assert solved.best_plan_id is not None
    best = bitplan.load_plan(path=tmp_path / "solved" / "plans" / f"{solved.best_plan_id}.json")
    assert isinstance(best, bitplan.Plan) and best.totals.bpw <= 6.0

    plan = bitplan.load_plan(path=out / frontier.points[-1].plan)
    report = bitplan.apply(model="builtin:digits-cnn", plan=plan, out_dir=tmp_path / "packed")
    assert report.total_bytes == plan.totals.total_bytes == tensor_bytes_of(report.path)
    from_path = bitplan.apply(
        model="builtin:digits-cnn", plan=out / frontier.points[-1].plan, out_dir=tmp_path / "again"
    )
    assert from_path.total_bytes == report.total_bytes


def _readme_python_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the Python API section shows one example"
    return blocks[0]


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _readme_python_example()
    assert "bitplan.search(" in code and "metric=" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)  # verbatim, in a scratch folder
    result, plan = namespace["result"], namespace["plan"]
    assert isinstance(result.frontier, FrontierFile) and isinstance(plan, Plan)
    assert all("metric" in p.metrics["holdout"] for p in result.frontier.points)
    assert tensor_bytes_of(tmp_path / "packed" / "model.safetensors") == plan.totals.total_bytes
