"""Block-wise ``layer`` analysis: the whole-model table, one block's weights at a time.

The decoders here are tiny random models saved as Hugging Face folders; calibration batches
have padding, so the attention mask travels from the embeddings to every block's statistics.
The block-wise table is compared with ``analyze`` on the fully loaded model for equality: both
run the same operations on the same tensors in the same order, so no tolerance is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bitplan.app.cli import app
from bitplan.sensitivity.analyzer import analyze
from bitplan.sensitivity.blockwise import blockwise_layer_errors
from bitplan.sensitivity.data import CalibData
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_formats
from bitplan.sensitivity.lazy_hf import load_skeleton
from bitplan.sensitivity.models import load_model
from tests.helpers import SENTENCES, VOCAB_SIZE, tiny_hf_config, write_tiny_hf_model

# A rounded option too: GPTQ rounds from each layer's H, which block-wise collects on the way.
OPTIONS = ["int8", "int4-g32", "int4-g32+gptq", "int2-g16-asym"]


def _write_decoder(
    folder: Path, model_type: str, *, tie: bool = False, dtype: torch.dtype = torch.float32
) -> Path:
    """A tiny random causal LM of ``model_type`` (hidden 32, 2 blocks) saved to ``folder``."""
    import transformers

    if model_type in ("llama", "gpt2") and not tie:
        return write_tiny_hf_model(
            folder, model_type, task="text-generation", tokenizer=False, dtype=dtype
        )
    if model_type in ("llama", "gpt2"):
        config = tiny_hf_config(model_type)
    else:  # LLaMA's shape under another model_type's code
        config_cls = {"mistral": "MistralConfig", "qwen2": "Qwen2Config"}[model_type]
        fields = tiny_hf_config("llama").to_dict()
        keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        keep += ("num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        config = getattr(transformers, config_cls)(**{k: fields[k] for k in keep})
    config.tie_word_embeddings = tie
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(dtype).save_pretrained(folder)
    return folder


def _calib(n: int = 6, length: int = 12) -> CalibData:
    """Random token ids; every other sample padded at the end (mask 0 there)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB_SIZE, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.int64)
    mask[::2, length // 2 :] = 0
    ids[mask == 0] = 0
    return CalibData(inputs={"input_ids": ids, "attention_mask": mask}, labels=None, sha256="c")


def _tables(folder: Path, calib: CalibData) -> tuple[pd.DataFrame, pd.DataFrame]:
    whole = load_model(str(folder), device="cpu")
    skeleton = load_skeleton(str(folder), device="cpu")
    options = dict(method="layer", formats=OPTIONS, batch_size=4)
    return analyze(whole, calib, **options), analyze(skeleton, calib, **options)


@pytest.mark.parametrize(
    ("model_type", "tie", "dtype"),
    [
        ("llama", False, torch.float32),
        ("llama", True, torch.float32),
        ("llama", False, torch.bfloat16),  # activations stay in the checkpoint dtype
        ("mistral", False, torch.float32),
        ("qwen2", False, torch.float32),
        ("gpt2", True, torch.float32),
    ],
    ids=["llama", "llama-tied", "llama-bf16", "mistral", "qwen2", "gpt2-tied"],
)
def test_blockwise_table_equals_whole_model_table(
    tmp_path: Path, model_type: str, tie: bool, dtype: torch.dtype
) -> None:
    folder = _write_decoder(tmp_path / "model", model_type, tie=tie, dtype=dtype)
    whole, blockwise = _tables(folder, _calib())
    assert (whole["tie"].fillna("") != "").any() == tie  # the tied embedding/head path is exercised
    assert set(whole["format"]) == set(OPTIONS)
    assert (whole["error"] > 0).all()
    pd.testing.assert_frame_equal(blockwise, whole, check_exact=True)


def test_skeleton_matches_the_loaded_model_without_weights(tmp_path: Path) -> None:
    folder = _write_decoder(tmp_path / "model", "llama")
    whole = load_model(str(folder), device="cpu", exclude=["lm_head"], pins={"*.k_proj": "int8"})
    skeleton = load_skeleton(
        str(folder), device="cpu", exclude=["lm_head"], pins={"*.k_proj": "int8"}
    )
    assert skeleton.sha256 == whole.sha256  # so the two share cached tables
    assert skeleton.layers == whole.layers
    assert all(p.is_meta for p in skeleton.module.parameters())
    assert skeleton.module.model.rotary_emb.inv_freq.device.type == "cpu"  # buffers are real


def test_at_most_one_block_of_weights_is_ever_materialised(tmp_path: Path) -> None:
    folder = _write_decoder(tmp_path / "model", "llama", tie=False)
    skeleton = load_skeleton(str(folder), device="cpu")
    module = skeleton.module
    blocks = [f"model.layers.{i}." for i in range(len(module.model.layers))]
    sizes = {prefix: 0 for prefix in blocks}
    for name, p in module.named_parameters():
        for prefix in blocks:
            if name.startswith(prefix):
                sizes[prefix] += p.numel()
    total = sum(p.numel() for p in module.parameters())
    ends = [module.model.embed_tokens.weight.numel(), total - sum(sizes.values())]
    largest = max(*sizes.values(), ends[0], ends[1] - ends[0])  # a block, the front, the tail
    seen: list[tuple[int, set[str]]] = []

    def watch(stage: str, done: int, _total: int) -> None:
        if stage != "collect" or done == 0:
            return
        live = [(n, p) for n, p in module.named_parameters() if not p.is_meta]
        in_blocks = {b for b in blocks for n, _ in live if n.startswith(b)}
        seen.append((sum(p.numel() for _, p in live), in_blocks))

    scores = blockwise_layer_errors(
        skeleton,
        parse_formats(["int4-g32"]),
        batches=lambda: _calib().batches(2),
        n_batches=3,
        progress=watch,
    )
    assert len(scores) == len(skeleton.layers)
    assert len(seen) == 3 * (len(blocks) + 2)  # every batch of every stage was observed
    assert all(len(in_blocks) <= 1 for _, in_blocks in seen)
    assert {b for _, in_blocks in seen for b in in_blocks} == set(blocks)
    assert max(live for live, _ in seen) <= largest < total
    assert all(p.is_meta for p in module.parameters())  # everything released at the end


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    folder = write_tiny_hf_model(tmp_path / "bert", "bert", tokenizer=False)
    skeleton = load_skeleton(str(folder), device="cpu")
    with pytest.raises(InputError, match=r"decoder language models \(llama.*bert"):
        analyze(skeleton, _calib(), method="layer", formats=["int8"])


def test_other_methods_and_builtin_models_are_refused(tmp_path: Path) -> None:
    folder = _write_decoder(tmp_path / "model", "llama")
    skeleton = load_skeleton(str(folder), device="cpu")
    with pytest.raises(InputError, match="layer method only, not 'fisher'"):
        analyze(skeleton, _calib(), method="fisher", formats=["int8"])
    with pytest.raises(InputError, match="builtin model"):
        load_skeleton("builtin:tiny-lm", device="cpu")


def _edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_and_non_finite_weights_are_refused(tmp_path: Path) -> None:
    folder = _write_decoder(tmp_path / "model", "llama")
    _edit_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(InputError, match="missing weights model.layers.1.mlp.up_proj"):
        load_skeleton(str(folder), device="cpu")

    folder = _write_decoder(tmp_path / "nan", "llama")
    _edit_weights(folder, lambda t: t["model.layers.1.mlp.up_proj.weight"].fill_(float("nan")))
    skeleton = load_skeleton(str(folder), device="cpu")  # weights are read block by block
    with pytest.raises(InputError, match="model.layers.1.mlp.up_proj.weight contains NaN"):
        analyze(skeleton, _calib(), method="layer", formats=["int8"])


def test_cli_blockwise_writes_the_whole_model_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_tiny_hf_model(tmp_path / "model", "llama", task="text-generation")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(SENTENCES), encoding="utf-8")
    common = [
        "--calib",
        str(calib),
        "--method",
        "layer",
        "--device",
        "cpu",
        "--formats",
        "int8,int4-g32",
    ]
    runner = CliRunner()
    for out, extra in (("whole", []), ("blockwise", ["--blockwise"])):
        monkeypatch.setenv("BITPLAN_CACHE_DIR", str(tmp_path / f"cache-{out}"))  # no shared table
        result = runner.invoke(
            app, ["analyze", str(folder), *common, *extra, "-o", str(tmp_path / out)]
        )
        assert result.exit_code == 0, result.output
    whole = pd.read_csv(tmp_path / "whole" / "sensitivity.csv")
    blockwise = pd.read_csv(tmp_path / "blockwise" / "sensitivity.csv")
    pd.testing.assert_frame_equal(blockwise, whole, check_exact=True)
    refused = runner.invoke(app, ["analyze", str(folder), "--blockwise", "-o", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "layer method only" in refused.output
