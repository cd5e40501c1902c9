"""Runtime round trip: a searched plan, written for each runtime, loaded and measured there.

Why: bitplan scores a plan with its own fake quantization and counts its bytes by its own rules
(DESIGN §3). A runtime stores the plan in its own layout (torchao: one int8 a code;
compressed-tensors: codes packed into int32 words; GGUF: llama.cpp's blocks) and runs its own
kernels (llama.cpp also quantizes the activations). This benchmark measures, per target, how far
the runtime's size and held-out error are from the plan's figures, and what loading costs.

What runs, all offline on the CPU:

- models: ``builtin:tiny-lm`` (bitplan's byte-level GPT-style LM, trained on first use) and a
  random LLaMA built from a ``transformers.LlamaConfig`` (seeded; rows of 256 so llama.cpp's
  k-quants fit; no tokenizer: its calibration data is token windows it sampled itself, written
  as a ``.safetensors`` file of ``input_ids``, which ``bitplan.search`` accepts);
- one ``bitplan.search`` per model and target family, its ``plans/best.json`` applied:
  *ggml* (llama.cpp block formats, q/k/v fused as llama.cpp's gpt2 stores them) for ``gguf``;
  *int* (symmetric int8 per row and int4 per group, q/k/v and gate/up fused as vLLM runs them,
  embeddings and LM head left out as vLLM keeps them) for ``torchao`` and
  ``compressed-tensors``, which write tiny-lm as its transformers twin (an ``OPTForCausalLM``,
  :mod:`bitplan.search.builtin_hf`); the ``bitplan`` target takes every plan;
- ``bitplan.apply(..., to=target)``, then the runtime's own loader, timed: bitplan's
  ``load_artifact`` into a copy of the model, transformers' ``from_pretrained`` (torchao and
  compressed-tensors; compressed-tensors decompresses on the first forward pass, so the first
  forward is timed apart), llama-cpp-python's ``Llama``;
- held-out error through the runtime: KL(full precision ‖ runtime) per next-token position,
  averaged, on the held-out windows of the search's own seeded split: the metric and windows of
  the plan's ``metrics.holdout.error``, which is the ``bitplan`` column (and is re-measured here
  with bitplan's fake quantization as a check);
- bytes: the tensor data in the written files (read from their headers: safetensors, or
  gguf-py's reader) against the plan's ``total_bytes``, with the difference as each writer's
  report explains it.

Run: ``python -m benchmarks.runtimes [--quick] [--repeat 3] [--json PATH] [--no-write]``; it
prints the tables and writes the "Runtime round trip" section of ``benchmarks/RESULTS.md``
(``--quick``: fewer samples and trials, one load, nothing recorded).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # as a script its folder leads sys.path and benchmarks/sensitivity.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # would shadow the package

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors.torch import save_file

import bitplan
from benchmarks._common import Timer, machine_info, peak_rss_mb, publish_report
from bitplan.search.applier import PlanApplier
from bitplan.search.artifact import ArtifactReport, load_artifact, tensor_bytes_of
from bitplan.search.plans import Plan
from bitplan.search.runtime_compressed_tensors import CompressedTensorsReport
from bitplan.search.runtime_gguf import GgufReport
from bitplan.search.runtime_torchao import NOTE_FILE
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.data import load_calibration, split_calibration
from bitplan.sensitivity.models import LoadedModel, load_model

__all__ = ["kl_per_token", "main", "run_benchmark", "to_markdown"]

logger = logging.getLogger("benchmarks.runtimes")

SECTION = "Runtime round trip"
# The search's split, as JobSpec sets it by default: the held-out windows are these.
SPLIT = JobSpec(model="builtin:tiny-lm", budget="16bpw")
Logits = Callable[[torch.Tensor], torch.Tensor]  # input_ids [B, T] -> float32 logits [B, T, V]


@dataclass(frozen=True)
class Family:
    """One plan recipe: the formats a search may use and the runtime rules it must respect."""

    name: str
    formats: tuple[str, ...]
    budget: str
    fuse: str
    exclude: tuple[str, ...] = ()


# llama.cpp's block formats. 5 bpw sits between q4_k/q4_0 (4.5) and q5_k/q5_0 (5.5), so the plan
# mixes. q/k/v share a format: llama.cpp's gpt2 stores them as one tensor (a LLaMA does not
# need it; one recipe for both models keeps the family one plan).
GGML = Family("ggml", ("q8_0", "q6_k", "q5_k", "q4_k", "q5_0", "q4_0"), "5bpw", "qkv")
# What vLLM serves from a compressed-tensors checkpoint and transformers loads (symmetric 4- and
# 8-bit, fused sets in one format, no quantized embeddings or LM head); torchao stores all of it
# natively. 5 bpw sits between int4-g128 (4.125) and int8 (8.06 on rows of 256).
INT_FORMATS = ("int8", "int4-g32", "int4-g128")
INT = Family("int", INT_FORMATS, "5bpw", "qkv,gate_up", ("model.embed_tokens", "lm_head"))
# The same for tiny-lm: its MLP has no gate/up, and its embeddings (the token table, tied to the
# LM head, and the position table) are left out. Rows of 64 make int4-g128 one group a row.
INT_TINY_LM = Family("int", INT_FORMATS, "5bpw", "qkv", ("wte", "wpe"))


@dataclass(frozen=True)
class Case:
    """One model and one plan family, and the targets that plan is written for."""

    model: str  # the label in the tables
    family: Family
    targets: tuple[str, ...]


CASES = (
    Case("tiny-lm", GGML, ("bitplan", "gguf")),
    Case("tiny-lm", INT_TINY_LM, ("bitplan", "torchao", "compressed-tensors")),
    Case("llama", INT, ("bitplan", "torchao", "compressed-tensors")),
    Case("llama", GGML, ("bitplan", "gguf")),
)


@dataclass(frozen=True)
class Settings:
    """How much work a run does: the full run or the ``--quick`` smoke run."""

    trials: int  # measured-search trials per plan
    method: str  # sensitivity method
    tiny_lm_samples: int | None  # builtin text windows kept (None: all of them)
    llama_windows: int  # sampled windows of LLaMA tokens
    llama_tokens: int  # tokens a window
    repeat: int  # loads timed per target


FULL = Settings(
    trials=24, method="fisher", tiny_lm_samples=None, llama_windows=128, llama_tokens=64, repeat=3
)
QUICK = Settings(
    trials=2, method="weight", tiny_lm_samples=32, llama_windows=24, llama_tokens=32, repeat=1
)

# The random LLaMA: rows of 256 (a k-quant super-block), grouped-query attention like current
# LLaMAs, a vocabulary above 256 so token ids are not bytes. initializer_range 0.1 (transformers'
# default is 0.02) spreads the logits: on its own sampled windows the next-token entropy is
# ~5.0 nats against ln 512 = 6.24 (0.02: 6.19, nearly uniform).
LLAMA_CONFIG: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rope_theta": 10000.0,
    "initializer_range": 0.1,
}
SEED = 0


# --- the models and their data -----------------------------------------------------------------


def _llama_folder(folder: Path) -> Path:
    """A seeded random LlamaForCausalLM saved to ``folder`` (no tokenizer, nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIG)).save_pretrained(folder)
    return folder


