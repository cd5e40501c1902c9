"""The tokenizer a GGUF file carries, so llama.cpp turns text into the token ids bitplan used.

llama.cpp tokenizes with the vocabulary stored in the file (``tokenizer.ggml.*`` keys, read by
``llama_vocab::impl::load`` in its ``src/llama-vocab.cpp``):

- ``builtin:tiny-lm`` reads UTF-8 bytes, token id = byte value. The file stores a byte-level
  ``gpt2`` (BPE) vocabulary of 256 tokens, token ``b`` being GPT-2's printable stand-in for byte
  ``b`` (``bytes_to_unicode``). llama.cpp's BPE maps text bytes to those stand-ins and then
  merges pairs by rank; with no merge that can apply, every byte stays one token, so llama.cpp's
  token ids for any text are exactly its UTF-8 bytes, and decoding maps them back. llama.cpp
  requires the merges key for a ``gpt2`` vocabulary and gguf-py writes no empty array, so the
  file holds one merge of two 2-character symbols: symbols start as single characters and only
  merges build longer ones, so it never applies. The vocabulary has no end-of-text token;
  byte 0 (the tokenizer's padding, never in text) is named end-of-text and beginning-of-text,
  so llama.cpp's default (byte 11) does not stop a generation at a vertical tab, and nothing is
  added to a prompt.
- a Hugging Face GPT-2 with its byte-level BPE tokenizer (``tokenizer.json``): its tokens and
  merges, with llama.cpp's ``gpt-2`` pre-tokenizer (GPT-2's own split pattern). Added special
  tokens are control tokens; rows of the embedding beyond the tokenizer's vocabulary get
  unused placeholder tokens, as llama.cpp's converter writes them.
- anything else (no tokenizer, a word-level or SentencePiece tokenizer, a BPE tokenizer whose
  pre-tokenizer llama.cpp knows by a hash table bitplan does not copy): ``no_vocab`` with the
  vocabulary size. llama.cpp then evaluates token ids but cannot tokenize text; this is logged.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final

import gguf

from bitplan.sensitivity.builtin_nets import ByteTokenizer
from bitplan.sensitivity.errors import InputError

__all__ = ["VOCAB_BYTES", "VOCAB_GPT2", "VOCAB_NONE", "add_vocab", "byte_tokens"]

log = logging.getLogger(__name__)

VOCAB_BYTES: Final = "bytes"
VOCAB_GPT2: Final = "gpt2-bpe"
VOCAB_NONE: Final = "none"
# A merge of two 2-character symbols: never applicable in a byte vocabulary (module docstring).
_INERT_MERGE = "ĠĠ ĠĠ"


def byte_tokens() -> list[str]:
    """GPT-2's ``bytes_to_unicode``: the printable character standing for each byte, in order.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes take the characters from
    U+0100 on, in byte order (Radford et al., 2019, ``encoder.py``).
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    extra = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _add_bytes(w: gguf.GGUFWriter) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(byte_tokens())
    w.add_token_types([gguf.TokenType.NORMAL] * ByteTokenizer.vocab_size)
    w.add_token_merges([_INERT_MERGE])
    w.add_bos_token_id(ByteTokenizer.pad_token_id)
    w.add_eos_token_id(ByteTokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def _bpe_json(tokenizer: Any) -> dict[str, Any] | None:
    """The ``tokenizer.json`` of a fast tokenizer when it is GPT-2's byte-level BPE, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    data: dict[str, Any] = json.loads(backend.to_str())
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return None
    return data if decoder.get("type") == "ByteLevel" else None


def _add_gpt2_bpe(w: gguf.GGUFWriter, data: dict[str, Any], tokenizer: Any, size: int) -> None:
    tokens: dict[int, tuple[str, gguf.TokenType]] = {
        int(i): (text, gguf.TokenType.NORMAL) for text, i in data["model"]["vocab"].items()
    }
    for added in data.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[int(added["id"])] = (added["content"], kind)
    beyond = sorted(i for i in tokens if i >= size)
    if beyond:
        raise InputError(
            f"the tokenizer has token id {beyond[0]} but the model embeds {size} tokens; "
            "the tokenizer does not belong to this model"
        )
    # Embedding rows without a token get unused placeholders, as llama.cpp's converter writes.
    rows = [tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([text for text, _ in rows])
    w.add_token_types([kind for _, kind in rows])
    w.add_token_merges(merges or [_INERT_MERGE])
    if tokenizer.bos_token_id is not None:
        w.add_bos_token_id(int(tokenizer.bos_token_id))
    if tokenizer.eos_token_id is not None:
        w.add_eos_token_id(int(tokenizer.eos_token_id))
    w.add_add_bos_token(False)  # GPT-2's tokenizer adds nothing to a prompt


def add_vocab(
    w: gguf.GGUFWriter, *, tokenizer: Any | None, model_type: str | None, vocab_size: int
) -> str:
    """Write the tokenizer keys for a model; returns which vocabulary went in (``VOCAB_*``)."""
    w.add_vocab_size(vocab_size)
    if isinstance(tokenizer, ByteTokenizer) and vocab_size == ByteTokenizer.vocab_size:
        _add_bytes(w)
        return VOCAB_BYTES
    data = _bpe_json(tokenizer) if model_type == "gpt2" else None
    if data is not None:
        _add_gpt2_bpe(w, data, tokenizer, vocab_size)
        return VOCAB_GPT2
    w.add_tokenizer_model("no_vocab")
    log.warning(
        "the GGUF file carries no tokenizer llama.cpp can use (bitplan writes byte vocabularies "
        "and GPT-2's BPE): llama.cpp evaluates token ids but cannot tokenize text with it"
    )
    return VOCAB_NONE
