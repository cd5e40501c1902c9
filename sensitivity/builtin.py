"""Builtin models and their calibration data, trained on data that installed packages ship.

``builtin:digits-cnn`` is a small CNN trained on scikit-learn's 8x8 digits; ``builtin:tiny-lm``
is a byte-level GPT trained on the docstrings of Python standard-library modules. Neither needs
a network: the first load trains (seconds, fixed seed, bit-for-bit repeatable in one
environment) and caches the state dict as safetensors; later loads read the cache. Each model
has a held-out part of its data that training never saw; :func:`builtin_calibration` returns it
for ``--calib builtin``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from bitplan.sensitivity.atomic import write_atomic
from bitplan.sensitivity.builtin_nets import ByteTokenizer, DigitsCNN, TinyLM, TinyLMConfig
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.progress import ProgressFn, report
from bitplan.sensitivity.safety import files_sha256

__all__ = [
    "BUILTIN_DATA",
    "BUILTIN_MODELS",
    "BuiltinModel",
    "builtin_calibration",
    "digits_split",
    "lm_loss",
    "load_builtin",
    "text_split",
    "train_digits_cnn",
    "train_tiny_lm",
    "training_stage",
]

logger = logging.getLogger(__name__)

# Bump when a recipe (architecture, data, schedule) changes so stale caches are not reused.
_RECIPE_VERSION = "v1"
# The data split is fixed independently of the training seed, so the held-out part never moves.
_SPLIT_SEED = 1234
_DIGITS_HOLDOUT = 0.25  # 450 of sklearn's 1797 digits stay unseen by training
_TEXT_BLOCK = 64  # TinyLM's block size: one calibration row is one 64-byte block
_TEXT_HOLDOUT_EVERY = 10  # every 10th block is held out (~10 % of the corpus)
_TEXT_MAX_CALIB = 256  # enough rows for a stable metric, few enough for e2e on a CPU
# Modules whose docstrings form the tiny-lm corpus: stable, prose-heavy, always installed.
_TEXT_MODULES = (
    "argparse",
    "bisect",
    "collections",
    "contextlib",
    "dataclasses",
    "datetime",
    "decimal",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "textwrap",
    "typing",
)

BUILTIN_MODELS = ("digits-cnn", "tiny-lm")
BUILTIN_DATA = ("digits", "text")


@dataclass
class BuiltinModel:
    """A loaded builtin model with what :class:`~bitplan.sensitivity.models.LoadedModel` needs."""

    module: nn.Module
    sha256: str
    task: str
    tokenizer: Any | None
    data: str


@cache
def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_x, train_y, held_x, held_y)``: digits as ``[N, 1, 8, 8]`` floats in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # sklearn's pixels are 0..16 (4-bit counts of a 32x32 bitmap downsampled to 8x8)
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_held = int(len(y) * _DIGITS_HOLDOUT)
    held, train = order[:n_held], order[n_held:]
    return x[train], y[train], x[held], y[held]


def _module_docs(name: str) -> list[str]:
    """The module's docstring and those of its public functions and classes, in name order."""
    module = importlib.import_module(name)
    docs = [inspect.getdoc(module) or ""]
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when their doc is read
        warnings.simplefilter("ignore", DeprecationWarning)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
    return [d for d in docs if d]


