"""What an acceptable upload is, checked in a child process with hard limits.

Checking a model means loading it: unzipping, building a transformers model, reading every
weight. A hostile file or a loader bug can make that take minutes and gigabytes (an 85 KB zip
once asked for 100000 layers); in the API process that cost would be the whole service's. So
the API (:mod:`bitplan.app.validation`) runs ``python -m bitplan.app.upload_check`` once per
upload, and this child bounds itself before it loads anything:

- memory: ``RLIMIT_DATA`` (private memory: the heap, tensors, and the weight files that
  safetensors maps copy-on-write), so an allocation past the limit fails inside the child and
  is reported as such;
- disk: ``RLIMIT_FSIZE`` caps any one file at the unzip limit (the extractor already bounds
  the total, :func:`bitplan.sensitivity.safety.extract_zip`), the child works in a scratch
  folder its parent removes, and writes no core file;
- life: it dies with its parent (:func:`bitplan.app.supervised_worker.die_with_parent`); the
  parent kills it at its wall-clock limit.

Its answer is one JSON object on the stdout it was started with (anything a library prints
goes to stderr instead): ``{"outcome": "valid", "summary": ...}``, ``{"outcome": "invalid",
"detail": ...}`` (an :class:`InputError` message; the parent swaps server paths for the client's
file name), ``{"outcome": "out-of-memory"}``, or ``{"outcome": "failed", "error": <type>}``
(anything else a hostile file made a loader raise). Each also carries ``peak_rss_bytes``.

Datasets are checked here too (:func:`check_dataset`): in the API process when small, in this
child when large (see :mod:`bitplan.app.validation`).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import resource
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from bitplan.app.supervised_worker import die_with_parent
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.safety import max_unzip_bytes, read_safetensors_header
from bitplan.sensitivity.textdata import read_jsonl, read_txt

__all__ = ["DATASET_SUFFIXES", "KINDS", "check_dataset", "check_model", "main", "run_check"]

log = logging.getLogger(__name__)

DATASET_SUFFIXES = (".txt", ".jsonl", ".safetensors")
KINDS = ("model", "dataset")
# How a failed allocation reads when a library reports it as some other error: torch's CPU
# allocator (a RuntimeError), and strerror(ENOMEM) quoted by safetensors when it cannot map a
# weight file.
_ALLOCATION_FAILED = ("can't allocate memory", os.strerror(errno.ENOMEM))


def check_dataset(path: Path, *, filename: str) -> str:
    """Raise :class:`InputError` unless ``path`` reads as a ``.txt``/``.jsonl``/``.safetensors``;
    return a one-line summary.

    Text is parsed with the loader's own readers (the same messages a job would give); a
    safetensors file has its header read, not its tensors: those are checked against the model
    when a job loads them.
    """
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        raise InputError(
            f"unsupported dataset file {filename!r}; accepted: {', '.join(DATASET_SUFFIXES)}"
        )
    shown = Path(filename)  # messages name the client's file, not the stored one
    if suffix == ".txt":
        return f"{len(read_txt(path.read_bytes(), shown))} text samples"
    if suffix == ".jsonl":
        texts, _ = read_jsonl(path.read_bytes(), shown, with_labels=True)
        return f"{len(texts)} records"
    names = [name for name in read_safetensors_header(path, label=filename) if name != "labels"]
    if not names:
        raise InputError(
            f"{filename} holds no input tensors; name them after the model's "
            "forward arguments (e.g. pixel_values, input_ids)"
        )
    return f"tensors {', '.join(sorted(names))}"


def check_model(path: Path, *, trusted: bool, cache_dir: Path) -> str:
    """Load ``path`` as :func:`bitplan.sensitivity.models.load_model` would for a job (a zip is
    extracted under ``cache_dir``); raise :class:`InputError` when it is not a usable model,
    else return a one-line summary. Its messages name ``path`` itself: the caller scrubs them.
    """
    # Imported here, under the child's limits: the API process imports this module for
    # check_dataset and never loads the model stack.
    from bitplan.sensitivity.models import load_model

    loaded = load_model(str(path), device="cpu", trusted=trusted, cache_dir=cache_dir)
    return f"task {loaded.task}, {len(loaded.layers)} layers"


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an error it was raised from is a failed allocation (loaders wrap
    errors in :class:`InputError` ``from None``, which still keeps the original as context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError):
            return True
        if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
            return True
        if any(words in str(exc) for words in _ALLOCATION_FAILED):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _limit(which: int, value: int) -> None:
    """Lower the soft limit ``which`` to ``value`` (never above the hard limit)."""
    _, hard = resource.getrlimit(which)
    soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (soft, hard))


@contextmanager
def _memory_limit(value: int) -> Iterator[None]:
    """Private memory limited to ``value`` for the block only: the limit is back as it was
    before an error is looked at or the answer written, even after a failed allocation."""
    previous = resource.getrlimit(resource.RLIMIT_DATA)
    _limit(resource.RLIMIT_DATA, value)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, previous)


def run_check(
    *, kind: str, path: Path, filename: str, trusted: bool, scratch: Path, memory_bytes: int
) -> dict[str, Any]:
    """Check ``path`` with at most ``memory_bytes`` of private memory and say how it went (the
    answer the child writes, see the module docstring)."""
    try:
        with _memory_limit(memory_bytes):
            if kind == "model":
                summary = check_model(path, trusted=trusted, cache_dir=scratch)
            else:
                summary = check_dataset(path, filename=filename)
    except Exception as exc:  # a hostile file may break a loader anywhere: all are answered
        if _out_of_memory(exc):
            return {"outcome": "out-of-memory"}
        if isinstance(exc, InputError):
            return {"outcome": "invalid", "detail": str(exc)}
        log.warning("%s failed its check", filename, exc_info=True)
        return {"outcome": "failed", "error": type(exc).__name__}
    return {"outcome": "valid", "summary": summary}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bitplan.app.upload_check", description=__doc__.partition("\n")[0]
    )
    parser.add_argument("--parent", type=int, required=True, help="pid of the API process")
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--filename", required=True, help="the client's name of the file")
    parser.add_argument("--memory-bytes", type=int, required=True, help="RLIMIT_DATA")
    parser.add_argument("--scratch", type=Path, required=True, help="a private work folder")
    parser.add_argument("--trusted", action="store_true", help="the operator trusts models")
    parser.add_argument("path", type=Path, help="the stored upload")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The child's entry point: always exits 0 after writing one answer."""
    args = _parser().parse_args(argv)
    die_with_parent(args.parent)
    answer_fd = os.dup(1)
    os.dup2(2, 1)  # a library's print() must not corrupt the answer
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _limit(resource.RLIMIT_CORE, 0)  # a crash must not leave a core file behind
    _limit(resource.RLIMIT_FSIZE, max_unzip_bytes())
    answer = run_check(
        kind=args.kind,
        path=args.path,
        filename=args.filename,
        trusted=args.trusted,
        scratch=args.scratch,
        memory_bytes=args.memory_bytes,
    )
    answer["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with os.fdopen(answer_fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
