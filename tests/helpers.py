"""Builders of tiny, offline Hugging Face model folders for tests of every package.

``write_tiny_hf_model(folder, "gpt2", task="text-generation")`` writes config.json, safetensors
and a word-level tokenizer trained on :data:`SENTENCES`, all with hidden size 32 so loading takes
well under a second and nothing is downloaded. Import with ``from tests.helpers import ...``;
the fixture ``tiny_hf_model`` in ``tests/conftest.py`` wraps it.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bitplan.sensitivity.hf import HF_TASKS

if TYPE_CHECKING:
    from bitplan.search.plans import Plan
    from bitplan.sensitivity.models import LoadedModel

__all__ = [
    "HF_MODEL_TYPES",
    "process_gone",
    "SENTENCES",
    "tiny_bert_files",
    "uniform_plan",
    "wait_until",
    "tiny_hf_config",
    "write_tiny_hf_model",
    "zip_bytes",
    "zip_folder",
]

# Every word of these sentences is in the tokenizer's vocabulary; other words map to [UNK].
SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "a small model is quick to load and quick to test",
    "quantization maps every weight to a few bits",
    "the budget decides how many bits each layer gets",
    "good plans keep the sensitive layers at high precision",
    "hello world this is a tiny test sentence",
)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]")
VOCAB_SIZE = 96  # above the ~50 words + specials of SENTENCES, so every token id fits
HF_MODEL_TYPES = ("bert", "gpt2", "llama")


def tiny_hf_config(model_type: str, *, num_labels: int = 3):
    """A transformers config with hidden size 32 and 2 layers for ``model_type``."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    ids = {"pad_token_id": 0, "bos_token_id": 4, "eos_token_id": 4}  # [PAD] and [EOS] below
    if model_type == "bert":
        return BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=num_labels,
            pad_token_id=0,
        )
    if model_type == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            num_labels=num_labels,
            **ids,
        )
    if model_type == "llama":
        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            num_labels=num_labels,
            **ids,
        )
    raise ValueError(f"no tiny config for {model_type!r}; choose from {HF_MODEL_TYPES}")


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
    )
    fast.save_pretrained(folder)


def write_tiny_hf_model(
    folder: Path,
    model_type: str = "bert",
    *,
    task: str = "feature-extraction",
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    seed: int = 0,
    num_labels: int = 3,
) -> Path:
    """Write a tiny random ``model_type`` model for ``task`` into ``folder``; returns ``folder``.

    Same arguments, same bytes: weights come from a fixed seed.
    """
    import transformers

    config = tiny_hf_config(model_type, num_labels=num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, HF_TASKS[task]).from_config(config)
    model.to(dtype).save_pretrained(folder)
    if tokenizer:
        _write_tokenizer(folder)
    return folder


def zip_folder(folder: Path, zip_path: Path, *, prefix: str = "") -> Path:
    """Zip ``folder``'s files under ``prefix`` (e.g. ``"model/"``) into ``zip_path``."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return zip_path


def tiny_bert_files(folder: Path) -> dict[str, bytes]:
    """The files of a 1-layer BERT with random weights (seed 0, no tokenizer), written to
    ``folder``: the smallest real model an upload can carry, for tests that edit its files."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A zip archive holding ``files`` (name -> content) at its top level."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def uniform_plan(model: LoadedModel, fmt: str) -> Plan:
    """A plan putting every planned layer of ``model`` in ``fmt``, sized by the byte rules: the
    plan tests of exports and targets start from, without running a search."""
    from bitplan.search.plans import make_plan
    from bitplan.sensitivity.formats import parse_format
    from bitplan.sensitivity.layers import parameter_bytes

    unplanned, fp16 = parameter_bytes(model.module, model.layers)
    return make_plan(
        model_ref=model.ref,
        model_sha256=model.sha256,
        layers=model.layers,
        choice={lay.group: parse_format(fmt) for lay in model.layers},
        budget=None,
        unplanned_bytes=unplanned,
        fp16_bytes=fp16,
        predicted_error=None,
    )


def wait_until(
    condition: Callable[[], bool], what: str, *, within_s: float, poll_s: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``within_s`` seconds. Tests
    wait on a condition, never for a fixed time, so a slow machine only makes them slower."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        time.sleep(poll_s)


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for a parent that never reaps it,
    as an orphan may under a container's init, has ended too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")  # the state, after "(comm)"
