"""Server paths out of the messages a user reads.

The service stores uploads, caches and artifacts under its data folder and hands those paths
to loaders, whose errors quote them ("cannot read /srv/bitplan/uploads/models/…/3f2a….zip").
A user should read their own file's name instead, and learn nothing about the server's disk:
every message that leaves the service (422 details, a failed job's error) passes through
:func:`redact` with the paths it may hold and the names to show for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["path_names", "redact"]


def path_names(path: Path | str, shown: str) -> dict[str, str]:
    """``{server spelling: shown}`` for ``path`` as given and as resolved (symlinks, ``..``):
    a loader may quote either."""
    names = {str(path): shown}
    try:
        names[str(Path(path).resolve())] = shown
    except (OSError, RuntimeError):  # an unresolvable path is quoted, if at all, as given
        pass
    return names


def redact(message: str, names: Mapping[str, str]) -> str:
    """``message`` with every server path in ``names`` replaced by its shown name; longer
    paths first, so a file inside a listed folder shows its own name, not the folder's."""
    for server, shown in sorted(names.items(), key=lambda item: -len(item[0])):
        if server:
            message = message.replace(server, shown)
    return message
