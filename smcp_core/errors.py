"""Error types with a fixed meaning for the command line.

* :class:`SmcpError` — bad input (recipe, file, model, data): the CLI prints ``str(err)`` as one line
  and exits with code 1.
* :class:`GateFailed` — a validation gate failed (target speed missed, parity/accuracy out of
  tolerance): exit code 2.
"""

from __future__ import annotations


class SmcpError(Exception):
    """A user-facing error: one line saying what is wrong, where, and how to fix it (exit code 1)."""

    exit_code = 1


class GateFailed(SmcpError):
    """A validation gate failed (exit code 2)."""

    exit_code = 2


class InfeasibleTarget(SmcpError):
    """The requested budget is below the smallest reachable cost."""
