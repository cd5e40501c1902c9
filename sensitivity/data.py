"""Calibration data: load it from a file or a builtin set, validate it, split it.

Every sensitivity method and quality metric runs the model the same way, ``module(**batch)``,
on a dict of batch-first input tensors. :class:`CalibData` holds that dict for N samples (on
the CPU; floating inputs in the model's floating dtype) with optional labels and a content
hash that keys the sensitivity cache. Sources (DESIGN §8):

- ``builtin``: the data set shipped for a builtin model (:mod:`bitplan.sensitivity.builtin`);
- ``.txt`` / ``.jsonl``: text for Hugging Face text models, tokenized with the model's
  tokenizer (:mod:`bitplan.sensitivity.textdata`);
- ``.safetensors``: named input tensors (names must be inputs of the model's ``forward``)
  and an optional ``labels`` tensor.

The search sees the calibration part of a seeded split and the frontier is reported on the
held-out part (DESIGN §7); :func:`split_calibration` is deterministic and its parts disjoint.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.textdata import read_jsonl, read_txt, tokenize_texts

if TYPE_CHECKING:
    from bitplan.sensitivity.models import LoadedModel

__all__ = ["CLASSIFICATION_TASKS", "CalibData", "load_calibration", "split_calibration"]

logger = logging.getLogger(__name__)

CLASSIFICATION_TASKS = ("image-classification", "text-classification")
_SUFFIXES = (".txt", ".jsonl", ".safetensors")
_ACCEPTED = "'builtin' or a .txt, .jsonl or .safetensors file"


@dataclass
class CalibData:
    """N calibration samples: ``inputs`` (batch-first, CPU), optional ``labels`` ``[N]``.

    ``sha256`` identifies the content (file bytes and loading options), so equal hashes mean
    equal tensors.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    sha256: str

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def batches(
        self, batch_size: int, *, device: torch.device | str | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive batches of the inputs, in order, moved to ``device``.

        Padding columns that no sample of the batch uses (``attention_mask`` all 0 at the end)
        are cut off, so a batch of short texts does not pay for the longest text in the set.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            batch = {k: v[start : start + batch_size] for k, v in self.inputs.items()}
            yield {k: v.to(device) for k, v in _trim_padding(batch).items()}

    def subset(self, index: torch.Tensor) -> CalibData:
        """The samples at ``index`` (1-D integer positions), in that order."""
        index = torch.as_tensor(index, dtype=torch.int64)
        digest = hashlib.sha256(self.sha256.encode())
        digest.update(index.numpy().tobytes())
        return CalibData(
            inputs={k: v[index] for k, v in self.inputs.items()},
            labels=None if self.labels is None else self.labels[index],
            sha256=digest.hexdigest(),
        )


def _trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] == 0:
        return batch
    used = mask.ne(0).any(dim=0).nonzero()
    width = int(used.max()) + 1 if used.numel() else mask.shape[1]
    if width == mask.shape[1]:
        return batch
    return {k: v[:, :width] if v.shape[:2] == mask.shape else v for k, v in batch.items()}


