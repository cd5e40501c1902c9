"""Model quality relative to the full-precision model on the same inputs (DESIGN §7).

The search needs one lower-is-better number that is exactly 0 for the unchanged model; people
need the task's usual metrics. :func:`collect_reference` runs the full-precision model once
over a :class:`~bitplan.sensitivity.data.CalibData` and keeps what later comparisons need (bounded
memory: see :mod:`bitplan.sensitivity.divergence`); :func:`measure` runs the (quantized) model over
the same data and returns ``{"error": ..., <task metrics>}``:

================================  ===========================================  ===============
task                              metrics                                      ``error``
================================  ===========================================  ===============
image- / text-classification      ``kl`` (ref ‖ quant, mean per sample),       ``kl``
                                  ``agreement`` (top-1 vs ref); with labels
                                  ``accuracy`` and ``accuracy_ref``
text-generation (causal LM)       next-token ``kl`` (mean per token),          ``kl``
                                  ``agreement``, ``perplexity``,
                                  ``perplexity_ref``
feature-extraction                ``cosine`` (mean over samples)               ``1 - cosine``
any other output tensor           ``rel_mse`` (Σ‖Δ‖² / Σ‖ref‖²), ``sqnr_db``   ``rel_mse``
================================  ===========================================  ===============

LM positions: the logits at position ``t`` predict token ``t + 1``; a position counts when both
tokens are real (``attention_mask`` 1 at ``t`` and ``t + 1``). Reference and measurement must
batch the data the same way (:func:`measure` uses the reference's batch size by default): equal
batches give bitwise-equal outputs, hence an ``error`` of exactly 0 for the unchanged model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from bitplan.sensitivity.data import CLASSIFICATION_TASKS, CalibData
from bitplan.sensitivity.divergence import TokenDistributions, compare, compress
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.half_products import float32_products
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report

if TYPE_CHECKING:
    from bitplan.sensitivity.models import LoadedModel

__all__ = [
    "OutputKind",
    "Reference",
    "collect_reference",
    "counted_positions",
    "forward_output",
    "measure",
    "output_kind",
]

logger = logging.getLogger(__name__)

OutputKind = Literal["classification", "lm", "embedding", "tensor"]
# SQNR of an output with no noise at all: 300 dB is a noise power 1e-30 of the signal, beyond
# float64's meaningful range; a number, not inf, so metrics stay valid JSON.
MAX_SQNR_DB = 300.0


def output_kind(task: str) -> OutputKind:
    """How a task's outputs are compared: the rows of the table in the module docstring."""
    if task in CLASSIFICATION_TASKS:
        return "classification"
    kinds: dict[str, OutputKind] = {"text-generation": "lm", "feature-extraction": "embedding"}
    return kinds.get(task, "tensor")


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``[B, T, D]`` over real tokens (``mask`` 1): ``[B, D]``."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def forward_output(model: LoadedModel, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensor that metrics compare: ``model.module(**batch)`` reduced to one tensor.

    Logits when the output has them; a ``last_hidden_state`` mean-pooled over the
    ``attention_mask`` (``[B, D]``); the first element of a tuple; a raw tensor as is. Runs in
    whatever grad mode the caller set and leaves the result on the model's device, so gradient
    based methods can use it too.
    """
    with float32_products(model.module):
        out = model.module(**batch)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]  # Hugging Face's return_dict=False order: the main output first
    if isinstance(out, Mapping):  # ModelOutput is a Mapping of its non-None fields
        if out.get("logits") is not None:
            logits: torch.Tensor = out["logits"]
            return logits
        if out.get("last_hidden_state") is not None:
            return _mean_pool(out["last_hidden_state"], batch.get("attention_mask"))
        out = next((v for v in out.values() if isinstance(v, torch.Tensor)), out)
    if not isinstance(out, torch.Tensor):
        raise InputError(
            f"{model.ref} returned {type(out).__name__}; bitplan needs a tensor, "
            "a tuple, or an output with logits or last_hidden_state"
        )
    return out


@dataclass
class Reference:
    """What the full-precision model produced on one :class:`CalibData`.

    ``dist`` holds the output distributions (classification: one row a sample; LM: one row a
    counted position); ``outputs`` the float32 pooled embeddings or raw output tensors;
    ``baseline`` the reference's own metrics (``accuracy_ref``, ``perplexity_ref``, and the
    output power ``signal`` for tensors).
    """

    kind: OutputKind
    data_sha256: str
    n_samples: int
    batch_size: int
    dist: TokenDistributions | None = None
    outputs: torch.Tensor | None = None
    baseline: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Memory held by the stored outputs."""
        held = 0 if self.dist is None else self.dist.nbytes
        if self.outputs is not None:
            held += self.outputs.numel() * self.outputs.element_size()
        return held