def _sampled_windows(module: torch.nn.Module, *, windows: int, tokens: int) -> torch.Tensor:
    """``[windows, tokens]`` ids the model itself samples (temperature 1, seeded): text of its
    own distribution, the closest a random model has to in-domain data."""
    generator = torch.Generator().manual_seed(SEED)
    vocab = int(LLAMA_CONFIG["vocab_size"])
    ids = torch.randint(vocab, (windows, 1), generator=generator)  # (windows, 1)
    with torch.no_grad():
        for _ in range(tokens - 1):
            probs = module(input_ids=ids).logits[:, -1].float().softmax(-1)  # (windows, V)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


def _llama_data(folder: Path, path: Path, settings: Settings) -> Path:
    model = load_model(str(folder), device="cpu")
    ids = _sampled_windows(
        model.module, windows=settings.llama_windows, tokens=settings.llama_tokens
    )
    save_file({"input_ids": ids.contiguous()}, str(path))
    return path


@dataclass(frozen=True)
class Subject:
    """A model as ``bitplan.search`` takes it, with its calibration data."""

    label: str
    ref: str  # builtin:tiny-lm or a folder
    calib: str  # "builtin" or a .safetensors file
    max_samples: int | None


def _subjects(workdir: Path, settings: Settings) -> dict[str, Subject]:
    folder = _llama_folder(workdir / "llama")
    data = _llama_data(folder, workdir / "llama-windows.safetensors", settings)
    return {
        "tiny-lm": Subject("tiny-lm", "builtin:tiny-lm", "builtin", settings.tiny_lm_samples),
        "llama": Subject("llama", str(folder), str(data), None),
    }


