"""bitplan: mixed-precision quantization planning.

The Python API mirrors the command line, keyword-only like ``optuna.create_study``::

    import bitplan

    table = bitplan.analyze(model="builtin:digits-cnn", out_dir="sens")  # error per layer, format
    result = bitplan.search(model="builtin:digits-cnn", budget="4bpw", out_dir="job")
    plan = bitplan.load_plan(path="job/plans/best.json")  # or any of result.frontier.points
    bitplan.apply(model="builtin:digits-cnn", plan=plan, out_dir="packed")
    bitplan.solve(table="sens/sensitivity.csv", budget="4bpw", out_dir="solved")

``search`` also takes the user's own score of a model (``metric=``, see :func:`search`), which
then is the search's measured objective and the frontier's held-out figures.

Importing ``bitplan`` is light (no torch, pandas or Optuna): each name loads its module when it
is first used (PEP 562 ``__getattr__``), so a CLI or a service that imports ``bitplan`` only pays
for what it calls.

The repository's ``app/``, ``search/``, ``sensitivity/`` and ``migrations/`` folders install as
``bitplan.app``, ``bitplan.search``, ``bitplan.sensitivity`` and ``bitplan.migrations``. The
attribute ``bitplan.search`` is the :func:`search` function; reach the subpackage's modules with
``from bitplan.search.plans import read_plan`` or ``from bitplan.search import plans``, not by
attribute (so ``import bitplan.search.plans as plans`` fails too).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bitplan._jobs import analyze, search
    from bitplan._plans import apply, load_plan, solve
    from bitplan.search.plans import FrontierFile as Frontier
    from bitplan.search.plans import Plan

__all__ = ["Frontier", "Plan", "analyze", "apply", "load_plan", "search", "solve"]

# Public name -> (module, attribute): the private modules re-exported here, optuna-style.
_EXPORTS = {
    "analyze": ("bitplan._jobs", "analyze"),
    "search": ("bitplan._jobs", "search"),
    "solve": ("bitplan._plans", "solve"),
    "apply": ("bitplan._plans", "apply"),
    "load_plan": ("bitplan._plans", "load_plan"),
    "Plan": ("bitplan.search.plans", "Plan"),  # a bitplan.plan/v1 document
    "Frontier": ("bitplan.search.plans", "FrontierFile"),  # a bitplan.frontier/v1 document
}

# `search` names both the function and the subpackage of the search/ folder. Importing the
# subpackage (its __init__ is empty, so this is cheap) puts it in sys.modules now; a later
# `from bitplan.search.x import y` finds it there and never binds the name again. Dropping the
# binding this import made leaves `bitplan.search` to __getattr__, i.e. to the function.
importlib.import_module("bitplan.search")
globals().pop("search")


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use and keep the name (PEP 562)."""
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'bitplan' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
