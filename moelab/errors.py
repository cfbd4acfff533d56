"""Errors a run can end with; the CLI prints them as one line (exit status 2)."""


class RunError(RuntimeError):
    """A run stopped for a reason the user can act on (numerical fault, dead peer, ...)."""
