"""A Hugging Face model as a skeleton: its module tree without weights, filled part by part.

Block-wise analysis (:mod:`bitplan.sensitivity.blockwise`) must never hold the whole model. The
skeleton is built by transformers from ``config.json`` with every *parameter* on PyTorch's
``meta`` device (shapes and dtypes, no storage), the way ``accelerate.init_empty_weights`` does
it; buffers stay real, because non-persistent ones such as the rotary frequencies are computed
when the module is built and are not in the checkpoint. :class:`Checkpoint` then *materialises*
the parameters of one submodule from the safetensors files (``safe_open`` reads just those
tensors) and *releases* them back to ``meta`` when that part is done.

The checks of :func:`~bitplan.sensitivity.hf.load_hf_folder` hold here too: every parameter must
be in the checkpoint with its shape, the checkpoint may hold nothing the model does not use, and
a materialised weight must be finite. The content hash is the one ``load_model`` gives the same
folder, so a table computed block-wise and one computed on the whole model share a cache entry.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.hf import (
    _load_tokenizer,
    _read_config_json,
    check_config_fits_weights,
    infer_task,
)
from bitplan.sensitivity.models import (
    LoadedModel,
    _select_layers,
    resolve_cache_dir,
    resolve_device,
)
from bitplan.sensitivity.safety import files_sha256, read_safetensors_header

__all__ = ["Checkpoint", "SkeletonModel", "load_skeleton", "slots_under"]

logger = logging.getLogger(__name__)

_META = torch.device("meta")


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to ``meta`` (buffers are not).

    A parameter is allocated by its module first (``torch.empty``: address space, no pages
    written, since the module's own initialisation then runs on the meta copy). The patch is on
    ``nn.Module`` itself, so a module built by another thread meanwhile would get meta
    parameters too; the skeleton is built in the thread that analyses it, before any work."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and not param.is_meta:  # a tie re-registers a meta parameter
            self._parameters[name] = nn.Parameter(
                param.to(_META), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@dataclass
class Checkpoint:
    """Where each parameter of a skeleton is stored, and the code that fills and empties it.

    ``keys`` maps every parameter name of the module (tied aliases included) to its tensor's
    name in the safetensors files; ``files`` maps a tensor name to its file.
    """

    label: str
    keys: dict[str, str]
    files: dict[str, Path]

    def tensor(self, param: str, device: torch.device) -> torch.Tensor:
        """The stored tensor of parameter ``param``, on ``device``, in its checkpoint dtype.

        The file is mapped for this read only: a mapping kept open would keep every page read
        so far resident in this process (the whole checkpoint, by the last block)."""
        key = self.keys[param]
        with safe_open(str(self.files[key]), framework="pt", device="cpu") as handle:
            tensor: torch.Tensor = handle.get_tensor(key)
        return tensor.to(device)

    def materialize(self, root: nn.Module, slots: Sequence[str], device: torch.device) -> None:
        """Fill the parameter slots ``slots`` (full names, see :func:`slots_under`) of ``root``
        from the files, each as a new parameter (a tie between two slots is not kept)."""
        for name in slots:
            value = self.tensor(name, device)
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise InputError(
                    f"{self.label}: weight {name} contains NaN or Inf values; the checkpoint "
                    "is corrupt"
                )
            owner, attr = _slot(root, name)
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)

    def release(self, root: nn.Module, slots: Sequence[str]) -> None:
        """Return the parameter slots ``slots`` of ``root`` to ``meta``, freeing their memory."""
        for name in slots:
            owner, attr = _slot(root, name)
            param = owner._parameters[attr]
            if param is not None and not param.is_meta:
                owner._parameters[attr] = nn.Parameter(
                    torch.empty_like(param, device=_META), requires_grad=False
                )

    @contextmanager
    def loaded(self, root: nn.Module, slots: Sequence[str], device: torch.device) -> Iterator[None]:
        """The parameter slots ``slots`` of ``root`` filled for the ``with`` block and released
        after it, whatever happens inside (:meth:`materialize`, then :meth:`release`)."""
        try:
            self.materialize(root, slots, device)
            yield
        finally:
            self.release(root, slots)


def _slot(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds parameter ``name`` and the parameter's attribute name there."""
    owner, _, attr = name.rpartition(".")
    return root.get_submodule(owner), attr


def slots_under(root: nn.Module, prefix: str = "") -> list[str]:
    """Full names of the parameter slots under submodule ``prefix`` of ``root`` (a parameter
    tied between two modules is two slots: each module holds it under its own name)."""
    sub = root.get_submodule(prefix)
    head = f"{prefix}." if prefix else ""
    return [head + name for name, _ in sub.named_parameters(remove_duplicate=False)]


@dataclass
class SkeletonModel(LoadedModel):
    """A :class:`~bitplan.sensitivity.models.LoadedModel` whose ``module`` holds no weights
    (every parameter on ``meta``) and whose ``checkpoint`` fills one part at a time; only a
    block-by-block pass (:mod:`bitplan.sensitivity.blockwise_walk`) can run it."""

    checkpoint: Checkpoint | None = None
    model_type: str = ""


