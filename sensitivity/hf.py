"""Hugging Face model folders and zips: config + safetensors, built by transformers, verified.

A folder holds ``config.json``, ``*.safetensors`` (one file or shards with an index) and
optionally tokenizer files. The model class comes from the installed transformers (never from
code in the folder: ``trust_remote_code`` is never set) and keeps the checkpoint dtype.
transformers only *warns* about checkpoint weights that do not fit the config and initialises
the gaps randomly; quantization planning on random weights would be meaningless, so missing or
mismatched weights are errors here, and so are unexpected ones when the folder's own
architecture is loaded. A zip is extracted (with the limits of :mod:`bitplan.sensitivity.safety`)
into a cache folder keyed by its sha256, then loaded like a folder.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.safety import (
    extract_zip,
    file_sha256,
    files_sha256,
    read_safetensors_header,
)

__all__ = [
    "HF_TASKS",
    "HFModel",
    "check_config_fits_weights",
    "infer_task",
    "load_hf_folder",
    "unpack_model_zip",
]

logger = logging.getLogger(__name__)

HF_TASKS = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "text-generation": "AutoModelForCausalLM",
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
)
# At most this many key names are quoted in an error, so the message stays one readable line.
_QUOTE_KEYS = 3
# Config sizes that must be at most the largest dimension of any checkpoint tensor: a config that
# declares more cannot be filled from the file, and building it would only allocate memory.
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "vocab_size")
_INDEX = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclass
class HFModel:
    """A verified transformers model plus its tokenizer (None when the folder has none)."""

    module: nn.Module
    sha256: str
    task: str
    tokenizer: Any | None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def infer_task(architectures: list[str] | None) -> str:
    """The task a config's ``architectures`` imply: causal LM, sequence classifier, or encoder."""
    arch = (architectures or [""])[0]
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "text-generation"
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    return "feature-extraction"


