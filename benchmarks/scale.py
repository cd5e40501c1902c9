"""Scale: peak memory and forward passes per stage of ``analyze`` and ``search`` (issue 9).

Issue 9 bounds a job by its checkpoint: peak RSS <= 1.3 x checkpoint bytes + 1 GB for
``analyze`` and ``search``, and a whole ``search --trials N`` within (N + frontier points + 6)
forward-equivalents of the calibration set. This script measures both on models built from a
config with seeded random weights (nothing downloaded), saved as Hugging Face folders:

- ``minilm``: a MiniLM-shaped ``BertModel`` (6 layers, hidden 384, 12 heads, intermediate 1536,
  vocab 30522) in float32, as that checkpoint ships;
- ``llama``: a ``LlamaForCausalLM`` in bfloat16 (hidden 2048, 16 layers, intermediate 5632,
  vocab 32000: 1.1 B parameters, 2.2 GB).

Calibration data is random token ids written as a ``.safetensors`` file (``input_ids`` and
``attention_mask``): no tokenizer is needed, and cost depends on the shapes, not the text. Each
of ``analyze`` and ``search`` runs in a fresh subprocess, so its peak RSS (``getrusage``) is its
own; the stages come from :class:`~bitplan.search.stage_stats.StageRecorder` (RSS sampled every
50 ms, samples forwarded by the model's top module). A measured process starts as the CLI and
the service's workers do, with glibc's mmap threshold fixed (:mod:`bitplan.app.allocator`),
and ``analyze`` runs once more with glibc's defaults to show what that buys;
``--default-allocator`` measures everything with glibc's defaults instead. ``--quick`` runs
tiny configs in seconds and leaves RESULTS.md alone.

Reproduce: ``python -m benchmarks.scale`` (``--quick`` for the smoke run).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from benchmarks._common import Timer, machine_info, peak_rss_mb, publish_report
from bitplan.app.allocator import MMAP_THRESHOLD_LABEL

SECTION = "Scale"
# The extra run that measures analyze without app/allocator.py's fixed mmap threshold.
DEFAULT_MALLOC_RUN = "analyze-default-malloc"
DEFAULT_MALLOC_LABEL = "analyze, glibc's default malloc"
GB = 10**9
MIB = 2**20
SEED = 0

MINILM_CONFIG: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
LLAMA_CONFIG: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
# Tiny twins for --quick: the same code paths, seconds of work.
QUICK_MINILM: dict[str, Any] = {
    **MINILM_CONFIG,
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
QUICK_LLAMA: dict[str, Any] = {
    **LLAMA_CONFIG,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


@dataclass(frozen=True)
class Subject:
    """One model to measure: its architecture, config, dtype and calibration shape."""

    name: str
    kind: str  # "bert" or "llama"
    config: dict[str, Any]
    dtype: str  # torch dtype name of the checkpoint
    samples: int  # calibration + held-out samples
    tokens: int  # tokens per sample


@dataclass(frozen=True)
class Settings:
    subjects: tuple[Subject, ...]
    trials: int
    budget: str = "4.5bpw"
    formats: tuple[str, ...] = ("int4", "int8")
    holdout: float = 0.25
    batch_size: int = 8
    # as the CLI and workers start (bitplan.app.allocator); False: glibc's own defaults
    fixed_mmap_threshold: bool = True


FULL = Settings(
    subjects=(
        Subject("minilm", "bert", MINILM_CONFIG, "float32", samples=64, tokens=128),
        Subject("llama", "llama", LLAMA_CONFIG, "bfloat16", samples=16, tokens=64),
    ),
    trials=4,
)
QUICK = Settings(
    subjects=(
        Subject("minilm", "bert", QUICK_MINILM, "float32", samples=16, tokens=16),
        Subject("llama", "llama", QUICK_LLAMA, "bfloat16", samples=16, tokens=16),
    ),
    trials=3,
)


# --- the models and their data -----------------------------------------------------------------


def build_model(subject: Subject, folder: Path) -> Path:
    """A seeded random model saved to ``folder`` in its checkpoint dtype (safetensors)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, subject.dtype)
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy of 1 B weights
        try:
            if subject.kind == "bert":
                module: torch.nn.Module = BertModel(BertConfig(**subject.config))
            else:
                module = LlamaForCausalLM(LlamaConfig(**subject.config))
        finally:
            torch.set_default_dtype(previous)
    module.save_pretrained(folder)
    return folder


