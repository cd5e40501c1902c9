"""Share groups from built-in fusion rules: the job option ``fuse`` (``qkv``, ``gate_up``).

Runtimes run some matmuls as one kernel over a concatenated weight: vLLM packs the q/k/v
projections into ``qkv_proj`` and gate/up into ``gate_up_proj`` (its ``packed_modules_mapping``,
which also packs the ``w1``/``w3`` MLPs of models such as LFM2), and llama.cpp stores GPT-2-style
attention as one ``attn_qkv`` tensor. A fused weight has one quantization format, so a plan that
gives q, k and v different formats cannot be served that way. A *share group* makes such layers
one decision of the plan (one format) while each keeps its own tensor and bytes (DESIGN §6).
Checkpoints that already store the fused matrix (GPT-NeoX/Falcon ``query_key_value``, GPT-2
``c_attn``) have one layer there and need no rule. Fused 3-D MoE expert parameters (e.g.
transformers' ``MixtralExperts.gate_up_proj``) are not layers bitplan plans at all.

Rules group *siblings*: the layers named by one of a rule's name sets under one parent module.
The grouping is applied to the layer list after the model loads, so the sensitivity table stays
per layer (and so does its cache); the knapsack, the measured search and every plan then decide
once per share group. This module imports no torch: validating a request names the rules.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from bitplan.sensitivity.errors import InputError

if TYPE_CHECKING:  # the layer type only: importing layers would import torch
    from bitplan.sensitivity.layers import QuantLayer

__all__ = ["FUSE_RULES", "FuseRule", "check_fuse_rules", "fuse_layers"]

log = logging.getLogger(__name__)

# The rule names, as a type: requests (JobSpec, the REST schema) accept exactly these.
FuseRule = Literal["qkv", "gate_up"]
# Rule name -> the sibling-name sets it fuses. Names follow transformers' modules: LLaMA-style
# (q_proj/k_proj/v_proj, gate_proj/up_proj), BERT-style (query/key/value) and w1/w3 MLPs such as
# LFM2's (w1 = gate, w3 = up; w2 is the down projection, not fused).
FUSE_RULES: Mapping[FuseRule, tuple[tuple[str, ...], ...]] = MappingProxyType(
    {
        "qkv": (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")),
        "gate_up": (("gate_proj", "up_proj"), ("w1", "w3")),
    }
)


def check_fuse_rules(rules: Sequence[str]) -> list[FuseRule]:
    """The rule names, checked: an unknown or repeated name is an error listing the rules."""
    names: list[FuseRule] = []
    for rule in rules:
        name = next((known for known in FUSE_RULES if known == rule.strip()), None)
        if name is None:
            raise InputError(f"unknown fuse rule {rule!r}; accepted: {', '.join(FUSE_RULES)}")
        names.append(name)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"fuse rule listed twice: {', '.join(dupes)}")
    return names


def _siblings(layers: Sequence[QuantLayer], names: tuple[str, ...]) -> dict[str, list[str]]:
    """``{parent FQN: [layer FQN, ...]}`` of the layers whose last name part is in ``names``."""
    found: dict[str, list[str]] = {}
    for lay in layers:
        parent, _, leaf = lay.name.rpartition(".")
        if leaf in names:
            found.setdefault(parent, []).append(lay.name)
    return found


def fuse_layers(layers: Sequence[QuantLayer], rules: Sequence[str]) -> list[QuantLayer]:
    """``layers`` with ``share`` set by the fusion ``rules`` (see the module docstring).

    Each group of two or more siblings becomes the share group ``<parent>.<rule>`` (e.g.
    ``model.layers.0.self_attn.qkv``). A set with a member missing (excluded) groups the rest
    and a set cut to one layer groups nothing: each logs a warning, as a runtime that fuses the
    whole set cannot serve such a plan. A rule that matches no layer at all logs a warning too;
    an unknown rule name is an :class:`InputError`, as is a layer that two rules (or a rule and
    an earlier share) would put in different groups.
    """
    shares = {lay.name: lay.share for lay in layers if lay.share is not None}
    for rule in check_fuse_rules(rules):
        groups: list[str] = []
        partial: list[str] = []  # groups with a member missing
        lone: list[str] = []  # sets cut to one layer: nothing to share a format with
        for names in FUSE_RULES[rule]:
            for parent, members in _siblings(layers, names).items():
                if len(members) < 2:
                    lone.append(members[0])
                    continue
                key = f"{parent}.{rule}" if parent else rule
                for name in members:
                    if shares.setdefault(name, key) != key:
                        raise InputError(
                            f"layer {name} would join two share groups ({shares[name]} and "
                            f"{key}); drop one of the fuse rules"
                        )
                if len(members) < len(names):
                    partial.append(f"{key} ({', '.join(members)})")
                groups.append(key)
        _log_rule(rule, groups=groups, partial=partial, lone=lone)
    return [replace(lay, share=shares[lay.name]) if lay.name in shares else lay for lay in layers]


def _log_rule(rule: FuseRule, *, groups: list[str], partial: list[str], lone: list[str]) -> None:
    """What one rule did: its share groups (INFO), and the sets it could not group whole."""
    wanted = " or ".join("/".join(names) for names in FUSE_RULES[rule])
    if groups:
        log.info("fuse %s: %d share groups", rule, len(groups))
    if partial:
        log.warning(
            "fuse %s: %d share groups lack a member (excluded or absent), e.g. %s; a runtime "
            "that fuses the whole %s set cannot serve them: the missing layers are not planned "
            "with them",
            rule,
            len(partial),
            partial[0],
            rule,
        )
    if lone:
        log.warning(
            "fuse %s: %d layers have no sibling left to share a format with (excluded or "
            "absent), e.g. %s; they keep a format each",
            rule,
            len(lone),
            lone[0],
        )
    if not (groups or lone):
        log.warning(
            "fuse rule %s matches no layers of this model (it groups sibling %s); "
            "its layers keep a format each",
            rule,
            wanted,
        )
