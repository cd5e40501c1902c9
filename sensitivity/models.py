"""Model references → a loaded, verified ``nn.Module`` plus the layers a plan will decide on.

One entry point, :func:`load_model`, serves the CLI, the worker and the tests. It accepts
``builtin:<name>``, a Hugging Face model folder, or a ``.zip`` of one (DESIGN §8), refuses
anything unsafe or inconsistent with one :class:`~bitplan.sensitivity.errors.InputError` line,
checks that every weight is finite, moves the model to the requested device in its checkpoint dtype,
and lists its quantizable layers after the user's exclusions and pins.

Every loaded model is called as ``module(**batch)`` with a dict of batch-first input tensors.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.sensitivity.builtin import BUILTIN_MODELS, BuiltinModel, load_builtin
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.hf import HFModel, load_hf_folder, unpack_model_zip
from bitplan.sensitivity.layers import QuantLayer, apply_pins, find_quant_layers
from bitplan.sensitivity.progress import ProgressFn
from bitplan.sensitivity.safety import check_finite

__all__ = ["TASKS", "LoadedModel", "load_model", "resolve_cache_dir", "resolve_device"]

logger = logging.getLogger(__name__)

TASKS = ("image-classification", "feature-extraction", "text-classification", "text-generation")
DEVICES = ("auto", "cpu", "cuda")
_ENV_CACHE = "BITPLAN_CACHE_DIR"
_TORCH_SUFFIXES = (".pt2", ".pt", ".pth", ".bin", ".ts", ".jit")


@dataclass
class LoadedModel:
    """A model ready for analysis.

    ``sha256`` is a stable content hash of the weights and config (keys caches); ``module`` is
    in eval mode on ``device`` in its checkpoint dtype; ``layers`` are its quantizable weights
    after exclusions and pins; ``tokenizer`` encodes text for it (a transformers tokenizer, or
    :class:`~bitplan.sensitivity.builtin_nets.ByteTokenizer` for ``builtin:tiny-lm``) or is None;
    ``builtin_data`` names the dataset ``--calib builtin`` loads for it, or is None.
    """

    ref: str
    sha256: str
    module: nn.Module
    task: str
    layers: list[QuantLayer]
    tokenizer: Any | None
    device: torch.device
    builtin_data: str | None = None


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a CUDA device is an error."""
    if name not in DEVICES:
        raise InputError(f"unknown device {name!r}; accepted: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA device is available; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_cache_dir(cache_dir: Path | None = None) -> Path:
    """The cache root: ``cache_dir``, else env ``BITPLAN_CACHE_DIR``, else the user cache dir."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(_ENV_CACHE)
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("bitplan"))


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a ``code/`` folder; ``torch.save`` zips have none."""
    if path.suffix in (".ts", ".jit"):
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _torch_file_error(path: Path, *, trusted: bool) -> InputError:
    """Why a torch archive is not loaded: code-carrying formats need trust, and none is planned yet.

    ``.pt2`` (torch.export) and TorchScript archives drop the module types that layer discovery
    relies on, and a pickled state dict has no architecture at all. A file that is none of these
    (random bytes named ``.bin``) is called what it is, not a state dict.
    """
    if path.suffix == ".pt2" or _is_torchscript(path):
        kind = "torch.export (.pt2)" if path.suffix == ".pt2" else "TorchScript"
        if not trusted:
            return InputError(
                f"{path.name} is a {kind} archive, which runs code from the file; "
                "it is refused unless the operator enables trusted mode, and even "
                "then bitplan cannot plan it (no layer types): provide a Hugging "
                "Face folder (config.json + *.safetensors) instead"
            )
        return InputError(
            f"{path.name}: {kind} archives do not keep layer types, so bitplan "
            "cannot plan them; provide a Hugging Face folder (config.json + "
            "*.safetensors) instead"
        )
    if _is_torch_save(path):
        return InputError(
            f"{path.name} is a pickled state dict (torch.save), which has no architecture; "
            "save the model as a Hugging Face folder (config.json + *.safetensors)"
        )
    return InputError(
        f"{path.name} is not a loadable state dict (neither a torch.save archive nor a "
        "pickle); bitplan expects builtin:<name>, a Hugging Face folder (config.json + "
        "*.safetensors) or a .zip of one"
    )


def _is_torch_save(path: Path) -> bool:
    """Whether ``path`` looks like ``torch.save`` output, from its first bytes, unpickling nothing.

    Current ``torch.save`` writes a zip holding ``<name>/data.pkl``; the legacy format (and a
    plain pickle) starts with the pickle PROTO opcode ``0x80`` and a protocol number 2 to 5.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    with path.open("rb") as stream:
        head = stream.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _select_layers(
    module: nn.Module, *, ref: str, exclude: Sequence[str], pins: dict[str, str]
) -> list[QuantLayer]:
    """Quantizable layers after exclusions and pins; a pattern that matches nothing is an error."""
    if isinstance(exclude, str):
        raise InputError(f"exclude must be a list of patterns, got the string {exclude!r}")
    names = [lay.name for lay in find_quant_layers(module)]
    if not names:
        raise InputError(
            f"{ref}: the model has no quantizable layers (Linear, Conv1d/2d, Embedding)"
        )
    for pattern in exclude:
        if not any(fnmatchcase(name, pattern) for name in names):
            raise InputError(
                f"exclude pattern {pattern!r} matches no quantizable layer "
                f"(names look like {names[0]!r})"
            )
    layers = find_quant_layers(module, exclude=tuple(exclude))
    if not layers:
        raise InputError(f"{ref}: the exclude patterns leave no layer to plan")
    return apply_pins(layers, pins)  # raises InputError for bad, unmatched or clashing pins


def load_model(
    ref: str,
    *,
    task: str | None = None,
    device: str = "auto",
    exclude: Sequence[str] = (),
    pins: dict[str, str] | None = None,
    trusted: bool = False,
    cache_dir: Path | None = None,
    max_unzip_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> LoadedModel:
    """Load ``ref`` (``builtin:<name>``, a Hugging Face folder, or a ``.zip`` of one).

    ``task`` is one of :data:`TASKS` or None to infer it. ``exclude`` holds fnmatch patterns
    over layer names to leave unplanned; ``pins`` maps patterns to format names the plan must
    use. ``cache_dir`` overrides where builtin weights and unzipped models are cached;
    ``max_unzip_bytes`` the extraction limit (env ``BITPLAN_MAX_UNZIP_BYTES``, default 4 GiB).
    ``progress`` sees the training of a builtin model on its first use (its own stage, see
    :func:`~bitplan.sensitivity.builtin.training_stage`).
    """
    if task is not None and task not in TASKS:
        raise InputError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    target = resolve_device(device)
    cache = resolve_cache_dir(cache_dir)
    builtin_data = None
    loaded: BuiltinModel | HFModel
    if ref.startswith("builtin:"):
        loaded = load_builtin(ref.removeprefix("builtin:"), cache_dir=cache, progress=progress)
        if task is not None and task != loaded.task:
            raise InputError(f"{ref} has task {loaded.task}; drop the task or pass {loaded.task}")
        builtin_data = loaded.data
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            loaded = load_hf_folder(path, task=task, label=ref)
        elif path.is_file() and path.suffix == ".zip":
            root = unpack_model_zip(path, cache_dir=cache, max_bytes=max_unzip_bytes)
            loaded = load_hf_folder(root, task=task, label=ref)
        elif path.is_file() and path.suffix in _TORCH_SUFFIXES:
            raise _torch_file_error(path, trusted=trusted)
        elif not path.exists():
            raise InputError(
                f"model {ref!r} does not exist: no such file or folder (for a builtin "
                "model write builtin:<name>: " + ", ".join(BUILTIN_MODELS) + ")"
            )
        else:
            raise InputError(
                f"model {ref!r} is not a model: pass builtin:<name> ("
                + ", ".join(BUILTIN_MODELS)
                + "), a Hugging Face folder (config.json + *.safetensors) or a .zip of one"
            )
    module = loaded.module
    check_finite(module, label=ref)
    module.to(target).eval()
    layers = _select_layers(module, ref=ref, exclude=exclude, pins=dict(pins or {}))
    logger.info("loaded %s: %s, %d quantizable layers on %s", ref, loaded.task, len(layers), target)
    return LoadedModel(
        ref=ref,
        sha256=loaded.sha256,
        module=module,
        task=loaded.task,
        layers=layers,
        tokenizer=loaded.tokenizer,
        device=target,
        builtin_data=builtin_data,
    )