def write_calibration(subject: Subject, path: Path) -> Path:
    """``samples`` rows of ``tokens`` random ids (the first ones of a BERT row are [CLS])."""
    generator = torch.Generator().manual_seed(SEED)
    vocab = int(subject.config["vocab_size"])
    ids = torch.randint(vocab, (subject.samples, subject.tokens), generator=generator)
    # (samples, tokens)
    mask = torch.ones_like(ids)
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}, str(path))
    return path


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def parameter_count(folder: Path) -> int:
    """Parameters stored in the folder's safetensors files (their headers only)."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 -- safe_open is not a Mapping
                total += math.prod(fh.get_slice(name).get_shape())
    return total


# --- one measured run (in its own process) ------------------------------------------------------


def measure_run(
    command: str, *, model: Path, calib: Path, out: Path, settings: Settings
) -> dict[str, Any]:
    """Run ``analyze`` or ``search`` here and return its stages, peak RSS and frontier size."""
    from bitplan.app.allocator import return_freed_memory
    from bitplan.search.pipeline import analyze_spec, run_job
    from bitplan.search.spec import JobSpec
    from bitplan.search.stage_stats import StageRecorder

    spec = JobSpec(
        model=str(model),
        calib=str(calib),
        budget=settings.budget,
        formats=list(settings.formats),  # type: ignore[arg-type]
        trials=settings.trials,
        holdout=settings.holdout,
        batch_size=settings.batch_size,
        device="cpu",
        seed=SEED,
    )
    cache = out / "cache"
    report: dict[str, Any] = {"command": command}
    if settings.fixed_mmap_threshold:
        report["fixed_mmap_threshold"] = return_freed_memory()
    with Timer() as timer:
        if command == "analyze":
            with StageRecorder() as recorder:
                analyze_spec(spec, out_dir=out, cache_dir=cache, progress=recorder)
            report["stages"] = recorder.stages()
        else:
            result = run_job(spec, out_dir=out, cache_dir=cache)
            report["stages"] = result.stages
            report["frontier_points"] = len(result.points)
            report["uniform_points"] = len(result.uniform)
    report["seconds"] = timer.seconds
    report["peak_rss_bytes"] = int(peak_rss_mb() * MIB)
    return report


def _in_subprocess(command: str, **paths: Path) -> dict[str, Any]:
    """:func:`measure_run` in a fresh interpreter, so its peak RSS is its own."""
    args = [sys.executable, "-m", "benchmarks.scale", "--run", command]
    for key, value in paths.items():
        args += [f"--{key}", str(value)]
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    last = done.stdout.strip().splitlines()[-1]
    report: dict[str, Any] = json.loads(last)
    return report


# --- the benchmark -----------------------------------------------------------------------------


def measure_subject(subject: Subject, settings: Settings, workdir: Path) -> dict[str, Any]:
    folder = workdir / subject.name
    with Timer() as build:
        build_model(subject, folder)
    calib = write_calibration(subject, workdir / f"{subject.name}-calib.safetensors")
    ckpt = checkpoint_bytes(folder)
    target = 1.3 * ckpt + GB
    logging.getLogger(__name__).info(
        "%s: %.2f GB checkpoint, built in %.0f s", subject.name, ckpt / GB, build.seconds
    )
    settings_file = workdir / "settings.json"
    settings_file.write_text(json.dumps(asdict(settings)), encoding="utf-8")
    plan = [("analyze", "analyze", settings_file), ("search", "search", settings_file)]
    if settings.fixed_mmap_threshold:
        # The same analyze with glibc's defaults: what fixing the threshold buys.
        default_file = workdir / "settings-default-malloc.json"
        default_settings = replace(settings, fixed_mmap_threshold=False)
        default_file.write_text(json.dumps(asdict(default_settings)), encoding="utf-8")
        plan.append((DEFAULT_MALLOC_RUN, "analyze", default_file))
    runs = {}
    for key, command, file in plan:
        out = workdir / f"{subject.name}-{key}"
        run = _in_subprocess(command, model=folder, calib=calib, out=out, settings=file)
        run["label"] = DEFAULT_MALLOC_LABEL if key == DEFAULT_MALLOC_RUN else command
        run["rss_target_bytes"] = target
        run["rss_ratio"] = run["peak_rss_bytes"] / target
        runs[key] = run
    search = runs["search"]
    forwards = sum(s["forward_equivalents"] or 0.0 for s in search["stages"])
    allowed = settings.trials + search["frontier_points"] + 6
    return {
        "subject": asdict(subject),
        "parameters": parameter_count(folder),
        "checkpoint_bytes": ckpt,
        "rss_target_bytes": target,
        "runs": runs,
        "search_forward_equivalents": forwards,
        "forward_target": allowed,
    }


def run_benchmark(*, workdir: Path, settings: Settings) -> dict[str, Any]:
    subjects = [measure_subject(s, settings, workdir) for s in settings.subjects]
    return {
        "machine": machine_info(),
        "settings": asdict(settings),
        "subjects": subjects,
        # wall times mean little on a machine busy with other work: say how busy it was
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _stage_table(run: dict[str, Any], ckpt: int) -> list[str]:
    rows = []
    for s in run["stages"]:
        rss = s["peak_rss_bytes"]
        fwd = s["forward_equivalents"]
        rows.append(
            f"| {run['label']} | {s['stage']} | {s['seconds']:.1f} | "
            f"{'-' if rss is None else f'{rss / GB:.2f}'} | "
            f"{'-' if rss is None else f'{rss / ckpt:.2f}'} | "
            f"{'-' if fwd is None else f'{fwd:.2f}'} |"
        )
    return rows


def wall_equivalents(search: dict[str, Any]) -> float:
    """The whole run's wall time in forward-equivalents: seconds over the reference stage's
    seconds per forward-equivalent (that stage runs nothing but forwards)."""
    reference = next(s for s in search["stages"] if s["stage"] == "reference")
    per_pass = reference["seconds"] / reference["forward_equivalents"]
    return float(search["seconds"] / per_pass)


def _verdict(value: float, target: float) -> str:
    return "yes" if value <= target else f"no (x{value / target:.2f})"


# Where a stage's memory goes, from the code (the tables say how much): the reading key for
# the stage tables.
MEMORY_NOTES = (
    "Reading the stage tables: `load` holds the checkpoint in its own dtype plus the Python, "
    "torch and transformers runtime (about 0.5 GB here). `collect` (fisher) adds the "
    "activations kept for backward, the loss's float32 logits and one weight gradient at a "
    "time. A small model (minilm) also keeps a Fisher sum per planned weight until `analyze` "
    "has scored it; once those sums would pass 256 MiB (llama) each gradient is folded "
    "straight into per-format errors during backward instead, which leaves `analyze` nothing "
    "to do (sensitivity/methods/_fisher_folds.py). `reference` adds the reference outputs; "
    "`search` and `validate` add, per layer being applied, a temporary copy of its original "
    "read back with plain reads (no memory map) from the plan applier's snapshot on disk "
    "(search/applier.py). With the fixed threshold, freed tensors go back to the system at once "
    "(app/allocator.py), which costs time: compare the `collect` seconds of the default-malloc "
    "row. "
    "Stage peaks are sampled every 50 ms; the run's peak is exact."
)


def to_markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    load = report.get("load_average")
    lines = [
        f"Machine: {report['machine']}"
        + ("" if load is None else f" · 1-minute load average at the end {load:.1f}"),
        "",
        "Seeded random models built from a config (no download), searched with "
        f"`--trials {settings['trials']} --budget {settings['budget']} --formats "
        f"{','.join(settings['formats'])} --batch-size {settings['batch_size']}` (fisher "
        "sensitivity) on random token ids; `analyze` and `search` each in a fresh process. "
        "Peak RSS per stage is sampled every 50 ms; the run's peak is `getrusage`'s. "
        "Forward-equivalents: samples through the model's top module over the calibration "
        "split's size (held-out passes count in the same unit, fisher's backward passes do "
        "not). "
        + (
            f"Each process fixes glibc's mmap threshold at {MMAP_THRESHOLD_LABEL}, as the CLI "
            "and the workers "
            "do for checkpoints of 1 GiB or more (app/allocator.py: llama here, not minilm, "
            "which runs as its row `analyze, glibc's default malloc` shows); that row repeats "
            "`analyze` without it, for comparison (not a command of its own). "
            if settings.get("fixed_mmap_threshold", True)
            else "Each process keeps glibc's default (dynamic) mmap threshold. "
        )
        + "Reproduce: `python -m benchmarks.scale`.",
        "",
        "| model | parameters | checkpoint GB | command | wall s | peak RSS GB | "
        "target GB (1.3 x ckpt + 1 GB) | peak / target | met |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for sub in report["subjects"]:
        name = f"{sub['subject']['name']} ({sub['subject']['dtype']})"
        for run in sub["runs"].values():
            lines.append(
                f"| {name} | {sub['parameters'] / 1e9:.3f} B | {sub['checkpoint_bytes'] / GB:.2f} "
                f"| {run['label']} | {run['seconds']:.0f} | {run['peak_rss_bytes'] / GB:.2f} "
                f"| {run['rss_target_bytes'] / GB:.2f} | {run['rss_ratio']:.2f} "
                f"| {_verdict(run['rss_ratio'], 1.0)} |"
            )
    lines += [
        "",
        "Search cost in forward-equivalents of the calibration set vs the target "
        "(N trials + frontier points + 6). Counted: forwards of the whole model. Wall: the "
        "whole `search` run's seconds over the seconds of one forward-equivalent (the "
        "reference stage's, which only runs forwards), so per-layer scoring and fisher's "
        "backward pass count too:",
        "",
        "| model | calibration samples x tokens | frontier points | counted | wall | "
        "target | counted met | wall met |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for sub in report["subjects"]:
        s = sub["subject"]
        calib = round(s["samples"] * (1 - settings["holdout"]))
        wall = wall_equivalents(sub["runs"]["search"])
        target = sub["forward_target"]
        lines.append(
            f"| {s['name']} | {calib} x {s['tokens']} | "
            f"{sub['runs']['search']['frontier_points']} | "
            f"{sub['search_forward_equivalents']:.2f} | {wall:.1f} | {target} | "
            f"{_verdict(sub['search_forward_equivalents'], target)} | "
            f"{_verdict(wall, target)} |"
        )
    for sub in report["subjects"]:
        lines += [
            "",
            f"Stages of {sub['subject']['name']}:",
            "",
            "| command | stage | seconds | peak RSS GB | RSS / checkpoint | forward-equivalents |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for run in sub["runs"].values():
            lines += _stage_table(run, sub["checkpoint_bytes"])
    lines += ["", MEMORY_NOTES]
    return "\n".join(lines)


def _settings_from(path: Path) -> Settings:
    raw = json.loads(path.read_text(encoding="utf-8"))
    subjects = tuple(Subject(**s) for s in raw.pop("subjects"))
    return Settings(subjects=subjects, **{**raw, "formats": tuple(raw["formats"])})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models; RESULTS.md left alone")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--only", default=None, help="measure one model: minilm or llama")
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="glibc's default mmap threshold, not the CLI's fixed one; RESULTS.md left alone",
    )
    # One measured run, as the benchmark starts it in a subprocess.
    parser.add_argument("--run", choices=("analyze", "search"), help=argparse.SUPPRESS)
    for key in ("model", "calib", "out", "settings"):
        parser.add_argument(f"--{key}", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.run:
        report = measure_run(
            args.run,
            model=args.model,
            calib=args.calib,
            out=args.out,
            settings=_settings_from(args.settings),
        )
        sys.stdout.write(json.dumps(report) + "\n")
        return 0
    settings = QUICK if args.quick else FULL
    if args.only:
        chosen = tuple(s for s in settings.subjects if s.name == args.only)
        if not chosen:
            parser.error(f"--only takes one of {', '.join(s.name for s in settings.subjects)}")
        settings = Settings(**{**asdict(settings), "subjects": chosen})
    if args.default_allocator:
        settings = replace(settings, fixed_mmap_threshold=False)
    with tempfile.TemporaryDirectory(prefix="bitplan-scale-") as tmp:
        report = run_benchmark(workdir=Path(tmp), settings=settings)
    publish_report(
        to_markdown(report),
        report,
        section=SECTION,
        json_path=args.json,
        record=not (args.quick or args.no_write or args.only or args.default_allocator),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
