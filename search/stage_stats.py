"""What each stage of a job cost: wall seconds, peak resident and GPU memory, forward-equivalents.

Issue 9 bounds a job twice: peak RSS against the checkpoint's bytes, and the whole search
against a number of forward passes over the calibration set. Neither is checkable unless every
stage says what it used, so :class:`StageRecorder` wraps the pipeline's ``ProgressFn``
(:mod:`bitplan.sensitivity.progress`), which already names the stages: a stage runs from the
first report of its name to the first report of another name (a name seen again adds to its
record), and the caller's own callback still sees every report.

- Peak RSS: the kernel's high-water mark (``VmHWM``) cannot be reset per stage, so a daemon
  thread samples the process's resident set every ``interval_s`` (default 50 ms), plus once at
  every stage switch. A spike shorter than the interval can be missed; the whole-run peak of
  ``getrusage`` bounds it from above.
- Forward-equivalents: a forward pre-hook on the model's top module (:meth:`StageRecorder.watch`)
  counts the samples of every batch it runs, divided by the samples of one pass over the
  calibration split. Held-out passes count in the same unit; backward passes (``fisher``) and
  single layers run on cached inputs (``layer``'s per-layer scoring) are not counted.

- Peak GPU memory: the CUDA caching allocator's own high-water mark
  (``torch.cuda.max_memory_allocated``), read and reset at every stage switch, so each stage
  gets the most its tensors held at once; ``None`` for a process that never initialised CUDA (a
  CPU job, where reading would initialise it). It counts tensors only, not the allocator's
  cached blocks or the CUDA context, and the reset is process-wide: code that reads the same
  counter across a job sees it restart at each stage.

RSS comes from ``/proc/self/statm`` on Linux (no dependency, microseconds) or psutil where it is
installed; elsewhere the peak is ``None``.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bitplan.sensitivity.progress import ProgressFn

__all__ = [
    "StageRecorder",
    "StageStat",
    "format_stages",
    "gpu_peak_bytes",
    "rss_bytes",
    "watch_forwards",
]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _statm_rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _psutil_rss() -> int | None:
    try:  # not a dependency of bitplan (and untyped): used only where it happens to be installed
        psutil = importlib.import_module("psutil")
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _rss_reader() -> Callable[[], int | None]:
    return _statm_rss if _statm_rss() is not None else _psutil_rss


rss_bytes: Callable[[], int | None] = _rss_reader()
"""This process's resident set size in bytes now, or None where it cannot be read."""


def gpu_peak_bytes() -> int | None:
    """The most bytes CUDA tensors held at once since the previous call (which reset it), or
    None when this process has not initialised CUDA."""
    if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # torch leaves it untyped
        return None
    peak = int(torch.cuda.max_memory_allocated())
    torch.cuda.reset_peak_memory_stats()
    return peak


