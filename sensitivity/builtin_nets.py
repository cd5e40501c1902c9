"""The architectures of the builtin models and the byte tokenizer of ``builtin:tiny-lm``.

Both are small enough to train on a laptop CPU in seconds, yet have enough distinct weight
matrices (convs, linears, embeddings, a tied LM head) that a mixed-precision plan has real
choices to make. Every model follows the project's calling convention ``module(**batch)``.

References: nanoGPT ``model.py`` (Karpathy) for the GPT block layout; LeNet-style CNNs for the
digits classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ByteTokenizer", "DigitsCNN", "TinyLM", "TinyLMConfig"]


class DigitsCNN(nn.Module):
    """Classifier for scikit-learn's 8x8 digits: three convs and three linears (6 layers).

    ``forward(pixel_values [B, 1, 8, 8] in [0, 1]) -> logits [B, 10]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)  # 32 channels on the 4x4 map left by one 2x2 pool
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(pixel_values))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 4, 4)
        x = F.relu(self.conv3(x))
        x = x.flatten(1)  # (B, 512)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        logits: torch.Tensor = self.fc3(x)  # (B, 10)
        return logits


@dataclass(frozen=True)
class TinyLMConfig:
    """Sizes of :class:`TinyLM`; the defaults give 4 blocks x 6 matrices + 2 embeddings."""

    vocab_size: int = 256  # one token per byte
    n_embd: int = 64
    n_head: int = 4
    n_layer: int = 4
    block_size: int = 64


class _Attention(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)  # (B, H, T, D/H)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D/H)
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)
        return out


class _Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = _Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.fc_in = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)  # GPT's 4x MLP expansion
        self.fc_out = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        mlp: torch.Tensor = self.fc_out(F.gelu(self.fc_in(self.ln_2(x))))  # (B, T, D)
        return x + mlp


class TinyLM(nn.Module):
    """A GPT-style causal LM over bytes with the LM head tied to the token embedding.

    ``forward(input_ids [B, T], attention_mask [B, T] | None = None) -> logits [B, T, V]``.
    Padding positions (mask 0) are hidden from every query; each position always sees itself,
    so fully padded rows give finite (ignorable) logits instead of NaN.
    """

    def __init__(self, cfg: TinyLMConfig | None = None) -> None:
        super().__init__()
        self.config = cfg or TinyLMConfig()
        c = self.config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf, 2017)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        _, t = input_ids.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block size {self.config.block_size}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)  # (B, T, D)
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
        if attention_mask is None:
            mask = causal
        else:
            keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
            eye = torch.eye(t, dtype=torch.bool, device=input_ids.device)
            mask = (causal & keys) | eye  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits


class ByteTokenizer:
    """UTF-8 byte tokenizer (vocab 256) with the call shape of a Hugging Face tokenizer.

    ``tok("text" | ["a", "b"], max_length=64, truncation=True, padding=True,
    return_tensors="pt")`` returns ``{"input_ids", "attention_mask"}``; without
    ``return_tensors`` the values are lists of lists. Padding is on the right with byte 0.
    """

    vocab_size = 256
    pad_token_id = 0
    model_max_length = 64  # TinyLM's block size
    padding_side = "right"

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        max_length: int | None = None,
        truncation: bool = False,
        padding: bool | str = False,
        return_tensors: str | None = None,
    ) -> dict[str, torch.Tensor | list[list[int]]]:
        texts = [text] if isinstance(text, str) else list(text)
        ids = [list(t.encode("utf-8")) for t in texts]
        if truncation:
            limit = max_length or self.model_max_length
            ids = [row[:limit] for row in ids]
        if padding == "max_length":
            width = max_length or self.model_max_length
        elif padding:
            width = max((len(row) for row in ids), default=0)
        else:
            width = 0
        masks = [[1] * len(row) + [0] * max(0, width - len(row)) for row in ids]
        ids = [row + [self.pad_token_id] * max(0, width - len(row)) for row in ids]
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": masks}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        if len({len(row) for row in ids}) > 1:
            raise ValueError("rows differ in length: pass padding=True to return tensors")
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(masks, dtype=torch.long),
        }

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Bytes back to text; invalid UTF-8 sequences become U+FFFD."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(values).decode("utf-8", errors="replace")
