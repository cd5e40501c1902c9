"""Where a bitplan server listens unless configured otherwise, so where clients look first.

Plain constants: :class:`~bitplan.app.settings.Settings` takes its ``host``/``port`` defaults
from here, and the client and the CLI's job commands read them without loading pydantic.
"""

from __future__ import annotations

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_URL"]

DEFAULT_HOST = "127.0.0.1"  # loopback: a fresh server is reachable from this machine only
DEFAULT_PORT = 8000
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
