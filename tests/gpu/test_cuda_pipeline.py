"""``--device cuda`` end to end: a whole ``bitplan search`` job and ``bitplan apply`` on CUDA,
checked against the CPU on the same plans; the stage costs name GPU memory; data-aware rounding
from statistics on disk rounds a CUDA weight.

The search job runs once (module fixture) on ``builtin:tiny-lm`` with a data-aware rounding, so
the rounding statistics, the sensitivity table, the measured search and the held-out validation
all run on CUDA; each of its plans is then measured again on the CPU from the same split. The
tolerances are :mod:`tests.gpu._compare`'s (tiny-lm has no convolution: no TF32 anywhere).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from bitplan.app.cli import app
from bitplan.search.applier import PlanApplier
from bitplan.search.pipeline import load_inputs
from bitplan.search.plans import FrontierPoint, read_frontier, read_plan
from bitplan.search.spec import JobSpec
from bitplan.search.stage_stats import StageRecorder
from bitplan.sensitivity.formats import parse_format
from bitplan.sensitivity.metrics import collect_reference, measure
from bitplan.sensitivity.rounder import Rounder
from bitplan.sensitivity.rounding import layer_error
from tests.gpu._compare import GPTQ
from tests.gpu.conftest import cache_without_tables

pytestmark = pytest.mark.gpu

runner = CliRunner()
MB = 2**20
MODEL = "builtin:tiny-lm"
BUDGET = "5bpw"
# The job's options: JobSpec fields as the CLI spells them (``--max-samples`` keeps it quick).
JOB = {
    "budget": BUDGET,
    "formats": "int8,int4-g32,int2-g16-asym",
    "rounding": "rtn,gptq",
    "trials": "8",
    "max-samples": "64",
}


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def cuda_job(tmp_path_factory: pytest.TempPathFactory, bitplan_cache_dir: Path) -> tuple[Path, str]:
    """The job's folder and the command's output; a cache of its own (the table is measured on
    CUDA here, never taken from a CPU run's cache)."""
    root = tmp_path_factory.mktemp("cuda-job")
    options = [part for key, value in JOB.items() for part in (f"--{key}", value)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITPLAN_CACHE_DIR", str(cache_without_tables(root, bitplan_cache_dir)))
        output = _cli("search", MODEL, *options, "--device", "cuda", "-o", str(root / "job"))
    return root / "job", output


def _cpu_spec() -> JobSpec:
    """The CUDA job's spec, on the CPU."""
    return JobSpec(
        model=MODEL,
        budget=BUDGET,
        formats=JOB["formats"].split(","),
        rounding=JOB["rounding"].split(","),
        max_samples=int(JOB["max-samples"]),
        device="cpu",
    )


def _cpu_holdout_errors(job: Path, points: list[FrontierPoint]) -> dict[str, float]:
    """Each point's plan measured on the CPU on the job's held-out split (the same seeded split
    of the same data), rounded from the statistics the CUDA job left beside its plans."""
    spec = _cpu_spec()
    model, _, holdout = load_inputs(spec)
    errors = {}
    with PlanApplier(model.module, model.layers, rounder=Rounder.from_folder(job)) as applier:
        reference = collect_reference(model, holdout, batch_size=spec.batch_size)
        for point in points:
            plan = read_plan(job / point.plan)
            applier.apply({layer.group: layer.format for layer in plan.layers})
            errors[point.plan_id] = measure(model, holdout, reference)["error"]
    return errors


def test_the_cuda_job_writes_valid_plans_whose_cpu_errors_match(cuda_job: tuple[Path, str]) -> None:
    job, _ = cuda_job
    frontier = read_frontier(job / "frontier.json")
    points = frontier.points + frontier.uniform
    assert frontier.points and frontier.uniform
    assert list(job.glob("rounding-stats-*.safetensors"))  # gptq's statistics, from CUDA
    for point in points:
        plan = read_plan(job / point.plan)  # validates the totals against the layers
        assert plan.totals.total_bytes == point.total_bytes
    assert all(p.bpw <= 5.0 + 1e-9 for p in frontier.points)
    assert any(
        layer.format.rounding == "gptq"
        for point in frontier.points
        for layer in read_plan(job / point.plan).layers
    ), "no frontier plan uses gptq: the data-aware path went untested"
    on_cpu = _cpu_holdout_errors(job, points)
    on_cuda = {p.plan_id: p.metrics["holdout"]["error"] for p in points}
    scale = max(on_cpu.values())
    worst = max(abs(on_cuda[k] - v) / v for k, v in on_cpu.items() if v > 0)
    print(f"search: held-out error, worst relative deviation CUDA vs CPU {worst:.2e}")
    for plan_id, cpu_error in on_cpu.items():
        allowed = GPTQ.rtol * cpu_error + GPTQ.floor * scale
        assert abs(on_cuda[plan_id] - cpu_error) <= allowed, (plan_id, on_cuda[plan_id], cpu_error)


def _stage_rows(output: str) -> dict[str, list[str]]:
    """The stage table the command printed (``format_stages``): ``[seconds, RSS, GPU,
    forwards]`` by stage name (a name may have spaces: a builtin model's training)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    assert lines[start].split() == "stage seconds peak RSS MiB peak GPU MiB forwards".split()
    rows = {}
    for line in lines[start + 1 :]:
        cells = line.split()
        if len(cells) < 5 or not cells[-4].replace(".", "", 1).isdigit():
            break  # the table has ended
        rows[" ".join(cells[:-4])] = cells[-4:]
    return rows


def test_the_cuda_job_reports_gpu_memory_per_stage(cuda_job: tuple[Path, str]) -> None:
    rows = _stage_rows(cuda_job[1])
    assert {"load", "analyze", "search", "validate"} <= set(rows)
    for stage in ("analyze", "search", "validate"):  # the model's weights at least: >= 1 MiB
        assert rows[stage][2] != "-" and int(rows[stage][2]) >= 1, rows[stage]


def _packed(tmp: Path, plan: Path, device: str) -> bytes:
    out = tmp / f"packed-{plan.stem}-{device}"
    _cli("apply", MODEL, str(plan), "-o", str(out), "--device", device)
    return (out / "model.safetensors").read_bytes()


def test_apply_on_cuda_writes_the_cpus_artifact(cuda_job: tuple[Path, str], tmp_path: Path) -> None:
    job, _ = cuda_job
    uniform = job / "plans" / "u-int4-g32.json"  # round to nearest: the very same integers
    assert _packed(tmp_path, uniform, "cuda") == _packed(tmp_path, uniform, "cpu")
    best = job / "plans" / "best.json"  # may hold gptq layers: codes near a boundary may flip
    on_cuda, on_cpu = _packed(tmp_path, best, "cuda"), _packed(tmp_path, best, "cpu")
    assert len(on_cuda) == len(on_cpu)
    differing = sum(a != b for a, b in zip(on_cuda, on_cpu, strict=True))
    print(f"apply best.json: {differing} of {len(on_cpu)} bytes differ between CUDA and CPU")
    assert differing <= len(on_cpu) // 100


def test_stage_stats_attribute_gpu_memory_to_the_stage_that_held_it() -> None:
    with StageRecorder() as recorder:
        recorder("small", 0, 1)
        small = torch.ones(MB // 4, device="cuda")  # 1 MiB
        recorder("big", 0, 1)
        big = torch.ones(64 * MB // 4, device="cuda")  # 64 MiB
        del big
        recorder("after", 0, 1)
    peaks = {s["stage"]: s["peak_gpu_bytes"] for s in recorder.stages()}
    assert peaks["big"] >= 64 * MB
    assert MB <= peaks["small"] < 64 * MB
    assert MB <= peaks["after"] < 64 * MB  # reset at the switch: big's tensor was gone
    del small


def test_statistics_on_disk_round_a_cuda_weight_on_its_device(tmp_path: Path) -> None:
    """Rounder statistics are memory-mapped on the CPU; GPTQ, AWQ, a parameter without
    statistics (rounded with ``H = I``) and the layer error all run on the weight's device."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=gen)  # (rows, cols)
    x = torch.randn(512, 96, generator=gen) * torch.linspace(0.1, 3.0, 96)  # (tokens, cols)
    gram = (x.T @ x).unsqueeze(0)  # (1, cols, cols): one block, as the statistics files hold
    save_file({"w": gram.contiguous()}, tmp_path / "rounding-stats-0.safetensors")
    # Two rounders: one would return the codes it cached for the CPU call.
    for_cpu, for_cuda = Rounder.from_folder(tmp_path), Rounder.from_folder(tmp_path)
    assert for_cpu is not None and for_cuda is not None
    for name in ("int4-g32+gptq", "int4-g32+awq", "int3-g32-asym+gptq"):
        fmt = parse_format(name)
        on_cpu = for_cpu.codes("w", w, fmt)
        on_cuda = for_cuda.codes("w", w.cuda(), fmt)
        assert on_cuda.q.is_cuda and on_cuda.scale.is_cuda, name
        agree = (on_cuda.q.cpu() == on_cpu.q).float().mean().item()
        assert agree >= 0.97, (name, agree)  # a group's clip (awq) may flip on float noise
        grid = fmt.with_rounding("rtn")
        cpu_error = layer_error(w, on_cpu, grid, gram[0])
        cuda_error = layer_error(w.cuda(), on_cuda, grid, gram[0])  # a CPU gram, a CUDA weight
        assert cuda_error == pytest.approx(cpu_error, rel=GPTQ.rtol), name
    unseen = for_cuda.codes("unseen", w.cuda(), parse_format("int4-g32+gptq"))
    assert unseen.q.is_cuda
