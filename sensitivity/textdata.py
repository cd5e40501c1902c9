"""Text calibration files: reading ``.txt`` / ``.jsonl`` samples and tokenizing them.

Hugging Face text models are calibrated on text the user brings. Two layouts are accepted:

- ``.txt``: one sample per non-empty line; or, when the file is written in paragraphs (blank
  lines between blocks and at least one block spanning several lines), one sample per
  paragraph, its lines joined by ``"\\n"`` as written.
- ``.jsonl``: one JSON object a line with a ``"text"`` string and, for text classification,
  an optional integer ``"label"`` (on every line or on none).

Tokenization asks the tokenizer only for unpadded ids (``tokenizer(texts, truncation=True,
max_length=...)``), the call every Hugging Face tokenizer supports, and pads here: GPT-style
tokenizers have no pad token, and setting one would mutate the model's tokenizer. Padding
follows the tokenizer's ``padding_side``; pad positions get ``attention_mask`` 0.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from bitplan.sensitivity.errors import InputError

__all__ = ["read_jsonl", "read_txt", "tokenize_texts"]

logger = logging.getLogger(__name__)

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{path.name} is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None


def read_txt(raw: bytes, path: Path) -> list[str]:
    """Samples of a ``.txt`` file's bytes: lines, or paragraphs when written in paragraphs."""
    text = _decode(raw, path).replace("\r\n", "\n")
    blocks = [b.strip("\n") for b in _BLANK_LINE.split(text) if b.strip()]
    if len(blocks) > 1 and any("\n" in b.strip() for b in blocks):
        samples = ["\n".join(ln.strip() for ln in b.split("\n") if ln.strip()) for b in blocks]
    else:
        samples = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not samples:
        raise InputError(
            f"{path.name} holds no text; give one sample per line "
            "(or paragraphs separated by blank lines)"
        )
    return samples


def _jsonl_record(line: str, lineno: int, path: Path) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path.name} line {lineno} is not valid JSON ({err.msg}); "
            'expected one object a line like {"text": "...", "label": 0}'
        ) from None
    except RecursionError:  # json recurses once per nesting level: '[[[[…' exhausts the stack
        raise InputError(
            f"{path.name} line {lineno} is nested too deeply; "
            'expected one object a line like {"text": "...", "label": 0}'
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise InputError(
            f'{path.name} line {lineno} has no "text" string; '
            'expected one object a line like {"text": "...", "label": 0}'
        )
    if not record["text"].strip():
        raise InputError(f'{path.name} line {lineno} has an empty "text"; remove the line')
    return record


def read_jsonl(raw: bytes, path: Path, *, with_labels: bool) -> tuple[list[str], list[int] | None]:
    """Texts (and labels when ``with_labels`` and present) of a ``.jsonl`` file's bytes.

    Labels must be on every line or on none; they are ignored (with a log line) when the model
    is not a classifier.
    """
    records = [
        (i, _jsonl_record(line, i, path))
        for i, line in enumerate(_decode(raw, path).splitlines(), start=1)
        if line.strip()
    ]
    if not records:
        raise InputError(f'{path.name} holds no records; expected one {{"text": ...}} a line')
    texts = [r["text"] for _, r in records]
    labelled = [i for i, r in records if "label" in r]
    if not labelled:
        return texts, None
    if not with_labels:
        logger.info("%s: ignoring labels, the model is not a classifier", path.name)
        return texts, None
    if len(labelled) != len(records):
        missing = next(i for i, r in records if "label" not in r)
        raise InputError(
            f'{path.name} line {missing} has no "label" while other lines do; '
            "give a label on every line or on none"
        )
    for i, r in records:
        label = r["label"]
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise InputError(
                f'{path.name} line {i}: "label" must be a class index '
                f"(an integer >= 0), got {label!r}"
            )
    return texts, [r["label"] for _, r in records]


def _pad_id(tokenizer: Any) -> int:
    """The id that fills pad positions: the pad token, else end-of-text, else 0.

    Any id works (pad positions are masked out); the pad or EOS token is what the model saw in
    training.
    """
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], *, max_length: int, keep: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into ``[N, L]`` int64 tensors, ``L`` = the longest (≤ ``max_length``
    and ≤ the tokenizer's ``model_max_length``, beyond which the model has no positions).

    ``keep`` names the inputs the model's ``forward`` accepts (``None``: all); other outputs of
    the tokenizer (e.g. ``token_type_ids`` for a model without them) are dropped.
    """
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < max_length:
        logger.info("truncating text at %d tokens, the tokenizer's model_max_length", model_max)
        max_length = model_max
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    if "input_ids" not in encoded:
        raise InputError(
            "the model's tokenizer returned no input_ids; "
            "use a .safetensors file of input tensors instead"
        )
    ids = encoded["input_ids"]
    lengths = [len(seq) for seq in ids]
    if min(lengths) == 0:
        empty = lengths.index(0)
        raise InputError(f"sample {empty} tokenizes to no tokens; remove it or fix its text")
    width = max(lengths)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    masks = encoded.get("attention_mask") or [[1] * n for n in lengths]
    columns = {name: encoded[name] for name in encoded if name != "attention_mask"}
    columns["attention_mask"] = masks
    out: dict[str, torch.Tensor] = {}
    pad_token = _pad_id(tokenizer)
    for name, rows in columns.items():
        if keep is not None and name not in keep:
            logger.debug("dropping tokenizer output %s: not an input of the model", name)
            continue
        fill = pad_token if name == "input_ids" else 0
        tensor = torch.full((len(rows), width), fill, dtype=torch.int64)  # (N, L)
        for i, row in enumerate(rows):
            values = torch.as_tensor(row, dtype=torch.int64)
            if left:
                tensor[i, width - len(row) :] = values
            else:
                tensor[i, : len(row)] = values
        out[name] = tensor
    return out
