"""Peak memory of block-wise ``layer`` analysis against loading the whole model.

Why: block-wise analysis (:mod:`bitplan.sensitivity.blockwise`) exists so that a model larger
than memory can still get its sensitivity table; its claim is that it holds one block's weights
(plus the cached activations) instead of the whole model, and that its table is the whole
model's. This script measures both claims on one model.

What runs, offline on the CPU: a random LLaMA (seeded; 12 blocks, hidden 1024, vocabulary
32000, float32: 207 M parameters, 0.83 GB) is saved as a Hugging Face folder with a
``.safetensors`` file of 16 random windows of 128 tokens as calibration data; then ``bitplan
analyze --method layer`` runs in a fresh process without and with ``--blockwise``, each once with
glibc's default allocator settings and once with ``MALLOC_MMAP_THRESHOLD_=131072``. glibc raises
its mmap threshold (up to 32 MiB) after large frees, so tensors of a few MiB, freed block after
block, can stay in the heap; a fixed threshold returns them to the system. Each process reports
its peak resident memory (``ru_maxrss``, which includes the ~0.4 GB that importing torch and
transformers costs) and its wall time, and the ``sensitivity.csv`` files are compared. Linux
carries a process's peak RSS across ``fork`` and ``exec``, so the model is written by a child
too and this process never imports torch: its own size would otherwise be every run's floor.

Run: ``python -m benchmarks.blockwise_memory [--blocks 12] [--hidden 1024]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import resource, sys, time
from bitplan.app.cli import app
start = time.perf_counter()
try:
    app(sys.argv[1:])
except SystemExit as exit:
    if exit.code:
        raise
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"RESULT {peak} {time.perf_counter() - start:.1f}")
"""


_FIXED_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _write_model(folder: Path, *, blocks: int, hidden: int) -> int:
    """A seeded random LLaMA in ``folder``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=blocks,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _write_calib(path: Path, *, samples: int = 16, tokens: int = 128) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    save_file({"input_ids": torch.randint(0, 32000, (samples, tokens), generator=gen)}, path)


def _run(root: Path, name: str, *extra: str, env: dict[str, str]) -> tuple[int, float]:
    """``bitplan analyze`` in a fresh process writing to ``root/name``: (peak RSS, seconds)."""
    args = ["analyze", str(root / "model"), "--calib", str(root / "calib.safetensors")]
    args += ["--method", "layer", "--formats", "int8,int4-g128", "--device", "cpu"]
    args += ["-o", str(root / name), *extra]
    env = dict(os.environ, **env, BITPLAN_CACHE_DIR=str(root / f"cache-{name}"))  # no shared table
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True, env=env
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    peak, seconds = line.split()[1:]
    return int(peak), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write = (
            "import sys; from pathlib import Path; import benchmarks.blockwise_memory as b; "
            f"n = b._write_model(Path(sys.argv[1]) / 'model', blocks={args.blocks}, "
            f"hidden={args.hidden}); b._write_calib(Path(sys.argv[1]) / 'calib.safetensors'); "
            "print(n)"
        )
        done = subprocess.run(
            [sys.executable, "-c", write, str(root)], capture_output=True, text=True, check=True
        )
        n_params = int(done.stdout.split()[-1])
        print(f"random LLaMA: {n_params / 1e6:.0f} M parameters, {n_params * 4 / 1e9:.2f} GB")
        rows = {}
        for malloc, env in (("default", {}), ("mmap 128 KiB", _FIXED_THRESHOLD)):
            for name, extra in (("whole", ()), ("blockwise", ("--blockwise",))):
                rows[name, malloc] = _run(root, f"{name}-{len(env)}", *extra, env=env)
        tables = [pd.read_csv(path) for path in sorted(root.glob("*/sensitivity.csv"))]
        same = all(t.equals(tables[0]) for t in tables)
    print(f"{'run':<10} {'glibc malloc':<13} {'peak RSS MiB':>12} {'seconds':>8}")
    for (name, malloc), (peak, seconds) in rows.items():
        print(f"{name:<10} {malloc:<13} {peak / 2**20:12.0f} {seconds:8.1f}")
    print(f"tables identical: {same} ({len(tables)} tables)")


if __name__ == "__main__":
    main()