def _checkpoint_keys(
    module: nn.Module, shapes: dict[str, tuple[int, ...]], *, label: str
) -> dict[str, str]:
    """Each parameter name → its tensor in the files: itself, itself without the base model's
    prefix (``transformer.h.0…`` stored as ``h.0…``), or a name of a parameter tied to it."""
    aliases: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    prefix = str(getattr(module, "base_model_prefix", "") or "") + "."
    keys: dict[str, str] = {}
    missing = []
    for name, param in module.named_parameters(remove_duplicate=False):
        tried = [(n, n.removeprefix(prefix)) for n in aliases[id(param)]]
        key = next((k for pair in tried for k in pair if k in shapes), None)
        if key is None:
            missing.append(name)
            continue
        if tuple(shapes[key]) != tuple(param.shape):
            raise InputError(
                f"{label}: safetensors do not match config.json: {key} is "
                f"{list(shapes[key])} in the checkpoint but {list(param.shape)} in the model"
            )
        keys[name] = key
    if missing:
        raise InputError(
            f"{label}: safetensors do not match config.json: missing weights "
            + ", ".join(sorted(missing)[:3])
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    ignored = [
        re.compile(p) for p in getattr(module, "_keys_to_ignore_on_load_unexpected", None) or []
    ]
    unused = sorted(
        k for k in set(shapes) - set(keys.values()) if not any(p.search(k) for p in ignored)
    )
    if unused:
        raise InputError(
            f"{label}: checkpoint weights unused by the model: {', '.join(unused[:3])}; "
            "safetensors do not match config.json"
        )
    return keys


def _checkpoint_dtype(config: Any, files: Sequence[Path]) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` would pick: the config's, else the first
    floating tensor's."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                found: torch.dtype = handle.get_slice(key).get_dtype()
                if isinstance(found, torch.dtype) and found.is_floating_point:
                    return found
    return torch.float32


def load_skeleton(
    ref: str,
    *,
    task: str | None = None,
    device: str = "auto",
    exclude: Sequence[str] = (),
    pins: dict[str, str] | None = None,
    cache_dir: Path | None = None,
    max_unzip_bytes: int | None = None,
) -> SkeletonModel:
    """Load ``ref`` (a Hugging Face folder or a ``.zip`` of one) as a skeleton: config,
    tokenizer, planned layers and checkpoint index, with no weight read.

    Arguments as :func:`~bitplan.sensitivity.models.load_model`; the layers, content hash and
    tokenizer are the ones it gives."""
    from bitplan.sensitivity.hf import HF_TASKS, unpack_model_zip

    path = Path(ref).expanduser()
    if ref.startswith("builtin:"):
        raise InputError(
            f"{ref} is a builtin model, which is small: analyze it whole (block-wise analysis "
            "reads Hugging Face folders)"
        )
    if path.is_file() and path.suffix == ".zip":
        path = unpack_model_zip(
            path, cache_dir=resolve_cache_dir(cache_dir), max_bytes=max_unzip_bytes
        )
    elif not path.is_dir():
        raise InputError(
            f"model {ref!r} is not a Hugging Face folder (config.json + *.safetensors) or a "
            ".zip of one; block-wise analysis reads only those"
        )
    target = resolve_device(device)
    raw = _read_config_json(path, label=ref)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{ref}: no *.safetensors weights next to config.json")
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError):
        raise InputError(
            f"{ref}: unknown model_type {raw.get('model_type')!r} in config.json"
        ) from None
    task = task or infer_task(getattr(config, "architectures", None))
    if task not in HF_TASKS:
        raise InputError(f"task {task!r} is not available for Hugging Face models")
    check_config_fits_weights(config, weights, label=ref)
    shapes: dict[str, tuple[int, ...]] = {}
    files: dict[str, Path] = {}
    for file in weights:
        for key, shape in read_safetensors_header(file, label=ref).items():
            shapes[key], files[key] = shape, file
    dtype = _checkpoint_dtype(config, weights)
    with _parameters_on_meta():
        module = getattr(transformers, HF_TASKS[task]).from_config(config, dtype=dtype)
    module.eval()
    keys = _checkpoint_keys(module, shapes, label=ref)
    layers = _select_layers(module, ref=ref, exclude=exclude, pins=dict(pins or {}))
    # As load_hf_folder hashes it: one checkpoint loaded for two tasks is two models.
    hashed = [path / "config.json", *sorted(path.glob("*.safetensors.index.json")), *weights]
    logger.info("skeleton of %s: %s, %d quantizable layers", ref, task, len(layers))
    return SkeletonModel(
        ref=ref,
        sha256=files_sha256(hashed, root=path, salt=f"hf:{task}"),
        module=module,
        task=task,
        layers=layers,
        tokenizer=_load_tokenizer(path, label=ref),
        device=target,
        checkpoint=Checkpoint(label=ref, keys=keys, files=files),
        model_type=str(getattr(config, "model_type", "")),
    )