@dataclass
class StageStat:
    """One stage's totals; :meth:`as_dict` is its JSON form (job results, the API)."""

    stage: str
    seconds: float = 0.0
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    samples: int = 0  # forwarded through the watched module

    def note_rss(self, rss: int | None) -> None:
        if rss is not None and (self.peak_rss_bytes is None or rss > self.peak_rss_bytes):
            self.peak_rss_bytes = rss

    def note_gpu(self, peak: int | None) -> None:
        if peak is not None and (self.peak_gpu_bytes is None or peak > self.peak_gpu_bytes):
            self.peak_gpu_bytes = peak

    def as_dict(self, samples_per_pass: int | None) -> dict[str, Any]:
        equivalents = None if not samples_per_pass else round(self.samples / samples_per_pass, 3)
        return {
            "stage": self.stage,
            "seconds": round(self.seconds, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "forward_equivalents": equivalents,
        }


def _batch_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The batch size of one call: the first dimension of its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


class StageRecorder:
    """A ``ProgressFn`` that records :class:`StageStat` per stage and passes every report on.

    Use as a context manager: entering starts the RSS sampler, leaving stops it, closes the
    current stage and removes the forward hook. :meth:`stages` is the JSON-ready list, in the
    order the stages first ran.
    """

    def __init__(self, progress: ProgressFn | None = None, *, interval_s: float = 0.05) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._progress, self._interval_s = progress, interval_s
        self._lock = threading.Lock()
        self._records: dict[str, StageStat] = {}
        self._current: StageStat | None = None
        self._since = 0.0
        self._samples_per_pass: int | None = None
        self._hook: RemovableHandle | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StageRecorder:
        gpu_peak_bytes()  # the first stage's GPU peak starts here, not at the process's start
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="stage-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._close_current(time.perf_counter())
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        rss = rss_bytes()
        with self._lock:
            if self._current is None or self._current.stage != stage:
                if self._current is not None:
                    self._current.note_rss(rss)  # the memory it held up to its end
                self._close_current(now)  # its GPU peak too, and the next stage's starts
                self._current = self._records.setdefault(stage, StageStat(stage))
                self._since = now
            self._current.note_rss(rss)
        if self._progress is not None:
            self._progress(stage, done, total)

    def watch(self, module: nn.Module, *, samples_per_pass: int) -> None:
        """Count the samples ``module`` forwards from now on, ``samples_per_pass`` making one
        forward-equivalent (the calibration split's size)."""
        if samples_per_pass < 1:
            raise ValueError(f"samples_per_pass must be >= 1, got {samples_per_pass}")
        if self._hook is not None:
            self._hook.remove()
        self._samples_per_pass = samples_per_pass
        self._hook = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def stages(self) -> list[dict[str, Any]]:
        """Every stage so far: ``stage``, ``seconds``, ``peak_rss_bytes`` (None where RSS
        cannot be read), ``peak_gpu_bytes`` (None for a stage that ran without CUDA; the
        current stage's is known once it ends) and ``forward_equivalents`` (None when no module
        was watched)."""
        with self._lock:
            return [r.as_dict(self._samples_per_pass) for r in self._records.values()]

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rows = _batch_rows(args, kwargs)
        with self._lock:
            if self._current is not None:
                self._current.samples += rows

    def _close_current(self, now: float) -> None:
        if self._current is not None:
            self._current.seconds += now - self._since
            self._current.note_gpu(gpu_peak_bytes())
            self._current = None

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            rss = rss_bytes()
            with self._lock:
                if self._current is not None:
                    self._current.note_rss(rss)


def watch_forwards(
    progress: ProgressFn | None, module: nn.Module, *, samples_per_pass: int
) -> None:
    """Count ``module``'s forwards when ``progress`` is a :class:`StageRecorder`; else nothing."""
    if isinstance(progress, StageRecorder) and samples_per_pass > 0:
        progress.watch(module, samples_per_pass=samples_per_pass)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def format_stages(stages: list[dict[str, Any]]) -> str:
    """One line per stage: seconds, peak RSS in MiB, peak GPU memory in MiB (a column only when
    some stage used the GPU) and forward-equivalents (``-``: unknown)."""
    gpu = any(s.get("peak_gpu_bytes") is not None for s in stages)
    gpu_head = f" {'peak GPU MiB':>12}" if gpu else ""
    lines = [f"{'stage':<10} {'seconds':>8} {'peak RSS MiB':>12}{gpu_head} {'forwards':>8}"]
    for s in stages:
        fwd = s.get("forward_equivalents")
        gpu_cell = f" {_mib(s.get('peak_gpu_bytes')):>12}" if gpu else ""
        lines.append(
            f"{s['stage']:<10} {s['seconds']:>8.1f} {_mib(s.get('peak_rss_bytes')):>12}"
            f"{gpu_cell} {'-' if fwd is None else f'{fwd:.2f}':>8}"
        )
    return "\n".join(lines)