def _read_config_json(folder: Path, *, label: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(
            f"{label} is not a model folder: it has no config.json (expected a "
            "Hugging Face folder with config.json and *.safetensors)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{label}: config.json is not valid JSON ({_one_line(exc)})") from None
    except RecursionError:
        raise InputError(f"{label}: config.json is nested too deeply") from None
    if not isinstance(raw, dict):
        raise InputError(f"{label}: config.json must hold a JSON object")
    return raw


def _indexed_blocks(names: list[str]) -> int:
    """The most numbered siblings under one prefix (``encoder.layer.0`` … ``.11`` → 12)."""
    found: dict[str, set[int]] = {}
    for name in names:
        match = _INDEX.match(name)
        if match:
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    return max((len(v) for v in found.values()), default=0)


def check_config_fits_weights(config: Any, weights: list[Path], *, label: str) -> None:
    """Refuse a config whose sizes the checkpoint cannot fill, reading only the headers.

    transformers allocates every parameter the config declares before it looks at the file, so
    a 85 KB zip whose config says 100000 layers would take minutes and gigabytes to refuse.
    Checked: no size in :data:`_SIZE_FIELDS` exceeds the largest tensor dimension, and
    ``num_hidden_layers`` is at most the numbered blocks the weights hold (``num_hidden_groups``
    instead when layers share weights, as in ALBERT).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weights:
        shapes.update(read_safetensors_header(path, label=label))
    largest = max((d for shape in shapes.values() for d in shape), default=0)
    for field in _SIZE_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > largest:
            raise InputError(
                f"{label}: config.json declares {field}={value} but no safetensors tensor has "
                f"a dimension that large (largest: {largest}); the config does not match "
                "the weights"
            )
    layers = getattr(config, "num_hidden_groups", None) or getattr(
        config, "num_hidden_layers", None
    )
    blocks = _indexed_blocks(list(shapes))
    if isinstance(layers, int) and layers > max(blocks, 1):
        raise InputError(
            f"{label}: config.json declares {layers} layers but the safetensors hold weights "
            f"for {blocks}; the config does not match the weights"
        )


def _quote(keys: Any) -> str:
    names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)
    more = f" and {len(names) - _QUOTE_KEYS} more" if len(names) > _QUOTE_KEYS else ""
    return ", ".join(names[:_QUOTE_KEYS]) + more


def _verify_loading(info: dict[str, Any], *, label: str, own_architecture: bool) -> None:
    """Turn transformers' loading report into errors for weights that do not fit the config."""
    if info.get("mismatched_keys"):
        first = sorted(info["mismatched_keys"])[0]
        raise InputError(
            f"{label}: safetensors do not match config.json: {len(info['mismatched_keys'])} "
            f"weight(s) have other shapes, e.g. {first[0]} is {list(first[1])} in the checkpoint "
            f"but {list(first[2])} in the model"
        )
    if info.get("missing_keys"):
        raise InputError(
            f"{label}: safetensors do not match config.json: missing weights "
            f"{_quote(info['missing_keys'])}"
        )
    if info.get("unexpected_keys"):
        unused = _quote(info["unexpected_keys"])
        message = f"{label}: checkpoint weights unused by the model: {unused}"
        if own_architecture:
            raise InputError(f"{message}; safetensors do not match config.json")
        logger.warning("%s (expected when loading a checkpoint for another task)", message)
    if info.get("error_msgs"):
        raise InputError(f"{label}: could not load weights ({info['error_msgs'][0]})")


def _load_tokenizer(folder: Path, *, label: str) -> Any | None:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{label}: tokenizer files cannot be loaded ({_one_line(exc)})") from None
    # Batching needs a pad token; causal LMs often ship without one, and EOS is the usual stand-in.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_hf_folder(folder: Path, *, task: str | None = None, label: str | None = None) -> HFModel:
    """Build and verify the transformers model in ``folder`` for ``task`` (inferred when None)."""
    label = label or str(folder)
    raw = _read_config_json(folder, label=label)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        hint = (
            " (pickled .bin checkpoints are not read: convert them to safetensors)"
            if any(folder.glob("*.bin"))
            else ""
        )
        raise InputError(f"{label}: no *.safetensors weights next to config.json{hint}")
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        model_type = raw.get("model_type")
        if model_type is not None:
            raise InputError(
                f"{label}: unknown model_type {model_type!r} in config.json; "
                "accepted: a model type of the installed transformers (e.g. bert, "
                "gpt2, llama)"
            ) from None
        raise InputError(f"{label}: config.json cannot be read ({_one_line(exc)})") from None
    task = task or infer_task(getattr(config, "architectures", None))
    if task not in HF_TASKS:
        raise InputError(
            f"task {task!r} is not available for Hugging Face models; accepted: "
            + ", ".join(HF_TASKS)
        )
    check_config_fits_weights(config, weights, label=label)
    auto_cls = getattr(transformers, HF_TASKS[task])
    try:
        module, info = auto_cls.from_pretrained(
            folder,
            local_files_only=True,
            dtype="auto",
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # report shape mismatches instead of a bare traceback
        )
    except (ValueError, OSError, RuntimeError, KeyError, SafetensorError) as exc:
        raise InputError(f"{label}: cannot build a {task} model ({_one_line(exc)})") from None
    own = type(module).__name__ in (getattr(config, "architectures", None) or [])
    _verify_loading(info, label=label, own_architecture=own)
    # The task is hashed too: one checkpoint loaded as encoder or classifier is two models.
    hashed = [folder / "config.json", *sorted(folder.glob("*.safetensors.index.json")), *weights]
    return HFModel(
        module=module.eval(),
        sha256=files_sha256(hashed, root=folder, salt=f"hf:{task}"),
        task=task,
        tokenizer=_load_tokenizer(folder, label=label),
    )


def unpack_model_zip(path: Path, *, cache_dir: Path, max_bytes: int | None = None) -> Path:
    """Extract a zipped model folder into ``cache_dir/unzipped/<sha256>`` and return its root.

    The root is the extracted folder itself when it holds ``config.json``, else its only
    subfolder that does (zipping a folder usually adds one top-level directory).
    """
    dest = extract_zip(path, cache_dir / "unzipped" / file_sha256(path), max_bytes=max_bytes)
    if (dest / "config.json").is_file():
        return dest
    roots = [d for d in dest.iterdir() if d.is_dir() and (d / "config.json").is_file()]
    if len(roots) != 1:
        raise InputError(
            f"{path.name}: the zip must hold one model folder with config.json at "
            "its top level or in a single subfolder"
        )
    return roots[0]
