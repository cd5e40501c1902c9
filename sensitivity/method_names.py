"""The names of the sensitivity methods (DESIGN §6), part of the CLI and REST contract.

Kept apart from :mod:`bitplan.sensitivity.analyzer`, which runs them, so that validating a request
does not import torch or pandas.
"""

from __future__ import annotations

__all__ = ["METHODS"]

METHODS = ("weight", "layer", "fisher", "e2e")
