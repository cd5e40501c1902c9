"""Peak memory of block-wise ``analyze`` and ``search`` against loading the whole model.

Why: block-wise runs (:mod:`bitplan.sensitivity.blockwise`, :mod:`bitplan.search.blockwise_eval`)
exist so that a model larger than memory can still get its sensitivity table and its measured
frontier. Their claims: they hold one transformer block's weights (plus the activations of the
data) instead of the whole model, the table is the whole model's, and a streamed measurement of
a plan is the whole model's (so the search finds the same plans with the same figures). This
script measures all three on one model.

What runs, offline on the CPU: a random LLaMA (seeded; 12 blocks, hidden 1024, vocabulary
32000, float32: 207 M parameters, 0.83 GB) is saved as a Hugging Face folder with a
``.safetensors`` file of 16 random windows of 128 tokens as calibration data. Then, each in a
fresh process:

- ``bitplan analyze --method layer --formats int8,int4-g128`` without and with ``--blockwise``,
  each once with glibc's default allocator settings and once with its mmap threshold fixed at
  1 MiB (``MALLOC_MMAP_THRESHOLD_=1048576``, the value the CLI fixes). glibc raises its
  threshold (up to 32 MiB) after large frees, so tensors of a few MiB, freed block after block,
  can stay in the heap; a fixed threshold returns them to the system. The CLI fixes it itself
  for checkpoints of 1 GiB or more (:mod:`bitplan.app.allocator`), so the default runs switch
  that off;
- ``bitplan search --method layer`` on the same data and formats (``--trials 4 --budget
  6bpw``, 8 of the samples: 6 for calibration, 2 held out) without and with ``--blockwise``,
  with the threshold fixed.

Each process reports its peak resident memory (``ru_maxrss``, which includes the ~0.4 GB that
importing torch and transformers costs) and its wall time; the ``sensitivity.csv`` files are
compared, and so are the two searches' frontiers (plan ids, held-out errors). Linux carries a
process's peak RSS across ``fork`` and ``exec``, so the model is written by a child too and this
process never imports torch: its own size would otherwise be every run's floor. ``--quick`` runs
a tiny model in seconds and leaves ``RESULTS.md`` alone.

Run: ``python -m benchmarks.blockwise_memory [--quick] [--json PATH]``; the full run took
7.3 minutes of user CPU on 2 cores (15.5 minutes of wall time beside other work).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bitplan.app.allocator import MMAP_THRESHOLD_BYTES, MMAP_THRESHOLD_LABEL

SECTION = "Block-wise memory"
MIB = 2**20

# Runs a CLI command in this (fresh) process and prints its peak RSS and seconds. With
# BITPLAN_BENCH_GLIBC_DEFAULT the CLI's own allocator setting (for large checkpoints) is
# skipped, so glibc keeps its defaults (MALLOC_MMAP_THRESHOLD_ would override either way).
_CHILD = """
import os, resource, sys, time
import bitplan.app.allocator as allocator
import bitplan.app.cli as cli
if os.environ.get("BITPLAN_BENCH_GLIBC_DEFAULT"):
    allocator.return_freed_memory = lambda *args, **kwargs: False
start = time.perf_counter()
try:
    cli.app(sys.argv[1:])
