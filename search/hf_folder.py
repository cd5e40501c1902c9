"""Putting a written Hugging Face folder in place without losing anyone's files.

The ``torchao`` and ``compressed-tensors`` targets write a folder (config, weight shards,
tokenizer, plan) that a loader reads as one model. :func:`staged_folder` has the writer fill a
hidden staging folder beside ``out_dir`` and moves the files in only once all are complete, so
a failure leaves nothing behind. Moving in, it removes only what would be mistaken for part of
the new model: weight files under the names transformers itself gives them
(``model.safetensors``, ``model-00001-of-00003.safetensors``, ``model.safetensors.index.json``)
left by an earlier, differently sharded write. Any other file in ``out_dir``, another
``*.safetensors`` included, is someone else's and stays. (That ``out_dir`` is not the model's
own folder is checked before any target runs, by :func:`bitplan.apply`.)
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["is_transformers_weight_file", "publish", "staged_folder"]

# transformers' names for a model's weights: one file, or shards numbered with at least five
# digits (``{:05d}``) plus their index.
_WEIGHT_NAME = re.compile(
    r"model\.safetensors|model-\d{5,}-of-\d{5,}\.safetensors|model\.safetensors\.index\.json"
)


def is_transformers_weight_file(name: str) -> bool:
    """Whether ``name`` is a weight file name transformers writes and reads as the model's."""
    return _WEIGHT_NAME.fullmatch(name) is not None


def publish(staging: Path, out_dir: Path) -> None:
    """Move every file of ``staging`` into ``out_dir``; first remove the weight files of an
    earlier write that the new one does not replace (so no loader pairs the new config with
    old shards). Nothing else in ``out_dir`` is touched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in staging.iterdir()}
    for old in out_dir.iterdir():
        if is_transformers_weight_file(old.name) and old.name not in new and old.is_file():
            old.unlink()
    for path in sorted(staging.iterdir()):
        os.replace(path, out_dir / path.name)


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out_dir``; when the block succeeds its files are
    :func:`publish`-ed into ``out_dir``. The staging folder is removed either way."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
