"""Options of any command that writes files, kept apart from :mod:`._options` (whose job
options read :class:`~bitplan.search.spec.JobSpec`), so that light commands stay light."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["OutOpt"]

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