def _held_out(subject: Subject, model: LoadedModel) -> torch.Tensor:
    """The held-out ``input_ids`` the search measured its plans on (its seeded split)."""
    data = load_calibration(subject.calib, model, max_samples=subject.max_samples)
    _, held = split_calibration(data, holdout=SPLIT.holdout, seed=SPLIT.seed)
    return held.inputs["input_ids"]


# --- error -----------------------------------------------------------------------------------


def kl_per_token(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference ‖ other) in nats over next-token positions of ``[B, T, V]`` logits.

    The last position predicts no token of the window, so it is left out, as bitplan's LM
    metric leaves it out (every token of these windows is real: no padding).
    """
    logp = reference[:, :-1].double().log_softmax(-1)  # (B, T-1, V)
    logq = other[:, :-1].double().log_softmax(-1)  # (B, T-1, V)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def _torch_logits(module: torch.nn.Module) -> Logits:
    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = module(input_ids=ids)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return logits.float()

    return run


def _fake_quant_logits(model: LoadedModel, plan: Plan, ids: torch.Tensor) -> torch.Tensor:
    """bitplan's own fake-quantized model on ``ids`` (the model is restored afterwards)."""
    formats = {lay.name: lay.format for lay in plan.layers}
    planned = [lay for lay in model.layers if lay.name in formats]
    with PlanApplier(model.module, planned) as applier:
        applier.apply({lay.group: formats[lay.name] for lay in planned})
        return _torch_logits(model.module)(ids)


# --- the runtimes' loaders ---------------------------------------------------------------------


def _load_bitplan(out: Path, model: LoadedModel) -> Logits:
    module = copy.deepcopy(model.module)  # a fresh instance the artifact overwrites
    load_artifact(out.parent, module)  # out: the report's path, the folder's model.safetensors
    return _torch_logits(module.eval())


def _load_transformers(out: Path, model: LoadedModel) -> Logits:
    from transformers import AutoModelForCausalLM

    return _torch_logits(AutoModelForCausalLM.from_pretrained(out).eval())