def _run(
    model: LoadedModel,
    data: CalibData,
    batch_size: int,
    given_outputs: Iterable[torch.Tensor] | None,
) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
    """``(first sample index, batch, output)`` over ``data`` on the model's device, no grad;
    the outputs are ``given_outputs`` (one a batch, in order) when given, else the model's."""
    start = 0
    batches = data.batches(batch_size, device=model.device)
    pairs: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]
    with torch.no_grad():
        if given_outputs is None:
            pairs = ((batch, forward_output(model, batch)) for batch in batches)
        else:
            pairs = zip(batches, given_outputs, strict=True)
        for batch, out in pairs:
            yield start, batch, out
            start += next(iter(batch.values())).shape[0]


def _rows(
    kind: OutputKind, model: LoadedModel, batch: dict[str, torch.Tensor], out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Distribution rows ``[M, V]`` of one batch and, for LMs, the next-token targets ``[M]``."""
    if kind == "classification":
        if out.dim() != 2:
            raise InputError(
                f"{model.task} model {model.ref} must output logits "
                f"[batch, classes], got shape {list(out.shape)}"
            )
        return out, None
    ids = batch.get("input_ids")
    if ids is None or out.dim() != 3 or out.shape[:2] != ids.shape:
        raise InputError(
            f"text-generation needs input_ids [B, T] and logits [B, T, V]; got "
            f"inputs {sorted(batch)} and output shape {list(out.shape)}"
        )
    counted = counted_positions(batch.get("attention_mask"), ids.shape, ids.device)  # (B, T-1)
    return out[:, :-1][counted], ids[:, 1:][counted]  # (M, V), (M,)


def counted_positions(
    mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """``[B, T-1]`` bool: LM position ``t`` counts when tokens ``t`` and ``t + 1`` are both real.

    ``mask`` is the batch's ``attention_mask`` ``[B, T]`` (None: every token is real).
    """
    real = torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
    return real[:, :-1] & real[:, 1:]  # (B, T-1)


def _labels(labels: torch.Tensor, start: int, n: int, classes: int) -> torch.Tensor:
    labels = labels[start : start + n]
    if labels.numel() and int(labels.max()) >= classes:
        raise InputError(
            f"label {int(labels.max())} is out of range for a model with "
            f"{classes} classes; labels must be in [0, {classes - 1}]"
        )
    return labels


def collect_reference(
    model: LoadedModel,
    data: CalibData,
    *,
    batch_size: int = 16,
    top_k: int | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    given_outputs: Iterable[torch.Tensor] | None = None,
) -> Reference:
    """Run the full-precision ``model`` over ``data`` and keep the reference for :func:`measure`.

    ``top_k`` sets how many reference log-probabilities a distribution row keeps (default:
    exact up to 1024 classes, else the top 128; see :mod:`bitplan.sensitivity.divergence`).
    Progress: stage ``"reference"`` counted in samples; ``should_cancel`` is polled between batches.
    ``given_outputs`` are the model's outputs on ``data``'s batches of ``batch_size`` when they
    are computed elsewhere than by ``model.module`` (a model streamed block by block,
    :mod:`bitplan.sensitivity.blockwise_walk`).
    """
    kind = output_kind(model.task)
    dists: list[TokenDistributions] = []
    outputs: list[torch.Tensor] = []
    correct = nll = 0.0
    for start, batch, out in _run(model, data, batch_size, given_outputs):
        check_cancel(should_cancel)
        report(progress, "reference", start + out.shape[0], len(data))
        if kind in ("classification", "lm"):
            rows, targets = _rows(kind, model, batch, out)
            if rows.shape[0] == 0:
                continue
            dist = compress(rows, top_k=top_k)
            dists.append(dist)
            if targets is not None:
                token_nll = compare(dist, rows, targets=targets).nll
                assert token_nll is not None  # compare() returns it whenever targets are given
                nll += float(token_nll.double().sum())
            elif data.labels is not None:
                labels = _labels(data.labels, start, rows.shape[0], rows.shape[1])
                correct += float((dist.top1 == labels).sum())
        else:
            outputs.append(
                out.flatten(1).float().cpu() if kind == "embedding" else out.float().cpu()
            )
    ref = Reference(
        kind=kind,
        data_sha256=data.sha256,
        n_samples=len(data),
        batch_size=batch_size,
        dist=TokenDistributions.cat(dists) if dists else None,
        outputs=torch.cat(outputs) if outputs else None,
    )
    if kind == "lm":
        if ref.dist is None:
            raise InputError(
                "no next-token positions: every calibration text needs at least 2 "
                "tokens for text-generation metrics"
            )
        ref.baseline["perplexity_ref"] = _perplexity(nll / len(ref.dist))
    if kind == "classification" and data.labels is not None:
        ref.baseline["accuracy_ref"] = correct / len(data)
    if ref.outputs is not None and kind == "tensor":
        ref.baseline["signal"] = float(ref.outputs.double().square().sum())
        if ref.baseline["signal"] == 0.0:
            raise InputError(
                f"{model.ref} outputs only zeros on this data; relative error is "
                "undefined, give inputs that produce a non-zero output"
            )
    logger.info("reference: %s over %d samples, %.1f MiB held", kind, len(data), ref.nbytes / 2**20)
    return ref


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 − cos(a, b)`` per row, in float64, exactly 0 for equal rows.

    Written as ``(‖a−b‖² − (‖a‖−‖b‖)²) / (2‖a‖‖b‖)`` (the law of cosines) so that equal rows
    give ``0 / x`` rather than ``1 − (rounded 1)``; zero rows count as equal only to zero rows.
    """
    a, b = a.double(), b.double()
    na, nb, gap = a.norm(dim=1), b.norm(dim=1), (a - b).norm(dim=1)
    num = gap.square() - (na - nb).square()
    den = 2 * na * nb
    degenerate = torch.where(gap == 0, 0.0, 1.0).to(num)  # a zero row: cos 0 unless both are
    # torch.where evaluates both branches: the clamp only keeps the unused one free of 0/0.
    safe_den = den.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(den > 0, num / safe_den, degenerate).clamp(0.0, 2.0)


def measure(
    model: LoadedModel,
    data: CalibData,
    reference: Reference,
    *,
    batch_size: int | None = None,
    given_outputs: Iterable[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Quality of ``model`` (as it is now, e.g. with some layers quantized) against ``reference``.

    Returns ``"error"`` (lower is better, exactly 0 for the full-precision model) and the task
    metrics of the module docstring. ``batch_size`` defaults to the reference's;
    ``given_outputs`` as in :func:`collect_reference`.
    """
    if data.sha256 != reference.data_sha256 or len(data) != reference.n_samples:
        raise ValueError("the reference was collected on other data; collect one for this data")
    kind, dist, outputs = reference.kind, reference.dist, reference.outputs
    sums = {"kl": 0.0, "agree": 0.0, "correct": 0.0, "nll": 0.0, "dist": 0.0, "noise": 0.0}
    row = 0
    for start, batch, out in _run(model, data, batch_size or reference.batch_size, given_outputs):
        if kind in ("classification", "lm") and dist is not None:
            rows, targets = _rows(kind, model, batch, out)
            if rows.shape[0] == 0:
                continue
            ref_rows = dist.rows(row, row + rows.shape[0])
            row += rows.shape[0]
            stats = compare(ref_rows, rows, targets=targets)
            sums["kl"] += float(stats.kl.double().sum())
            sums["agree"] += float((stats.top1 == ref_rows.top1).sum())
            if stats.nll is not None:
                sums["nll"] += float(stats.nll.double().sum())
            elif data.labels is not None:
                labels = _labels(data.labels, start, rows.shape[0], rows.shape[1])
                sums["correct"] += float((stats.top1 == labels).sum())
        elif outputs is not None:
            ref_out = outputs[start : start + out.shape[0]]
            if kind == "embedding":
                sums["dist"] += float(_cosine_distance(out.flatten(1).cpu(), ref_out).sum())
            else:
                sums["noise"] += float((out.double().cpu() - ref_out).square().sum())
    return _summarise(reference, sums, len(data), row)


def _perplexity(mean_nll: float) -> float:
    # exp(700) ≈ 1e304 is near float64's largest value: a broken model's perplexity saturates
    # there instead of raising OverflowError, and stays a finite JSON number.
    return math.exp(min(mean_nll, 700.0))


def _summarise(reference: Reference, sums: dict[str, float], n: int, rows: int) -> dict[str, float]:
    if reference.kind == "embedding":
        distance = sums["dist"] / n
        return {"error": distance, "cosine": 1.0 - distance}
    if reference.kind == "tensor":
        signal, noise = reference.baseline["signal"], sums["noise"]
        sqnr = MAX_SQNR_DB if noise == 0 else min(MAX_SQNR_DB, 10 * math.log10(signal / noise))
        return {"error": noise / signal, "rel_mse": noise / signal, "sqnr_db": sqnr}
    kl = sums["kl"] / rows
    result = {"error": kl, "kl": kl, "agreement": sums["agree"] / rows}
    if reference.kind == "lm":
        result["perplexity"] = _perplexity(sums["nll"] / rows)
        result["perplexity_ref"] = reference.baseline["perplexity_ref"]
    elif "accuracy_ref" in reference.baseline:
        result["accuracy"] = sums["correct"] / n
        result["accuracy_ref"] = reference.baseline["accuracy_ref"]
    return result
