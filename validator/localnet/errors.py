"""The local subnet's one error type."""


class LocalnetError(RuntimeError):
    """The local subnet cannot start or went down; the message names the cause (and a child's log tail)."""
