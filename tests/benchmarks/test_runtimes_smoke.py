"""The runtime round-trip benchmark: one ``--quick`` run end to end, and its KL.

The quick run searches three small plans, writes them for every target, loads each with its
runtime's own code (bitplan, transformers + torchao, transformers + compressed-tensors,
llama.cpp) and must leave ``benchmarks/RESULTS.md`` alone. The checks are what the runtimes
promise: torchao and compressed-tensors hold bitplan's exact weights, bitplan's artifact holds
exactly the plan's bytes, and every byte beyond the plan's is accounted for by the writer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from benchmarks import runtimes
from benchmarks._common import RESULTS_PATH

# Runtimes that hold bitplan's exact weights and run them in torch: the same KL up to the
# float32 rounding of a batch run in another shape.
EXACT = ("bitplan", "torchao", "compressed-tensors")
# llama.cpp quantizes activations too (its tests measured ×1.4 on tiny-lm); a wrong tensor
# layout or rope order gives errors orders of magnitude larger, a lost quantization ~0.
GGUF_RATIO = (0.5, 5.0)


def _results_text() -> str | None:
    return RESULTS_PATH.read_text(encoding="utf-8") if RESULTS_PATH.exists() else None


def test_a_quick_run_loads_every_target_in_its_runtime(tmp_path: Path) -> None:
    before = _results_text()
    out = tmp_path / "report.json"
    assert runtimes.main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert _results_text() == before

    seen = {(c["model"], c["family"], t["target"]) for c in report["cases"] for t in c["targets"]}
    assert seen == {
        ("tiny-lm", "ggml", "bitplan"),
        ("tiny-lm", "ggml", "gguf"),
        ("tiny-lm", "int", "bitplan"),  # as its transformers OPT twin for torchao and vLLM's format
        ("tiny-lm", "int", "torchao"),
        ("tiny-lm", "int", "compressed-tensors"),
        ("llama", "int", "bitplan"),
        ("llama", "int", "torchao"),
        ("llama", "int", "compressed-tensors"),
        ("llama", "ggml", "bitplan"),
        ("llama", "ggml", "gguf"),
    }
    for case in report["cases"]:
        plan = case["plan"]
        assert plan["holdout_error"] > 0  # a quantized plan, measured on held-out windows
        assert math.isclose(case["bitplan_kl_remeasured"], plan["holdout_error"], rel_tol=1e-3)
        if case["family"] == "int":
            assert set(plan["formats"]) <= {"int8", "int4-g32", "int4-g128"}
        for row in case["targets"]:
            assert row["cold_load_s"] > 0 and row["load_s"] > 0 and row["first_forward_s"] > 0
            assert row["tensor_bytes"] == row["report_total_bytes"]  # the report is the files
            assert row["extra_bytes"] == row["explained_bytes"], row  # every byte accounted
            assert row["file_bytes"] > row["tensor_bytes"]  # headers
            if row["target"] == "bitplan":
                assert row["extra_bytes"] == 0
            if row["target"] in ("torchao", "compressed-tensors"):
                assert row["extra_bytes"] > 0  # int8 a code / int32 words, never packed tighter
            if row["target"] in EXACT:
                assert math.isclose(row["ratio"], 1.0, rel_tol=1e-3), row
            else:
                assert GGUF_RATIO[0] < row["ratio"] < GGUF_RATIO[1], row

    text = runtimes.to_markdown(report)
    assert text.count("\n| tiny-lm |") == 2 + 5 and text.count("\n| llama |") == 2 + 5
    assert "does NOT add up" not in text and "--quick" in text


def test_kl_per_token_is_kl_of_the_next_token_positions() -> None:
    half = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    skew = torch.tensor([0.25, 0.75], dtype=torch.float64).log()
    ref = torch.stack([half, half, skew]).unsqueeze(0)  # (1, 3, 2): the last position unused
    other = torch.stack([skew, half, half]).unsqueeze(0)  # (1, 3, 2)
    # KL(half ‖ skew) at position 0, 0 at position 1
    want = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2
    assert math.isclose(runtimes.kl_per_token(ref, other), want, rel_tol=1e-12)
    assert runtimes.kl_per_token(ref, ref) == 0.0
