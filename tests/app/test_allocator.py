"""glibc's mmap threshold, fixed at process start: freed few-MiB buffers go back to the system.

The effect is process-wide, so it is measured in fresh interpreters: each allocates and frees
64 buffers of 4 MiB, each followed by a small block that stays (so the freed memory is never at
the heap's top, which glibc would trim anyway), after a 16 MiB free that raised glibc's dynamic
threshold above 4 MiB, as a model's first freed weights do.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bitplan.app import allocator

_PROBE = """
import sys
from pathlib import Path
from bitplan.app.allocator import return_freed_memory

if sys.argv[1] == "fixed":
    assert return_freed_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
big = bytearray(16 << 20)
del big  # glibc's dynamic threshold rises to 16 MiB here
before = rss()
chunks, kept = [], []
for _ in range(64):
    chunks.append(bytearray(4 << 20))  # zero-filled: every page resident
    kept.append(bytearray(1024))  # malloc'd after it: the freed chunk is not the heap's top
del chunks
print(rss() - before)
"""

_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _retained_mib(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True
    )
    return int(done.stdout) / 2**20


@pytest.mark.skipif(not _GLIBC, reason="the mmap threshold is glibc's (Linux)")
def test_freed_buffers_stay_resident_by_default_and_go_back_once_fixed() -> None:
    assert _retained_mib("default") > 200  # most of the 256 MiB kept in the heap
    assert _retained_mib("fixed") < 16


def test_does_nothing_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.return_freed_memory() is False


def test_a_threshold_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.return_freed_memory() is False


def _weights(folder: Path, sizes: dict[str, int]) -> Path:
    folder.mkdir()
    for name, size in sizes.items():
        with open(folder / name, "wb") as f:
            f.truncate(size)  # sparse: the size counts, not the disk
    return folder


def test_checkpoint_bytes_counts_weight_files_only(tmp_path: Path) -> None:
    folder = _weights(
        tmp_path / "model",
        {"a.safetensors": 3000, "b.bin": 200, "config.json": 10_000, "tokenizer.json": 999},
    )
    assert allocator.checkpoint_bytes(str(folder)) == 3200
    assert allocator.checkpoint_bytes(str(folder / "a.safetensors")) == 3000  # one file
    assert allocator.checkpoint_bytes("builtin:tiny-lm") == 0
    assert allocator.checkpoint_bytes(str(tmp_path / "missing")) == 0


def test_only_a_large_checkpoint_fixes_the_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(allocator, "return_freed_memory", lambda: calls.append(1) or True)
    small = _weights(tmp_path / "small", {"model.safetensors": 90 * 2**20})
    large = _weights(
        tmp_path / "large",
        {"model-1.safetensors": 2**29, "model-2.safetensors": allocator.LARGE_CHECKPOINT_BYTES},
    )
    assert allocator.return_freed_memory_for(str(small)) is False
    assert allocator.return_freed_memory_for("builtin:tiny-lm") is False
    assert calls == []  # a small model keeps glibc's faster defaults
    assert allocator.return_freed_memory_for(str(large)) is True
    assert calls == [1]
