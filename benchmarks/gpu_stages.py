"""What each stage of a whole job costs on CUDA against the CPU: seconds and peak GPU memory.

Why: ``--device cuda`` runs every stage on the GPU, and whether that pays depends on the stage
and the model's size (a tiny model's kernels are too small to fill a GPU, and every batch pays
a launch and a copy). The tests marked ``gpu`` check that CUDA gives the CPU's numbers; this
script gives the time each stage takes there.

What runs: for each model and device, one ``run_job`` (what ``bitplan search`` runs) with
JobSpec's defaults except ``--trials``, ``--budget``, ``--method``, ``--rounding`` and
``--max-samples``, into a temporary folder, with no sensitivity-table cache (every run measures
its table). Each model is loaded once before the clock starts (a builtin model is trained on
its first use), and CUDA's one-time start (the context, cuBLAS's handle) is timed apart, so
neither lands in the first job's ``load`` stage. Stage times come from the
job's own :class:`~bitplan.search.stage_stats.StageRecorder`; a stage ends when the next one
reports, and CUDA kernels still queued then count towards the next stage (every stage here ends
on results read back to the host, so little is queued). Also shown: the best plan's held-out
error on each device (the same job, so close but not bitwise equal; see ``tests/gpu``).

Run: ``python -m benchmarks.gpu_stages [--models tiny-lm,digits-cnn] [--devices cpu,cuda]
[--trials 20] [--json PATH] [--record]``; it prints one markdown table per model, and
``--record`` writes them as the "CUDA against the CPU, per stage" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import machine_info, publish_report
from bitplan.search.pipeline import run_job
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.models import load_model

SECTION = "CUDA against the CPU, per stage"
MODELS = ("tiny-lm", "digits-cnn")


def cuda_start_seconds() -> float:
    """Seconds CUDA takes to start in this process: the context and a first matrix product."""
    start = time.perf_counter()
    x = torch.ones(64, 64, device="cuda")
    float((x @ x).sum())  # read back: the product has run
    return time.perf_counter() - start


def run_once(spec: JobSpec) -> dict[str, Any]:
    """One job: its wall seconds, stages (``StageRecorder``'s dicts) and best held-out error."""
    with tempfile.TemporaryDirectory(prefix="bitplan-gpu-stages-") as tmp:
        start = time.perf_counter()
        result = run_job(spec, out_dir=Path(tmp), cache_dir=None)
        seconds = time.perf_counter() - start
    best = next((p for p in result.points if p.plan_id == result.best_plan_id), None)
    return {
        "model": spec.model,
        "device": spec.device,
        "seconds": round(seconds, 3),
        "stages": result.stages,
        "best_plan": result.best_plan_id,
        "best_holdout_error": None if best is None else best.metrics["holdout"]["error"],
    }


def _cell(run: dict[str, Any] | None, stage: str, key: str) -> str:
    if run is None:
        return "-"
    value = next((s.get(key) for s in run["stages"] if s["stage"] == stage), None)
    if value is None:
        return "-"
    return f"{value / 2**20:.0f}" if key == "peak_gpu_bytes" else f"{value:.2f}"


def render(runs: list[dict[str, Any]], devices: Sequence[str], note: str) -> str:
    """One markdown table per model: a row per stage, seconds per device and CUDA's peak GPU
    memory, then the totals and the best plan's held-out error."""
    parts = [note]
    for model in dict.fromkeys(r["model"] for r in runs):
        by_device = {r["device"]: r for r in runs if r["model"] == model}
        stages = dict.fromkeys(s["stage"] for r in by_device.values() for s in r["stages"])
        head = " | ".join(f"{d} s" for d in devices)
        gpu = "cuda" in by_device
        lines = [
            f"### {model}",
            "",
            f"| stage | {head} |" + (" cuda peak GPU MiB |" if gpu else ""),
            "|---|" + "---:|" * (len(devices) + gpu),
        ]
        for stage in stages:
            cells = " | ".join(_cell(by_device.get(d), stage, "seconds") for d in devices)
            extra = f" {_cell(by_device['cuda'], stage, 'peak_gpu_bytes')} |" if gpu else ""
            lines.append(f"| {stage} | {cells} |{extra}")
        totals = " | ".join(f"**{by_device[d]['seconds']:.2f}**" for d in devices)
        lines.append(f"| **whole job** | {totals} |" + (" |" if gpu else ""))
        errors = ", ".join(
            f"{d} {by_device[d]['best_holdout_error']:.6g}"
            for d in devices
            if by_device[d]["best_holdout_error"] is not None
        )
        lines += ["", f"Best plan's held-out error: {errors}."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="builtin models, e.g. tiny-lm")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated: cpu, cuda")
    parser.add_argument("--trials", type=int, default=20, help="measured-search trials a job")
    parser.add_argument("--budget", default="4.5bpw")
    parser.add_argument("--method", default=None, help="sensitivity method (JobSpec's default)")
    parser.add_argument("--rounding", default=None, help="e.g. rtn,gptq (JobSpec's default)")
    parser.add_argument("--max-samples", type=int, default=None, help="calibration samples")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures")
    parser.add_argument("--record", action="store_true", help="write the RESULTS.md section")
    args = parser.parse_args(argv)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error(f"--devices names cuda, but torch {torch.__version__} sees no CUDA device")
    options: dict[str, Any] = {"budget": args.budget, "trials": args.trials}
    if args.method is not None:
        options["method"] = args.method
    if args.rounding is not None:
        options["rounding"] = args.rounding.split(",")
    if args.max_samples is not None:
        options["max_samples"] = args.max_samples
    models = [f"builtin:{name.strip()}" for name in args.models.split(",") if name.strip()]
    for model in models:
        load_model(model, device="cpu")  # trained and cached now, not in a timed job
    start = cuda_start_seconds() if "cuda" in devices else None
    runs = [
        run_once(JobSpec(model=model, device=device, **options))
        for model in models
        for device in devices
    ]
    settings = ", ".join(f"{k} {v}" for k, v in options.items())
    note = f"{machine_info()}\n\nOne job per model and device ({settings}; the rest JobSpec's)."
    if start is not None:
        note += f" CUDA's start, timed apart before the jobs: {start:.2f} s."
    report = {"machine": machine_info(), "cuda_start_seconds": start, "runs": runs}
    text = render(runs, devices, note)
    publish_report(text, report, section=SECTION, json_path=args.json, record=args.record)
    return runs


if __name__ == "__main__":
    main()