def _forward_inputs(module: nn.Module) -> tuple[set[str] | None, set[str]]:
    """``(accepted, required)`` input names of ``module.forward``.

    ``accepted`` is None when any name goes: a ``**kwargs`` forward, or a signature that cannot
    be read (TorchScript, C++ modules). Hugging Face models (they have ``main_input_name``) all
    take ``**kwargs``, but only for attention and output options, never for data, so their named
    parameters are the accepted inputs.
    """
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None, set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p for p in params if p.kind in kinds]
    required = {p.name for p in named if p.default is inspect.Parameter.empty}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    if open_ended and not hasattr(module, "main_input_name"):
        return None, required
    return {p.name for p in named}, required


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _validate(
    inputs: dict[str, torch.Tensor], labels: torch.Tensor | None, model: LoadedModel, source: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Check names, shapes and values; cast floating inputs to the model's floating dtype."""
    if not inputs:
        raise InputError(
            f"{source} holds no input tensors; name them after the model's "
            "forward() arguments (e.g. pixel_values, input_ids)"
        )
    accepted, required = _forward_inputs(model.module)
    if accepted is not None:
        unknown = sorted(set(inputs) - accepted)
        if unknown:
            raise InputError(
                f"{source}: {', '.join(unknown)} not among the inputs of the "
                f"model's forward(); accepted: {', '.join(sorted(accepted))}, "
                "labels"
            )
    missing = sorted(required - set(inputs))
    if missing:
        raise InputError(f"{source} lacks the model's required input(s) {', '.join(missing)}")
    sizes = {name: (t.shape[0] if t.dim() else None) for name, t in inputs.items()}
    if labels is not None:
        sizes["labels"] = labels.shape[0] if labels.dim() else None
    if None in sizes.values():
        scalar = next(name for name, n in sizes.items() if n is None)
        raise InputError(
            f"{source}: {scalar} is a scalar; every tensor needs a first (sample) dimension"
        )
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{name}={n}" for name, n in sizes.items())
        raise InputError(
            f"{source}: tensors disagree on the number of samples (first "
            f"dimension: {shown}); all must have the same N"
        )
    if next(iter(sizes.values())) == 0:
        raise InputError(f"{source} holds 0 samples; give at least one")
    dtype = _float_dtype(model.module)
    cast = {}
    for name, tensor in inputs.items():
        if tensor.is_floating_point():
            tensor = tensor.to(dtype) if dtype is not None else tensor
            if not torch.isfinite(tensor).all():
                raise InputError(
                    f"{source}: {name} contains NaN or Inf (in {tensor.dtype}); "
                    "calibration inputs must be finite"
                )
        cast[name] = tensor.contiguous()
    return cast, _validate_labels(labels, model, source)


def _validate_labels(
    labels: torch.Tensor | None, model: LoadedModel, source: str
) -> torch.Tensor | None:
    if labels is None:
        return None
    if model.task not in CLASSIFICATION_TASKS:
        logger.info("%s: ignoring labels, %s has no class labels", source, model.task)
        return None
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise InputError(
            f"{source}: labels must be a 1-D integer tensor of class indices [N], "
            f"got {labels.dtype} of shape {list(labels.shape)}"
        )
    if labels.dtype == torch.bool or (labels < 0).any():
        raise InputError(f"{source}: labels must be class indices >= 0")
    return labels.to(torch.int64)


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256(b"bitplan.calib/v1")
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> list[bytes]:
    parts = []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        parts += [
            f"{name}:{t.dtype}:{list(t.shape)}".encode(),
            t.view(-1).view(torch.uint8).numpy().tobytes(),
        ]
    return parts


def _take(
    inputs: dict[str, torch.Tensor], labels: torch.Tensor | None, n: int | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    if n is None:
        return inputs, labels
    return {k: v[:n] for k, v in inputs.items()}, None if labels is None else labels[:n]


def _load_builtin(model: LoadedModel, max_samples: int | None) -> CalibData:
    if model.builtin_data is None:
        raise InputError(
            f"{model.ref} has no builtin calibration data; pass a .txt, .jsonl or .safetensors file"
        )
    from bitplan.sensitivity.builtin import builtin_calibration  # loads data sets only when asked

    inputs, labels = builtin_calibration(model.builtin_data)
    source = f"builtin data {model.builtin_data!r}"
    inputs, labels = _take(*_validate(dict(inputs), labels, model, source), max_samples)
    named = dict(inputs) | ({} if labels is None else {"labels": labels})
    return CalibData(inputs=inputs, labels=labels, sha256=_digest(_tensor_bytes(named)))


Tensors = tuple[dict[str, torch.Tensor], torch.Tensor | None]


def _load_text(
    raw: bytes,
    path: Path,
    suffix: str,
    model: LoadedModel,
    max_length: int,
    max_samples: int | None,
) -> Tensors:
    if model.tokenizer is None:
        raise InputError(
            f"{path.name} is text but {model.ref} has no tokenizer; give a "
            ".safetensors file of input tensors instead"
        )
    if suffix == ".txt":
        texts, labels = read_txt(raw, path), None
    else:
        texts, labels = read_jsonl(raw, path, with_labels=model.task in CLASSIFICATION_TASKS)
    texts = texts[:max_samples]
    accepted, _ = _forward_inputs(model.module)
    inputs = tokenize_texts(model.tokenizer, texts, max_length=max_length, keep=accepted)
    label_tensor = None if labels is None else torch.tensor(labels[:max_samples])
    return _validate(inputs, label_tensor, model, path.name)


def _load_safetensors(
    raw: bytes, path: Path, model: LoadedModel, max_samples: int | None
) -> Tensors:
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError) as err:
        raise InputError(f"{path.name} is not a valid safetensors file ({err})") from None
    labels = tensors.pop("labels", None)
    return _take(*_validate(tensors, labels, model, path.name), max_samples)


def load_calibration(
    ref: str, model: LoadedModel, *, max_length: int = 128, max_samples: int | None = None
) -> CalibData:
    """Load calibration data for ``model`` from ``ref``: ``builtin`` or a file path.

    Text is tokenized with the model's tokenizer, truncated at ``max_length`` tokens and padded
    to the longest sample. ``max_samples`` keeps the first N samples. Raises
    :class:`InputError` for anything the model cannot run on.
    """
    if max_length < 1:
        raise InputError(f"max_length must be a positive number of tokens, got {max_length}")
    if max_samples is not None and max_samples < 1:
        raise InputError(f"max_samples must be >= 1 (or unset for all), got {max_samples}")
    if ref == "builtin":
        data = _load_builtin(model, max_samples)
        logger.info("calibration: %d samples of builtin data %s", len(data), model.builtin_data)
        return data
    path = Path(ref)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise InputError(f"unsupported calibration data {ref!r}; accepted: {_ACCEPTED}")
    if not path.is_file():
        raise InputError(f"calibration file {ref!r} not found; accepted: {_ACCEPTED}")
    raw = path.read_bytes()
    if not raw.strip():
        raise InputError(f"calibration file {path.name} is empty; accepted: {_ACCEPTED}")
    if suffix == ".safetensors":
        inputs, labels = _load_safetensors(raw, path, model, max_samples)
        options = {"max_samples": max_samples}
    else:
        inputs, labels = _load_text(raw, path, suffix, model, max_length, max_samples)
        options = {"max_length": max_length, "max_samples": max_samples}
    data = CalibData(
        inputs=inputs,
        labels=labels,
        sha256=_digest([suffix.encode(), raw, json.dumps(options).encode()]),
    )
    logger.info("calibration: %d samples from %s", len(data), path.name)
    return data


def _holdout_size(n: int, holdout: float) -> int:
    return math.floor(n * holdout + 0.5)  # round half up: 2 samples at 0.25 hold out 1, not 0


def split_calibration(
    data: CalibData, *, holdout: float = 0.25, seed: int = 0
) -> tuple[CalibData, CalibData]:
    """Split into ``(calibration, held_out)`` parts by a seeded shuffle.

    ``round(N * holdout)`` samples are held out; both parts keep the original sample order.
    The same data, fraction and seed always give the same split.
    """
    if not 0.0 < holdout < 1.0:
        raise InputError(f"holdout must be a fraction in (0, 1), got {holdout}")
    n = len(data)
    n_hold = _holdout_size(n, holdout)
    if not 1 <= n_hold <= n - 1:
        needed = next(m for m in count(2) if 1 <= _holdout_size(m, holdout) <= m - 1)
        raise InputError(
            f"{n} calibration sample(s) cannot be split with holdout={holdout}: "
            f"at least {needed} are needed so both parts are non-empty"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    held, kept = order[:n_hold].sort().values, order[n_hold:].sort().values
    return data.subset(kept), data.subset(held)