except SystemExit as exit:
    if exit.code:
        raise
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"RESULT {peak} {time.perf_counter() - start:.1f}")
"""

_GLIBC_DEFAULT = {"BITPLAN_BENCH_GLIBC_DEFAULT": "1"}
_FIXED_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}  # as the CLI fixes it
FIXED = f"mmap {MMAP_THRESHOLD_LABEL}"
_ALLOCATORS = {"glibc default": _GLIBC_DEFAULT, FIXED: _FIXED_THRESHOLD}


@dataclass(frozen=True)
class Settings:
    """The model and the data: a random LLaMA of ``blocks`` blocks of width ``hidden``."""

    blocks: int
    hidden: int
    vocab: int
    samples: int
    tokens: int
    search_samples: int
    trials: int = 4
    budget: str = "6bpw"
    formats: str = "int8,int4-g128"
    allocators: tuple[str, ...] = tuple(_ALLOCATORS)  # of the analyze runs


FULL = Settings(blocks=12, hidden=1024, vocab=32000, samples=16, tokens=128, search_samples=8)
# Seconds of work a process; the processes' start (importing torch) is most of the time.
QUICK = Settings(
    blocks=2,
    hidden=128,
    vocab=512,
    samples=8,
    tokens=16,
    search_samples=8,
    trials=2,
    allocators=(FIXED,),
)


def _write_model(folder: Path, settings: Settings) -> int:
    """A seeded random LLaMA in ``folder``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = settings.hidden
    config = LlamaConfig(
        vocab_size=settings.vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=settings.blocks,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _write_calib(path: Path, settings: Settings) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    shape = (settings.samples, settings.tokens)
    save_file({"input_ids": torch.randint(0, settings.vocab, shape, generator=gen)}, path)


def _run(root: Path, args: list[str], *, env: dict[str, str]) -> dict[str, float]:
    """A CLI command in a fresh process writing to ``root``: peak RSS bytes and seconds."""
    env = dict(os.environ, **env, BITPLAN_CACHE_DIR=str(root / "cache"))  # no shared table
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise RuntimeError(f"bitplan {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    peak, seconds = line.split()[1:]
    return {"peak_rss_bytes": int(peak), "seconds": float(seconds)}


def _prepare(root: Path, settings: Settings) -> int:
    """Write the model and the data from a child process; returns the parameter count."""
    write = (
        "import json, sys; from pathlib import Path; import benchmarks.blockwise_memory as b; "
        "s = b.Settings(**json.loads(sys.argv[2])); root = Path(sys.argv[1]); "
        "n = b._write_model(root / 'model', s); b._write_calib(root / 'calib.safetensors', s); "
        "print(n)"
    )
    done = subprocess.run(
        [sys.executable, "-c", write, str(root), json.dumps(asdict(settings))],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1])


def _frontier(folder: Path) -> list[tuple[str, float]]:
    data = json.loads((folder / "frontier.json").read_text(encoding="utf-8"))
    return [
        (p["plan_id"], p["metrics"]["holdout"]["error"]) for p in data["points"] + data["uniform"]
    ]


def run_benchmark(root: Path, settings: Settings) -> dict[str, Any]:
    """Every run of the module docstring under ``root``; the JSON-ready report."""
    load_at_start = os.getloadavg()[0]  # other work on the machine makes seconds noisy
    started = time.perf_counter()
    n_params = _prepare(root, settings)
    model, calib = str(root / "model"), str(root / "calib.safetensors")
    common = ["--calib", calib, "--method", "layer", "--formats", settings.formats]
    common += ["--device", "cpu"]
    runs: list[dict[str, Any]] = []
    for allocator in settings.allocators:
        env = _ALLOCATORS[allocator]
        for mode, extra in (("whole", []), ("blockwise", ["--blockwise"])):
            out = root / f"analyze-{mode}-{len(runs)}"
            args = ["analyze", model, *common, *extra, "-o", str(out)]
            runs.append({"command": "analyze", "mode": mode, "allocator": allocator})
            runs[-1].update(_run(out, args, env=env))
    search = [*common, "--budget", settings.budget, "--trials", str(settings.trials)]
    search += ["--max-samples", str(settings.search_samples)]
    frontiers = {}
    for mode, extra in (("whole", []), ("blockwise", ["--blockwise"])):
        out = root / f"search-{mode}"
        runs.append({"command": "search", "mode": mode, "allocator": FIXED})
        args = ["search", model, *search, *extra, "-o", str(out)]
        runs[-1].update(_run(out, args, env=_FIXED_THRESHOLD))
        frontiers[mode] = _frontier(out)
    tables = [path.read_bytes() for path in sorted(root.glob("analyze-*/sensitivity.csv"))]
    return {
        "settings": asdict(settings),
        "parameters": n_params,
        "checkpoint_bytes": sum(p.stat().st_size for p in (root / "model").glob("*.safetensors")),
        "runs": runs,
        "tables_identical": len(tables) == 2 * len(settings.allocators) and len(set(tables)) == 1,
        "frontiers_identical": frontiers["whole"] == frontiers["blockwise"],
        "frontier_points": len(frontiers["whole"]),
        "load_average": [load_at_start, os.getloadavg()[0]],
        "wall_seconds": time.perf_counter() - started,
    }


def to_markdown(report: dict[str, Any], machine: str) -> str:
    s = report["settings"]
    peaks = {(r["command"], r["mode"], r["allocator"]): r["peak_rss_bytes"] for r in report["runs"]}
    start, end = report["load_average"]
    lines = [
        f"Machine: {machine} · 1-minute load average {start:.1f} at the start, {end:.1f} at "
        "the end (other work on the machine makes seconds noisy, not peak RSS)",
        "",
        f"A seeded random LLaMA ({s['blocks']} blocks, hidden {s['hidden']}, vocabulary "
        f"{s['vocab']}, float32: {report['parameters'] / 1e6:.0f} M parameters, "
        f"{report['checkpoint_bytes'] / 1e9:.2f} GB of safetensors), {s['samples']} random "
        f"windows of {s['tokens']} tokens, `--method layer --formats {s['formats']}`; search: "
        f"`--trials {s['trials']} --budget {s['budget']} --max-samples {s['search_samples']}`. "
        "Each command runs in a fresh process; peak RSS is `getrusage`'s (it includes about "
        "400 MiB for importing torch and transformers). Reproduce: "
        "`python -m benchmarks.blockwise_memory`.",
        "",
        "| command | model | glibc malloc | peak RSS MiB | seconds |",
        "|---|---|---|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['command']} | {r['mode']} | {r['allocator']} | "
            f"{r['peak_rss_bytes'] / MIB:.0f} | {r['seconds']:.1f} |"
        )
    search = peaks[("search", "whole", FIXED)]
    streamed = peaks[("search", "blockwise", FIXED)]
    lines += [
        "",
        f"`{FIXED}`: glibc's mmap threshold fixed at {MMAP_THRESHOLD_LABEL}, as the CLI does by "
        "itself for checkpoints of 1 GiB or more (app/allocator.py). The whole run took "
        f"{report['wall_seconds'] / 60:.1f} minutes of wall time.",
        "",
        f"Sensitivity tables identical across the analyze runs: "
        f"{'yes' if report['tables_identical'] else 'NO'}. The block-wise search found the "
        f"same {report['frontier_points']} plans (frontier and uniform baselines) with the same "
        f"held-out errors as the whole-model search: "
        f"{'yes' if report['frontiers_identical'] else 'NO'}. Block-wise search peak / whole: "
        f"{streamed / search:.2f}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model; RESULTS.md left alone")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bitplan-blockwise-") as tmp:
        report = run_benchmark(Path(tmp), settings)
    # Only now: _common imports torch, and a child started after that would inherit its size.
    from benchmarks._common import machine_info, publish_report

    publish_report(
        to_markdown(report, machine_info()),
        report,
        section=SECTION,
        json_path=args.json,
        record=not args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
