"""Helpers every benchmark script shares: what machine ran it, how long and how much memory.

Benchmark numbers mean nothing without the machine and date they were taken on, so each script
records its results as one ``## <title>`` section of ``benchmarks/RESULTS.md`` headed by
:func:`machine_info`; :func:`update_results_section` replaces that section in place (or appends
it), so each script owns its section and re-running one script leaves the others' untouched.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

__all__ = [
    "RESULTS_PATH",
    "Timer",
    "machine_info",
    "peak_rss_mb",
    "publish_report",
    "update_results_section",
]

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"

_HEADER = "# Benchmark results\n\nRecorded by the scripts in this folder (`make bench`).\n"


def _cpu_model() -> str:
    """The CPU's marketing name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_gib() -> float | None:
    """Total physical memory in GiB, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> str:
    """One line: date, CPU model, cores, RAM, OS, Python and torch versions (and the GPU)."""
    ram = _ram_gib()
    parts = [
        _dt.date.today().isoformat(),
        _cpu_model(),
        f"{os.cpu_count()} cores (torch threads {torch.get_num_threads()})",
        f"{ram:.0f} GiB RAM" if ram is not None else "RAM unknown",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    return " · ".join(parts)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, ``perf_counter``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = time.perf_counter() - self._start


def update_results_section(title: str, markdown: str, path: Path = RESULTS_PATH) -> Path:
    """Write ``markdown`` as the section ``## title`` of ``path``, replacing an existing one.

    A section runs from its ``## title`` line to the next ``## `` heading (or the end of the
    file). The file is created with a short header when missing. Returns ``path``.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else _HEADER
    section = f"## {title}\n\n{markdown.strip()}\n"
    pattern = re.compile(
        rf"^## {re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", flags=re.MULTILINE | re.DOTALL
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def publish_report(
    text: str, report: dict[str, Any], *, section: str, json_path: Path | None, record: bool
) -> None:
    """Print a benchmark's markdown ``text``, write its raw ``report`` to ``json_path`` (when
    given) and, with ``record``, make ``text`` the ``section`` of the results file: quick or
    trial runs are shown, never recorded."""
    sys.stdout.write(text + "\n")
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if record:
        logging.getLogger(__name__).info("wrote %s", update_results_section(section, text))
