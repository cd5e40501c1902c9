"""What one job asks for: the request shared by the CLI, the REST API and the worker.

A :class:`JobSpec` is plain data (JSON-serialisable through :meth:`JobSpec.to_dict`), so the
service can store it in a job row and a worker on another machine can run it unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bitplan.sensitivity.analyzer import METHODS
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import DEFAULT_FORMATS, parse_formats

__all__ = ["METHODS", "SAMPLERS", "JobSpec"]

# The samplers :func:`bitplan.search.measured.measured_search` knows (it imports this list); defined
# here so that validating a request does not import Optuna.
SAMPLERS = ("nsga2", "tpe")


@dataclass
class JobSpec:
    """One planning request. ``calib`` is ``builtin`` or a data file path; ``budget`` uses the
    syntax of DESIGN §5 (``4.5bpw``, ``60MB``, ``0.3x``)."""

    model: str
    budget: str
    calib: str = "builtin"
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    method: str = "fisher"
    task: str | None = None
    trials: int = 40
    timeout: float | None = None
    seed: int = 0
    sampler: str = "nsga2"
    exclude: list[str] = field(default_factory=list)
    pins: dict[str, str] = field(default_factory=dict)
    holdout: float = 0.25
    max_length: int = 128
    max_samples: int | None = None
    batch_size: int = 32
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; accepted: {', '.join(METHODS)}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; accepted: {', '.join(SAMPLERS)}")
        if self.trials < 0:
            raise InputError(f"trials must be >= 0, got {self.trials}")
        if self.timeout is not None and self.timeout <= 0:
            raise InputError(f"timeout must be positive seconds, got {self.timeout}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.holdout < 1.0:
            raise InputError(f"holdout must be a fraction in (0, 1), got {self.holdout}")
        self.formats = [f.name for f in parse_formats(self.formats)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``JobSpec(**spec.to_dict())`` rebuilds it."""
        return asdict(self)
