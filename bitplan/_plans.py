"""``bitplan.load_plan``, ``bitplan.solve`` and ``bitplan.apply``: working with plan files.

Thin keyword-only wrappers of the functions the CLI's ``solve`` and ``apply`` call
(:func:`~bitplan.search.plans.read_plan`, :func:`~bitplan.search.solve.solve_table`, the
writers of :data:`~bitplan.search.targets.TARGETS`), so scripts and the command line agree.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from bitplan._spec import PathLike
from bitplan.search.artifact import ArtifactReport
from bitplan.search.plans import Plan, read_plan
from bitplan.search.solve import DEFAULT_POINTS, SolveResult, solve_table
from bitplan.search.targets import DEFAULT_TARGET, target_writer
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import DATA_AWARE_ROUNDINGS
from bitplan.sensitivity.models import load_model
from bitplan.sensitivity.progress import ProgressFn
from bitplan.sensitivity.rounder import STATS_GLOB, Rounder

__all__ = ["apply", "load_plan", "solve"]

# Packing quantizes one chunk of rows at a time on the CPU; `bitplan apply` defaults to it too.
_APPLY_DEVICE = "cpu"


def load_plan(*, path: PathLike) -> Plan:
    """Read and validate a plan file (``bitplan.plan/v1``).

    The totals are recomputed from the layers and a file whose totals disagree is rejected with
    :class:`~bitplan.sensitivity.errors.InputError`. ``plan.layers`` lists each layer's
    ``name``, ``format`` and ``bytes``; ``plan.totals`` the ``total_bytes`` and ``bpw``;
    ``plan.metrics`` the predicted and measured errors.

    Example::

        bitplan.search(model="builtin:digits-cnn", budget="4bpw", out_dir="job")
        plan = bitplan.load_plan(path="job/plans/best.json")
        {layer.name: layer.format for layer in plan.layers}
    """
    return read_plan(Path(path))


def solve(
    *,
    table: PathLike,
    out_dir: PathLike,
    budget: str | None = None,
    points: int = DEFAULT_POINTS,
    progress: ProgressFn | None = None,
) -> SolveResult:
    """The exact proxy frontier of a sensitivity table, no model needed, like ``bitplan solve``.

    ``table`` is a CSV with columns ``layer, format, error[, bytes][, numel][, tie][, group]``
    (one :func:`~bitplan.analyze` wrote, or another tool's). Writes ``frontier.json``,
    ``frontier.csv`` and a plan for an even spread of ``points`` frontier points (plus the best
    one under ``budget``) into ``out_dir``. Returns the result: ``.file`` is the frontier file
    written (a :class:`Frontier`), ``.best_plan_id`` the plan the budget asks for (None without
    a budget), ``.frontier`` every Pareto-optimal plan of the additive proxy.

    Example::

        result = bitplan.solve(table="sens/sensitivity.csv", budget="4.5bpw", out_dir="solved")
        plan = bitplan.load_plan(path=f"solved/plans/{result.best_plan_id}.json")
    """
    return solve_table(
        Path(table), budget=budget, out_dir=Path(out_dir), points=points, progress=progress
    )


def apply(
    *,
    model: PathLike,
    plan: Plan | PathLike,
    out_dir: PathLike,
    to: str = DEFAULT_TARGET,
    device: str = _APPLY_DEVICE,
    rounding_stats: PathLike | None = None,
    model_name: str | None = None,
    cache_dir: PathLike | None = None,
) -> ArtifactReport:
    """Write ``model`` quantized per ``plan`` for a runtime, like ``bitplan apply --to``.

    ``to`` picks the target (:data:`~bitplan.search.targets.TARGETS`); the report's ``.path``
    is what that runtime opens:

    - ``"bitplan"`` (default): bit-packed safetensors whose tensor bytes equal the plan's
      ``total_bytes`` (checked before anything is written); ``.path`` is
      ``out_dir/model.safetensors``, and
      ``bitplan.search.artifact.load_artifact(out_dir, module)`` loads it back.
    - ``"torchao"``: a Hugging Face folder (Hugging Face models only) that
      ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` (or the model's own Auto
      class) loads with torchao tensors holding bitplan's codes; ``.path`` is ``out_dir``, and
      ``bitplan-torchao.json`` there lists how each layer was stored and its bytes next to
      the plan's.
    - ``"gguf"``: one GGUF file for llama.cpp (``builtin:tiny-lm`` and Hugging Face LLaMA and
      GPT-2 causal LMs, planned in llama.cpp's block formats); ``.path`` is
      ``out_dir/model.gguf``, and the report is a
      :class:`~bitplan.search.runtime_gguf.GgufReport` with the file's parts.
    - ``"compressed-tensors"``: a Hugging Face folder in the compressed-tensors format that
      vLLM and transformers load (Hugging Face models; plans vLLM cannot serve are refused);
      ``.path`` is ``out_dir``, and the report is a
      :class:`~bitplan.search.runtime_compressed_tensors.CompressedTensorsReport` that
      explains the bytes beyond the plan's.

    The last three need the ``runtimes`` extra. ``plan`` is a :class:`Plan` or the path of a
    plan file; it must have been made for this model (same weights). Layers the plan leaves out
    (excluded when it was made) stay unquantized. The report's ``.total_bytes`` is the data
    bytes of every stored tensor, ``.tensor_bytes`` each one's. ``out_dir`` must not be the
    model's own folder (its files would be replaced). That, an unknown ``to`` (the message lists
    the targets) and a missing runtime package each raise
    :class:`~bitplan.sensitivity.errors.InputError` before the model is read. ``model_name``
    is how the written files name the model (default: ``model`` as given; the service passes
    an upload's file name, never its stored path); ``cache_dir`` is where builtin weights and
    unzipped models are cached (default: ``BITPLAN_CACHE_DIR``, else the user cache).

    Layers planned with a data-aware rounding (``gptq``, ``awq``) are rounded from the input
    statistics the job left beside its plans (``rounding-stats-*.safetensors``):
    ``rounding_stats`` names that job folder, found by default next to a plan file's ``plans/``
    folder. The integers written are then exactly those the job measured.

    Example::

        report = bitplan.apply(
            model="builtin:digits-cnn", plan="job/plans/best.json", out_dir="packed"
        )
    """
    writer = target_writer(to)
    source = Path(os.fspath(model)).expanduser()
    if source.is_dir() and Path(out_dir).expanduser().resolve() == source.resolve():
        raise InputError(
            f"the output folder is the model's own folder ({source.name}), whose files the "
            "written model would replace; write it to another folder"
        )
    parsed = plan if isinstance(plan, Plan) else read_plan(Path(plan))
    rounder = _rounder(parsed, plan, rounding_stats)
    cache = None if cache_dir is None else Path(os.fspath(cache_dir))
    loaded = load_model(os.fspath(model), device=device, cache_dir=cache)
    planned = {layer.name for layer in parsed.layers}
    layers = [lay for lay in loaded.layers if lay.name in planned]
    loaded = replace(loaded, layers=layers, ref=model_name or loaded.ref)
    return writer(model=loaded, plan=parsed, out_dir=Path(out_dir), rounder=rounder)


def _rounder(plan: Plan, source: Plan | PathLike, stats: PathLike | None) -> Rounder:
    """What rounds ``plan``'s layers: the job's statistics when a layer needs them."""
    needs = sorted({lay.rounding for lay in plan.layers} & DATA_AWARE_ROUNDINGS)
    if not needs:
        return Rounder()
    if stats is not None:
        folders = [Path(os.fspath(stats)).expanduser()]
    elif isinstance(source, Plan):
        folders = []
    else:  # <job>/plans/<id>.json -> <job>
        folders = [Path(os.fspath(source)).expanduser().resolve().parent.parent]
    for folder in folders:
        found = Rounder.from_folder(folder)
        if found is not None:
            return found
    where = f" in {folders[0].name}/" if folders else ""
    raise InputError(
        f"the plan rounds layers with {', '.join(needs)}, computed from the job's calibration "
        f"inputs, but no rounding statistics ({STATS_GLOB}) were found{where}; give the job's "
        "folder with --rounding-stats"
    )