@cache
def text_split() -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_blocks, held_blocks)``: the docstring corpus as byte ids ``[N, 64]``."""
    corpus = "\n\n".join(doc for name in _TEXT_MODULES for doc in _module_docs(name))
    data = torch.frombuffer(bytearray(corpus.encode("utf-8")), dtype=torch.uint8).long()
    n_blocks = len(data) // _TEXT_BLOCK
    blocks = data[: n_blocks * _TEXT_BLOCK].view(n_blocks, _TEXT_BLOCK)  # (blocks, 64)
    held = torch.arange(n_blocks) % _TEXT_HOLDOUT_EVERY == _TEXT_HOLDOUT_EVERY - 1
    return blocks[~held], blocks[held]


# ``on_step(done, total)``: a training loop's progress, in epochs or optimizer steps.
StepFn = Callable[[int, int], None]


def train_digits_cnn(
    *, seed: int = 0, epochs: int = 30, on_step: StepFn | None = None
) -> DigitsCNN:
    """Train :class:`DigitsCNN` on the training part of digits; same seed, same weights.

    ``on_step`` is called after every epoch with ``(done, epochs)``.
    """
    train_x, train_y, _, _ = digits_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # converges in ~20 epochs here
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            for idx in torch.split(torch.randperm(len(train_y), generator=gen), 64):
                loss = F.cross_entropy(model(pixel_values=train_x[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                opt.step()
            if on_step is not None:
                on_step(epoch + 1, epochs)
    return model.eval()


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a causal LM over ``input_ids [B, T]``."""
    logits = model(input_ids=input_ids)  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def train_tiny_lm(*, seed: int = 0, steps: int = 300, on_step: StepFn | None = None) -> TinyLM:
    """Train :class:`TinyLM` on the training blocks of the docstring corpus.

    ``on_step`` is called after every optimizer step with ``(done, steps)``.
    """
    train_blocks, _ = text_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyLM(TinyLMConfig(block_size=_TEXT_BLOCK))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        # linear decay to 0 so the short schedule ends on a settled loss
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
        gen = torch.Generator().manual_seed(seed)
        for step in range(steps):
            batch = train_blocks[torch.randint(len(train_blocks), (32,), generator=gen)]
            loss = lm_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(step + 1, steps)
    return model.eval()


@dataclass(frozen=True)
class _Recipe:
    build: Callable[[], nn.Module]
    train: Callable[..., nn.Module]
    task: str
    data: str
    tokenizer: Callable[[], Any] | None


_RECIPES = {
    "digits-cnn": _Recipe(DigitsCNN, train_digits_cnn, "image-classification", "digits", None),
    "tiny-lm": _Recipe(
        lambda: TinyLM(TinyLMConfig(block_size=_TEXT_BLOCK)),
        train_tiny_lm,
        "text-generation",
        "text",
        ByteTokenizer,
    ),
}


def training_stage(name: str) -> str:
    """The progress stage of training ``builtin:<name>``: a person waits through it once.

    A stage of its own, not ``load``, so a bar that sits for a minute says why.
    """
    return f"training builtin:{name} (first use, cached afterwards)"


def load_builtin(
    name: str, *, cache_dir: Path, seed: int = 0, progress: ProgressFn | None = None
) -> BuiltinModel:
    """Load ``builtin:<name>`` from ``cache_dir``, training and caching it on first use.

    Training reports :func:`training_stage` to ``progress``, in epochs or steps.
    """
    recipe = _RECIPES.get(name)
    if recipe is None:
        raise InputError(
            f"unknown builtin model {name!r}; accepted: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        )
    folder = cache_dir / "builtin"
    path = folder / f"{name}-{_RECIPE_VERSION}-seed{seed}.safetensors"
    if not path.is_file():
        stage = training_stage(name)
        logger.info("%s: about a minute on a laptop CPU, then read from %s", stage, path)

        def on_step(done: int, total: int) -> None:
            report(progress, stage, done, total)

        trained = recipe.train(seed=seed, on_step=on_step)
        # atomic: concurrent loaders see no half-written file
        write_atomic(path, lambda name: save_model(trained, name))
    module = recipe.build()
    load_model(module, str(path))  # safetensors' loader restores tied (shared) weights
    return BuiltinModel(
        module=module.eval(),
        sha256=files_sha256([path], root=folder, salt=f"builtin:{name}"),
        task=recipe.task,
        tokenizer=recipe.tokenizer() if recipe.tokenizer else None,
        data=recipe.data,
    )


def builtin_calibration(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The held-out data of a builtin model for ``--calib builtin``: ``(inputs, labels)``.

    ``digits``: ``{"pixel_values": [450, 1, 8, 8]}`` with labels ``[450]``;
    ``text``: ``{"input_ids": [256, 64]}`` byte ids, no labels. Training never saw either.
    """
    if name == "digits":
        _, _, held_x, held_y = digits_split()
        return {"pixel_values": held_x.clone()}, held_y.clone()
    if name == "text":
        _, held = text_split()
        return {"input_ids": held[:_TEXT_MAX_CALIB].clone()}, None
    raise InputError(f"unknown builtin dataset {name!r}; accepted: {', '.join(BUILTIN_DATA)}")
