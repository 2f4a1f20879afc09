"""The one exception type a user can cause."""

from __future__ import annotations


class E3PruneError(ValueError):
    """Bad input or an impossible request, with a message that says what to do.

    ``field`` names the configuration field or argument at fault, when there is one, so
    that callers (CLI, components, tests) can point at it without parsing the message.
    """

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)
