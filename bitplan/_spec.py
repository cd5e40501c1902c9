"""The API's keyword arguments → one :class:`~bitplan.search.spec.JobSpec`, the CLI's request.

``JobSpec`` is the one place the job defaults are written; :data:`DEFAULTS` exposes them so that
the API's signatures show the same values (``help(bitplan.search)``) without restating them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError

__all__ = [
    "DEFAULTS",
    "DEFAULT_EXCLUDE",
    "DEFAULT_FORMATS",
    "DEFAULT_FUSE",
    "DEFAULT_PINS",
    "PathLike",
    "job_spec",
]

# A JobSpec with only its required fields set: every other attribute is JobSpec's default.
DEFAULTS = JobSpec(model="builtin:digits-cnn", budget="16bpw")
# Immutable copies, by name, for signatures (a list or dict default would be shared by calls).
DEFAULT_FORMATS: tuple[str, ...] = tuple(DEFAULTS.format_names)
DEFAULT_EXCLUDE: tuple[str, ...] = tuple(DEFAULTS.exclude)
DEFAULT_PINS: Mapping[str, str] = MappingProxyType(DEFAULTS.pin_names())
DEFAULT_FUSE: tuple[str, ...] = tuple(DEFAULTS.fuse)

PathLike = str | os.PathLike[str]


def _names(names: Sequence[str] | str) -> list[str]:
    """A list of names, or one comma-separated string as ``--formats``/``--fuse`` take it."""
    return names.split(",") if isinstance(names, str) else list(names)


def _patterns(exclude: Sequence[str] | str) -> list[str]:
    """A list of fnmatch patterns; a bare string is one pattern (as one ``--exclude``)."""
    return [exclude] if isinstance(exclude, str) else list(exclude)


def job_spec(
    *,
    model: PathLike,
    budget: str,
    calib: PathLike,
    formats: Sequence[str] | str,
    exclude: Sequence[str] | str,
    pins: Mapping[str, str],
    fuse: Sequence[str] | str = DEFAULT_FUSE,
    **options: Any,
) -> JobSpec:
    """The JobSpec of an API call: paths as strings, sequences as lists, the rest as given.

    JobSpec validates every value and raises :class:`InputError` naming the bad one.
    """
    if not isinstance(pins, Mapping):
        raise InputError(
            f"pins must be a mapping of layer pattern to format, e.g. {{'fc*': 'int8'}}; "
            f"got {type(pins).__name__}"
        )
    return JobSpec(
        model=os.fspath(model),
        budget=budget,
        calib=os.fspath(calib),
        formats=_names(formats),
        fuse=[name.strip() for name in _names(fuse) if name.strip()],  # as the CLI's --fuse
        exclude=_patterns(exclude),
        pins=dict(pins),
        **options,
    )
