"""The Rounder: formats with a rounding, the input statistics it keeps, and the codes it makes.

The rounding algorithms themselves are tested against references in test_rounding*.py; here the
question is whether every caller gets the codes of the right statistics (a Linear's Gram matrix,
each convolution block's own, nothing silently rounded to nearest instead).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.format_spec import FormatError, parse_format, tensor_bytes
from bitplan.sensitivity.formats import fake_quantize, quantize_codes
from bitplan.sensitivity.layers import find_quant_layers
from bitplan.sensitivity.rounder import STATS_GLOB, Rounder, collect_rounder, needs_data
from bitplan.sensitivity.rounding import round_codes


def test_a_rounding_is_an_option_of_the_same_storage_format() -> None:
    fmt = parse_format(" INT4-g32-asym+GPTQ ")
    assert (fmt.name, fmt.base_name, fmt.rounding) == (
        "int4-g32-asym+gptq",
        "int4-g32-asym",
        "gptq",
    )
    base = parse_format("int4-g32-asym")
    assert fmt != base and fmt.with_rounding("rtn") == base
    assert tensor_bytes(fmt, 7, 100) == tensor_bytes(base, 7, 100)
    assert needs_data([base, fmt]) and not needs_data([base, base.with_rounding("hqq")])


@pytest.mark.parametrize(
    ("name", "says"),
    [("fp16+gptq", "only rtn"), ("q4_0+hqq", "only rtn"), ("int4-g32+best", "unknown rounding")],
)
def test_roundings_that_do_not_apply_are_refused(name: str, says: str) -> None:
    with pytest.raises(FormatError, match=says):
        parse_format(name)


def test_nothing_rounds_a_gptq_format_to_nearest_behind_the_callers_back() -> None:
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match="needs a Rounder"):
        fake_quantize(w, parse_format("int4-g32+gptq"))
    with pytest.raises(ValueError, match="needs a Rounder"):
        quantize_codes(w, parse_format("int4-g32+hqq"))


def test_without_statistics_rtn_and_hqq_work_and_gptq_says_what_it_needs() -> None:
    w = torch.randn(8, 64)
    rounder = Rounder()
    fmt = parse_format("int3-g32")
    assert torch.equal(rounder.codes("w", w, fmt).q, quantize_codes(w, fmt).q)
    hqq = rounder.codes("w", w, fmt.with_rounding("hqq"))
    assert torch.equal(hqq.q, round_codes(w, fmt, "hqq").q)
    with pytest.raises(InputError, match="calibration data"):
        rounder.codes("w", w, fmt.with_rounding("gptq"))


def test_a_linear_layer_is_rounded_with_its_own_input_gram_matrix(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    xs = [torch.randn(5, 16) for _ in range(3)]
    rounder = collect_rounder(
        model,
        find_quant_layers(model),
        batches=lambda: [{"input": x} for x in xs],
        forward=lambda batch: model(batch["input"]),
        workdir=tmp_path,
    )
    assert sorted(tmp_path.glob(STATS_GLOB))  # beside the plans, for `bitplan apply`
    with torch.no_grad():
        hidden = torch.cat([model[1](model[0](x)) for x in xs])  # (15, 24): layer 2's inputs
    gram = hidden.T @ hidden
    fmt = parse_format("int3-g8+gptq")
    w = model[2].weight.detach()
    got = rounder.codes("2.weight", w, fmt)
    want = round_codes(w, fmt.with_rounding("rtn"), "gptq", gram=gram)
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
    # Read back from the files alone, as `bitplan apply` does: the same integers.
    again = Rounder.from_folder(tmp_path)
    assert again is not None
    assert torch.equal(again.codes("2.weight", w, fmt).q, got.q)


def test_each_convolution_block_is_rounded_with_its_own_inputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    conv = nn.Conv1d(4, 6, kernel_size=3, groups=2, bias=False)
    model = nn.Sequential(conv)
    x = torch.randn(3, 4, 10)
    rounder = collect_rounder(
        model,
        find_quant_layers(model),
        batches=lambda: [{"input": x}],
        forward=lambda batch: model(batch["input"]),
        workdir=tmp_path,
    )
    w = conv.weight.detach().reshape(6, -1)  # (rows, cols): 3 output channels per block
    fmt = parse_format("int2-g3-asym+gptq")
    base = fmt.with_rounding("rtn")
    patches = torch.nn.functional.unfold(x.unsqueeze(2), (1, 3))  # (B, 4·3, L)
    per_block = patches.view(3, 2, 6, -1).permute(1, 0, 3, 2).reshape(2, -1, 6)  # (2, B·L, 6)
    want = [
        round_codes(w[3 * g : 3 * g + 3], base, "gptq", gram=per_block[g].T @ per_block[g])
        for g in range(2)
    ]
    whole = rounder.codes("0.weight", w, fmt)
    assert torch.equal(whole.q, torch.cat([c.q for c in want]))
    # A chunk of rows that starts inside block 0 and runs into block 1 (rows 2..4).
    part = rounder.codes("0.weight", w[2:5], fmt, row0=2)
    assert torch.equal(part.q, whole.q[2:5]) and torch.equal(part.zero, whole.zero[2:5])


def test_codes_of_a_layer_are_rounded_once_while_they_fit_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bitplan.sensitivity.rounder as rounder_module

    calls: list[str] = []

    def counting(w: torch.Tensor, fmt: object, rounding: str, **kw: object) -> object:
        calls.append(rounding)
        return round_codes(w, fmt, rounding, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rounder_module, "round_codes", counting)
    w = torch.randn(8, 64)
    fmt = parse_format("int4-g32+hqq")
    small = Rounder(cache_bytes=8 * 64 * 2 + 8 * 2 * 2)  # one layer's int16 codes + scales
    first = small.codes("a", w, fmt)
    assert small.codes("a", w, fmt) is first and calls == ["hqq"]
    small.codes("b", w, fmt)  # evicts a
    small.codes("a", w, fmt)
    assert calls == ["hqq"] * 3