def _load_llama_cpp(out: Path, model: LoadedModel) -> Logits:
    import llama_cpp
    import numpy as np

    config = getattr(model.module, "config", None)  # tiny-lm has none: its context is 64 bytes
    n_ctx = int(getattr(config, "max_position_embeddings", 64))
    llm = llama_cpp.Llama(
        model_path=str(out),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=torch.get_num_threads(),
        verbose=False,
    )

    def run(ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for window in ids.tolist():  # one sequence at a time, from an empty cache
            llm.reset()
            llm.eval(window)
            rows.append(torch.from_numpy(np.array(llm.scores[: len(window)], dtype=np.float32)))
        return torch.stack(rows)  # (B, T, V)

    return run


LOADERS: dict[str, tuple[str, Callable[[Path, LoadedModel], Logits]]] = {
    "bitplan": ("bitplan load_artifact (into a copy of the model)", _load_bitplan),
    "torchao": ("transformers from_pretrained", _load_transformers),
    "compressed-tensors": ("transformers from_pretrained", _load_transformers),
    "gguf": ("llama-cpp-python Llama", _load_llama_cpp),
}


# --- bytes -------------------------------------------------------------------------------------


def _disk_bytes(report: ArtifactReport) -> tuple[int, int]:
    """``(tensor data bytes, file bytes)`` of the model files written, read from the files."""
    if report.path.suffix == ".gguf":
        import gguf

        tensors = gguf.GGUFReader(report.path).tensors
        return sum(int(t.n_bytes) for t in tensors), report.path.stat().st_size
    folder = report.path if report.path.is_dir() else report.path.parent
    files = sorted(folder.glob("*.safetensors"))
    return sum(tensor_bytes_of(f) for f in files), sum(f.stat().st_size for f in files)


def _explained(target: str, report: ArtifactReport, plan: Plan) -> tuple[int, str]:
    """The bytes beyond the plan's ``total_bytes`` as the writer's report accounts for them, and
    the account in words."""
    if isinstance(report, GgufReport):
        planned = report.planned_bytes - plan.totals.planned_bytes
        unplanned = report.unplanned_bytes - report.plan_unplanned_bytes
        words = (
            f"planned tensors {planned:+d}, other tensors (f32 norms, biases) {unplanned:+d}; "
            f"the file adds a {report.header_bytes} B header and {report.padding_bytes} B of "
            "alignment"
        )
        return planned + unplanned, words
    if isinstance(report, CompressedTensorsReport):
        parts = ", ".join(f"{k} {v:+d}" for k, v in report.extra_bytes.items() if v)
        return sum(report.extra_bytes.values()), parts or "none"
    if target == "torchao":
        note = json.loads((report.path / NOTE_FILE).read_text(encoding="utf-8"))
        layers = sum(e["bytes"] - e["plan_bytes"] for e in note["layers"])
        fallback = sum(1 for e in note["layers"] if e["not_torchao_because"])
        words = f"codes unpacked to int8 with an fp16 scale and int8 zero point a group {layers:+d}"
        if fallback:
            words += f" ({fallback} layer(s) stored dequantized)"
        conversion = (note.get("conversion") or {}).get("extra_bytes", {})
        for cause, nbytes in conversion.items():
            words += f", {cause} {nbytes:+d}"
        other = note["extra_bytes"] - layers - sum(conversion.values())
        if other:
            words += f", other tensors {other:+d}"
        return int(note["extra_bytes"]), words
    return report.total_bytes - plan.totals.total_bytes, "none: the packed codes are the plan's"


# --- one round trip ----------------------------------------------------------------------------


def _search(subject: Subject, family: Family, settings: Settings, out_dir: Path) -> Plan:
    result = bitplan.search(
        model=subject.ref,
        budget=family.budget,
        out_dir=out_dir,
        calib=subject.calib,
        formats=family.formats,
        fuse=family.fuse,
        exclude=family.exclude,
        method=settings.method,
        trials=settings.trials,
        seed=SPLIT.seed,
        holdout=SPLIT.holdout,
        max_samples=subject.max_samples,
        device="cpu",
    )
    logger.info("%s/%s: best plan %s", subject.label, family.name, result.best_plan_id)
    return bitplan.load_plan(path=out_dir / "plans" / "best.json")


def _plan_summary(plan: Plan) -> dict[str, Any]:
    counts = Counter(lay.format.name for lay in plan.layers)
    holdout = plan.metrics.get("holdout") or {}
    return {
        "bpw": plan.totals.bpw,
        "total_bytes": plan.totals.total_bytes,
        "planned_bytes": plan.totals.planned_bytes,
        "unplanned_bytes": plan.totals.unplanned_bytes,
        "formats": dict(sorted(counts.items())),
        "holdout_error": holdout.get("error"),
    }


def _round_trip(
    target: str,
    *,
    subject: Subject,
    model: LoadedModel,
    plan: Plan,
    held: torch.Tensor,
    reference: torch.Tensor,
    out_dir: Path,
    repeat: int,
) -> dict[str, Any]:
    """Apply ``plan`` for ``target``, load it ``repeat`` times, measure bytes and error."""
    with Timer() as applying:
        report = bitplan.apply(model=subject.ref, plan=plan, out_dir=out_dir, to=target)
    loader_name, loader = LOADERS[target]
    with Timer() as cold:  # the first load also pays the library's one-time set-up
        loader(report.path, model)(held[:1])
    loads, firsts = [], []
    logits: Logits | None = None
    for _ in range(repeat):
        logits = None  # the previous load is dropped before the next one is timed
        with Timer() as loading:
            logits = loader(report.path, model)
        with Timer() as first:
            logits(held[:1])
        loads.append(loading.seconds)
        firsts.append(first.seconds)
    assert logits is not None
    runtime_kl = kl_per_token(reference, logits(held))
    tensor_bytes, file_bytes = _disk_bytes(report)
    explained, words = _explained(target, report, plan)
    plan_error = (plan.metrics.get("holdout") or {}).get("error")
    return {
        "target": target,
        "loader": loader_name,
        "apply_s": applying.seconds,
        "cold_load_s": cold.seconds,
        "load_s": statistics.median(loads),
        "first_forward_s": statistics.median(firsts),
        "plan_total_bytes": plan.totals.total_bytes,
        "report_total_bytes": report.total_bytes,
        "tensor_bytes": tensor_bytes,
        "file_bytes": file_bytes,
        "extra_bytes": tensor_bytes - plan.totals.total_bytes,
        "explained_bytes": explained,
        "explanation": words,
        "runtime_kl": runtime_kl,
        "bitplan_kl": plan_error,
        "ratio": runtime_kl / plan_error if plan_error else None,
    }


def run_benchmark(*, workdir: Path, settings: Settings) -> dict[str, Any]:
    """Every case of :data:`CASES`; returns a JSON-ready dict."""
    load_average = os.getloadavg()[0]  # what else this machine was running (it is shared)
    subjects = _subjects(workdir, settings)
    cases = []
    for case in CASES:
        subject = subjects[case.model]
        tag = f"{case.model}-{case.family.name}"
        plan = _search(subject, case.family, settings, workdir / f"search-{tag}")
        model = load_model(subject.ref, device="cpu")
        held = _held_out(subject, model)
        reference = _torch_logits(model.module)(held)
        remeasured = kl_per_token(reference, _fake_quant_logits(model, plan, held))
        rows = []
        for target in case.targets:
            rows.append(
                _round_trip(
                    target,
                    subject=subject,
                    model=model,
                    plan=plan,
                    held=held,
                    reference=reference,
                    out_dir=workdir / f"{tag}-{target}",
                    repeat=settings.repeat,
                )
            )
            logger.info("%s %s: %s", tag, target, rows[-1])
        cases.append(
            {
                "model": case.model,
                "family": case.family.name,
                "formats": list(case.family.formats),
                "budget": case.family.budget,
                "fuse": case.family.fuse,
                "exclude": list(case.family.exclude),
                "plan": _plan_summary(plan),
                "held_out_windows": list(held.shape),
                "bitplan_kl_remeasured": remeasured,
                "targets": rows,
            }
        )
    return {
        "machine": machine_info(),
        "load_average": load_average,
        "settings": asdict(settings),
        "llama_config": LLAMA_CONFIG,
        "peak_rss_mb": peak_rss_mb(),
        "cases": cases,
    }


# --- the report --------------------------------------------------------------------------------


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"  # 1.000 vs 1.0003: exact runtimes show it


def _command(settings: Settings) -> str:
    quick = " --quick" if settings == QUICK else ""
    repeat = f" --repeat {settings.repeat}" if settings.repeat != FULL.repeat and not quick else ""
    return f"python -m benchmarks.runtimes{quick}{repeat}"


def to_markdown(report: dict[str, Any]) -> str:
    """The results section: the plans, then one row per (model, plan, target)."""
    settings = Settings(**report["settings"])
    plans = [
        "| model | plan | formats searched | budget | bpw | total_bytes | formats chosen "
        "(layers) | held-out windows | bitplan KL (plan) | re-measured here |",
        "|---|---|---|---|---:|---:|---|---|---:|---:|",
    ]
    rows = [
        "| model | plan | target | loader | cold s | load s | 1st forward s | plan total_bytes | "
        "tensor bytes on disk | Δ | Δ as the writer's report explains it | runtime KL | "
        "bitplan KL | runtime / bitplan |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for case in report["cases"]:
        plan = case["plan"]
        chosen = ", ".join(f"{fmt} ×{n}" for fmt, n in plan["formats"].items())
        windows = "×".join(str(n) for n in case["held_out_windows"])
        plans.append(
            f"| {case['model']} | {case['family']} | {', '.join(case['formats'])} | "
            f"{case['budget']} | {plan['bpw']:.2f} | {plan['total_bytes']} | {chosen} | "
            f"{windows} tokens | {_g(plan['holdout_error'])} | "
            f"{_g(case['bitplan_kl_remeasured'])} |"
        )
        for row in case["targets"]:
            check = "" if row["explained_bytes"] == row["extra_bytes"] else " (does NOT add up)"
            rows.append(
                f"| {case['model']} | {case['family']} | {row['target']} | {row['loader']} | "
                f"{row['cold_load_s']:.3f} | {row['load_s']:.3f} | {row['first_forward_s']:.3f} | "
                f"{row['plan_total_bytes']} | {row['tensor_bytes']} | {row['extra_bytes']:+d} | "
                f"{row['explanation']}{check} | {_g(row['runtime_kl'])} | "
                f"{_g(row['bitplan_kl'])} | {_ratio(row['ratio'])} |"
            )
    llama = report["llama_config"]
    return "\n".join(
        [
            f"Machine: {report['machine']}",
            "",
            f"`{_command(settings)}`: each plan is `plans/best.json` of a `bitplan.search` "
            f"({settings.trials} trials, `{settings.method}` sensitivity, seeded 25 % held-out "
            "split), written with `bitplan.apply(to=...)` and loaded by the runtime's own code; "
            f"*load s* is the median of {settings.repeat} load(s) after a first one (*cold*: "
            "load and first forward, with the library's one-time set-up). The 1-minute load "
            f"average at the start was {report['load_average']:.1f} on {os.cpu_count()} cores; "
            f"peak RSS {report['peak_rss_mb']:.0f} MiB.",
            "",
            "Models: `builtin:tiny-lm` on its builtin text; a random `LlamaForCausalLM` "
            f"(hidden {llama['hidden_size']}, {llama['num_hidden_layers']} layers, "
            f"{llama['num_attention_heads']} heads / {llama['num_key_value_heads']} KV heads, "
            f"MLP {llama['intermediate_size']}, vocabulary {llama['vocab_size']}, "
            f"initializer_range {llama['initializer_range']}, seed {SEED}) on "
            f"{settings.llama_windows} windows of {settings.llama_tokens} tokens it sampled "
            "itself. Plans: *ggml* (llama.cpp block formats, q/k/v in one format) for gguf; "
            "*int* (symmetric int8 per row / int4 per group, q/k/v and gate/up fused, embeddings "
            "and LM head excluded: what vLLM serves) for torchao and compressed-tensors, which "
            "write tiny-lm as a transformers `OPTForCausalLM` with its weights (OPT's position "
            "table has 2 more rows: `opt_position_rows`); the bitplan target takes both.",
            "",
            *plans,
            "",
            "KL: mean KL(full precision ‖ quantized) in nats per next-token position on the "
            "held-out windows of the search's split (bitplan's LM metric). *bitplan KL* is the "
            "plan's `metrics.holdout.error`; *re-measured here* recomputes it with bitplan's "
            "fake quantization on the same windows. Tensor bytes: tensor data in the written "
            "model files (safetensors headers, gguf-py's reader), file headers excluded; "
            "Δ = that − the plan's `total_bytes`. 1st forward: compressed-tensors decompresses "
            "its layers then.",
            "",
            *rows,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=FULL.repeat, help="loads timed per target")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: few samples and trials, one load, RESULTS.md left alone",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    settings = QUICK if args.quick else Settings(**{**asdict(FULL), "repeat": args.repeat})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="bitplan-runtimes-") as tmp:
        report = run_benchmark(workdir=Path(tmp), settings=settings)
    publish_report(
        to_markdown(report),
        report,
        section=SECTION,
        json_path=args.json,
        record=not (args.quick or args.no_write),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
