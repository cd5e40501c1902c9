"""Reference output distributions in bounded memory, and KL(ref ‖ quant) against them.

A causal LM's full reference logits are ``N × T × V`` numbers: 256 texts of 128 tokens over a
50k vocabulary are 6.6 GB in float32. So each row (a sample of a classifier, a token position
of an LM) keeps either

- **exact**: all ``V`` log-probabilities, when ``V ≤ EXACT_VOCAB`` (classifiers, byte-level
  LMs); or
- **top-k**: the ``k = TOP_K`` largest reference log-probabilities with their token ids, plus
  the log of the remaining (tail) mass — ``k · 8 + 4`` bytes per row instead of ``4 · V``.

On top-k rows the KL is computed on the coarsened support {top-k tokens} ∪ {tail}: the quant
model's probabilities are gathered at the same k ids and its tail mass is everything else. By
the chain rule of KL this is exact up to one term,

    KL(p ‖ q) = KL_topk(p ‖ q) + p_tail · KL(p(·|tail) ‖ q(·|tail)),

so the approximation is a lower bound whose gap is the tail mass times the divergence *inside*
the tail: when quantization noise hits all tokens alike, the relative gap is about the mean
tail mass. The tests check the identity above and, on Zipf-shaped logits (exponent 1.5, 512
classes) where the top 128 hold ~96% of the mass, a gap below 6%. The gap scales the error of
every plan by a similar factor, so plans rank about the same.

Log-probabilities are stored in float32, not float16: float16 rounding leaves a floor of
~1e-4 nats on a 50k vocabulary, as large as the whole signal of one 8-bit layer, and the
unchanged model would not score exactly 0.

References: Cover & Thomas, *Elements of Information Theory*, §2.5 (chain rule for relative
entropy); the top-k logit caching of distillation pipelines (e.g. MiniLLM, DistiLLM) follows
the same idea.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["EXACT_VOCAB", "TOP_K", "RowStats", "TokenDistributions", "compare", "compress"]

# Rows over at most this many classes are stored exactly: 4 KiB a row at most, and every
# classifier head and byte-level LM fits.
EXACT_VOCAB = 1024
# Kept reference tokens per row on large vocabularies: 1 KiB a row (float32 + int32 id).
TOP_K = 128
# Rows are scored a chunk at a time so the float32 log-softmax copy stays ≈64 MiB.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class TokenDistributions:
    """Reference log-probabilities of M rows: exact (``index``/``rest`` None) or top-k.

    ``logp``: float32 ``[M, V]`` (exact) or ``[M, k]`` (top-k, descending); ``index``: int32
    ``[M, k]`` token ids of the kept entries; ``rest``: float32 ``[M]`` log of the tail mass
    (``-inf`` when the kept entries hold all of it); ``top1``: int64 ``[M]`` reference argmax.
    """

    logp: torch.Tensor
    index: torch.Tensor | None
    rest: torch.Tensor | None
    top1: torch.Tensor

    def __len__(self) -> int:
        return self.logp.shape[0]

    @property
    def nbytes(self) -> int:
        """Memory held by the tensors."""
        parts = (self.logp, self.index, self.rest, self.top1)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def rows(self, start: int, stop: int) -> TokenDistributions:
        """Rows ``start:stop`` (views, no copy)."""
        return TokenDistributions(
            logp=self.logp[start:stop],
            index=None if self.index is None else self.index[start:stop],
            rest=None if self.rest is None else self.rest[start:stop],
            top1=self.top1[start:stop],
        )

    @classmethod
    def cat(cls, parts: Sequence[TokenDistributions]) -> TokenDistributions:
        """Concatenate rows of parts stored the same way (all exact or all top-k)."""
        index = [p.index for p in parts if p.index is not None]
        rest = [p.rest for p in parts if p.rest is not None]
        return cls(
            logp=torch.cat([p.logp for p in parts]),
            index=torch.cat(index) if index else None,
            rest=torch.cat(rest) if rest else None,
            top1=torch.cat([p.top1 for p in parts]),
        )


@dataclass
class RowStats:
    """Per-row comparison of logits with a reference: ``kl`` = KL(ref ‖ logits) in nats,
    ``top1`` = argmax of the logits, ``nll`` = −log q(target) when targets were given."""

    kl: torch.Tensor
    top1: torch.Tensor
    nll: torch.Tensor | None


def _chunks(logits: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, float32 log-probs)`` of consecutive row chunks of ``[M, V]`` logits."""
    step = max(1, _CHUNK_ELEMENTS // max(logits.shape[1], 1))
    for start in range(0, logits.shape[0], step):
        yield start, torch.log_softmax(logits[start : start + step].float(), dim=-1)


def _tail(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Log of the mass outside ``index``, per row: log-sum-exp with the kept ids at −inf."""
    return logp.scatter(-1, index, float("-inf")).logsumexp(dim=-1)


def _xdiff(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``p · (log p − log q)`` elementwise, with 0 · anything = 0 (no NaN from −inf)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def compress(logits: torch.Tensor, *, top_k: int | None = None) -> TokenDistributions:
    """Reference distributions of ``[M, V]`` logits, on the CPU.

    ``top_k=None`` keeps rows exact when ``V ≤ EXACT_VOCAB`` and the top ``TOP_K`` otherwise;
    an explicit ``top_k < V`` forces the top-k form (``top_k ≥ V`` is exact).
    """
    vocab = logits.shape[1]
    k = (vocab if vocab <= EXACT_VOCAB else TOP_K) if top_k is None else top_k
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    parts = []
    for _, logp in _chunks(logits):
        top1 = logp.argmax(dim=-1).cpu()
        if k >= vocab:
            parts.append(TokenDistributions(logp=logp.cpu(), index=None, rest=None, top1=top1))
            continue
        values, index = logp.topk(k, dim=-1)  # (m, k), descending
        parts.append(
            TokenDistributions(
                logp=values.cpu(),
                index=index.to(torch.int32).cpu(),
                rest=_tail(logp, index).cpu(),
                top1=top1,
            )
        )
    return TokenDistributions.cat(parts)


def compare(
    ref: TokenDistributions, logits: torch.Tensor, *, targets: torch.Tensor | None = None
) -> RowStats:
    """Score ``[M, V]`` logits row by row against ``M`` reference rows; results on the CPU.

    Uses the same float32 log-softmax as :func:`compress`, so logits equal to the reference's
    give a KL of exactly 0.
    """
    if len(ref) != logits.shape[0]:
        raise ValueError(f"{len(ref)} reference rows for {logits.shape[0]} rows of logits")
    kl, top1, nll = [], [], []
    for start, logq in _chunks(logits):
        part = ref.rows(start, start + logq.shape[0])
        logp = part.logp.to(logq.device)
        if part.index is None or part.rest is None:
            div = _xdiff(logp, logq).sum(dim=-1)
        else:
            index = part.index.to(logq.device, torch.int64)
            div = _xdiff(logp, logq.gather(-1, index)).sum(dim=-1)
            div = div + _xdiff(part.rest.to(logq.device), _tail(logq, index))
        kl.append(div.clamp_min(0.0).cpu())  # KL >= 0; rounding may dip a hair below
        top1.append(logq.argmax(dim=-1).cpu())
        if targets is not None:
            chunk_targets = targets[start : start + logq.shape[0]].to(logq.device, torch.int64)
            nll.append(-logq.gather(-1, chunk_targets[:, None])[:, 0].cpu())
    return RowStats(
        kl=torch.cat(kl), top1=torch.cat(top1), nll=torch.cat(nll) if targets is not None else None
    )
