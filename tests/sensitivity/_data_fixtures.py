"""Tiny models and tokenizers for the data and metrics tests (random weights, no downloads)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from bitplan.sensitivity.builtin_nets import ByteTokenizer, DigitsCNN, TinyLM, TinyLMConfig
from bitplan.sensitivity.layers import find_quant_layers
from bitplan.sensitivity.models import LoadedModel

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]


def loaded(
    module: nn.Module, task: str, *, tokenizer: Any | None = None, builtin_data: str | None = None
) -> LoadedModel:
    """A LoadedModel around a tiny module, as load_model would build it."""
    module.eval()
    return LoadedModel(
        ref=f"test:{type(module).__name__}",
        sha256="0" * 64,
        module=module,
        task=task,
        layers=find_quant_layers(module),
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        builtin_data=builtin_data,
    )


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A real Hugging Face fast tokenizer over WORDS (it also emits token_type_ids)."""
    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


class TextClassifier(nn.Module):
    """Bag-of-embeddings classifier: ``forward(input_ids, attention_mask=None)`` ->
    ``SequenceClassifierOutput(logits [B, classes])``; takes no token_type_ids."""

    def __init__(self, vocab: int = len(WORDS) + 2, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = (self.embed(input_ids) * mask[..., None]).sum(1)  # (B, 8)
        return SequenceClassifierOutput(logits=self.head(h))


class Encoder(nn.Module):
    """``forward(input_ids, attention_mask=None) -> BaseModelOutput(last_hidden_state [B,T,8])``."""

    def __init__(self, vocab: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.proj = nn.Linear(8, 8)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.proj(self.embed(input_ids)))


class Regressor(nn.Module):
    """``forward(x [B, 4]) -> tensor [B, 2, 3]``: an output that is neither logits nor hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).view(-1, 2, 3)  # (B, 2, 3)


def digits_model(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    return loaded(DigitsCNN(), "image-classification", builtin_data="digits")


def tiny_lm(seed: int = 0, vocab: int = 256) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = TinyLMConfig(vocab_size=vocab, n_embd=16, n_head=2, n_layer=1, block_size=64)
    return loaded(TinyLM(cfg), "text-generation", tokenizer=ByteTokenizer())


def perturbed(model: LoadedModel, scale: float = 0.05, seed: int = 1) -> LoadedModel:
    """A copy of ``model`` with every weight matrix nudged by relative noise ``scale``."""
    module = copy.deepcopy(model.module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
    return loaded(module, model.task, tokenizer=model.tokenizer, builtin_data=model.builtin_data)


def hf_model(task: str, seed: int = 0) -> LoadedModel:
    """A tiny randomly initialised Hugging Face model for ``task`` with :func:`word_tokenizer`."""
    torch.manual_seed(seed)
    vocab = len(WORDS) + 2
    if task == "text-classification":
        cfg = tf.DistilBertConfig(
            vocab_size=vocab,
            dim=8,
            n_layers=1,
            n_heads=2,
            hidden_dim=16,
            max_position_embeddings=16,
            num_labels=3,
        )
        module = tf.DistilBertForSequenceClassification(cfg)
    elif task == "feature-extraction":
        cfg = tf.BertConfig(
            vocab_size=vocab,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=16,
        )
        module = tf.BertModel(cfg, add_pooling_layer=False)
    else:
        cfg = tf.GPT2Config(
            vocab_size=vocab, n_embd=8, n_layer=1, n_head=2, n_positions=16, use_cache=False
        )
        module = tf.GPT2LMHeadModel(cfg)
    return loaded(module, task, tokenizer=word_tokenizer())
