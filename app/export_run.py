"""The worker's side of a model export (app/model_exports.py): write the target, then pack it.

:func:`run_export` is ``bitplan apply MODEL PLAN --to TARGET`` on the job's model and plan: it
calls :func:`bitplan.apply`, which picks the writer from the same registry as the CLI
(:data:`bitplan.search.targets.TARGETS`), so the service and the command line write the same
files and cannot drift apart. The worker runs it into a folder inside its staging folder (the
Hugging Face writers stage beside their output folder, which is then inside it too), so a
worker killed mid-export leaves only the staging folder, which the next attempt or the sweep
removes. :func:`pack_export` then turns the output into the one file the API streams: a single
file as is (``model.gguf``), a folder as a reproducible zip stored without compression
(quantized codes hardly compress, and the zip stays the files' size plus headers).

The worker loads the runner by name (``Settings.export_runner``), as it loads the search's, so
tests can stand in a slower one.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

from bitplan.app.archive import file_sha256, zip_folder
from bitplan.app.model_exports import ExportSpec, RuntimeUnavailable
from bitplan.search.targets import target_writer
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import CancelFn, ProgressFn, check_cancel, report

__all__ = ["ZIP_FILE", "pack_export", "run_export"]

log = logging.getLogger(__name__)

ZIP_FILE = "model.zip"  # the name of a packed folder inside the export's artifact folder
_MEDIA_ZIP = "application/zip"
_MEDIA_FILE = "application/octet-stream"


def run_export(
    spec: ExportSpec,
    *,
    plan_path: Path,
    out_dir: Path,
    cache_dir: Path,
    progress: ProgressFn,
    should_cancel: CancelFn,
) -> None:
    """Write ``spec.target`` for the plan at ``plan_path`` into ``out_dir``.

    Raises :class:`~bitplan.app.model_exports.RuntimeUnavailable` when this worker lacks the
    target's runtime packages (before any work), and
    :class:`~bitplan.sensitivity.errors.InputError` when the target refuses the plan.
    """
    try:
        target_writer(spec.target)
    except InputError as error:
        message = f"this server's workers cannot write {spec.target}: {error}"
        raise RuntimeUnavailable(message) from None
    check_cancel(should_cancel)
    report(progress, "export", 0, 1)
    import bitplan  # torch and the model loaders: only when an export runs

    bitplan.apply(
        model=spec.model,
        plan=plan_path,  # a path: the job's rounding statistics are found beside its plans
        out_dir=out_dir,
        to=spec.target,
        model_name=spec.model_name,
        cache_dir=cache_dir,
    )
    report(progress, "export", 1, 1)


def pack_export(written: Path, dest: Path) -> dict[str, Any]:
    """Turn the folder a target wrote into one file in ``dest`` and describe it: a folder
    holding one file gives that file, any other folder a zip of it. ``written`` is removed.
    Returns the result fields the API serves the file by: ``file`` (its name in ``dest``),
    ``bytes``, ``sha256`` and ``media_type``."""
    files = sorted(path for path in written.rglob("*") if path.is_file())
    if not files:
        raise RuntimeError(f"the export wrote no file into {written.name}")
    if len(files) == 1 and files[0].parent == written:
        artifact = files[0].rename(dest / files[0].name)
        media_type = _MEDIA_FILE
    else:
        artifact = zip_folder(written, dest / ZIP_FILE, compression=zipfile.ZIP_STORED)
        media_type = _MEDIA_ZIP
    shutil.rmtree(written)
    size = artifact.stat().st_size
    log.info("packed the export as %s (%d bytes)", artifact.name, size)
    return {
        "file": artifact.name,
        "bytes": size,
        "sha256": file_sha256(artifact),
        "media_type": media_type,
    }
