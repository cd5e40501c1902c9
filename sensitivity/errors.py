"""The one exception type for bad user input.

Anything a user can get wrong (a model path, a data file, a format name, a budget, a plan file)
raises :class:`InputError` with a message that fits on one line and says what to do. The CLI
prints it and exits with code 2; the service turns it into a problem+json 422.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input; ``str(error)`` is one line that says what is wrong and how to fix it."""
