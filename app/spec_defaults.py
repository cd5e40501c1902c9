"""The job defaults (and their one-line descriptions) as :class:`~bitplan.search.spec.JobSpec`
declares them, for the CLI, ``submit`` and the demo.

JobSpec is the one place a job default is written; commands read it here instead of restating
it, so ``--help`` shows exactly what a job would use and the CLI cannot drift from the API.
Importing this module is light (JobSpec imports neither torch nor pandas).
"""

from __future__ import annotations

from typing import Any

from bitplan.search.spec import JobSpec

__all__ = ["spec_default", "spec_help"]


def spec_default(name: str) -> Any:
    """JobSpec's default for the field ``name`` (a fresh list or dict for factory defaults)."""
    return JobSpec.model_fields[name].get_default(call_default_factory=True)


def spec_help(name: str) -> str:
    """JobSpec's description of the field ``name``, as a help line."""
    return f"{JobSpec.model_fields[name].description}."
