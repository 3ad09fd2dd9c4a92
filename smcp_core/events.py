"""What a caller hears while a stage runs: the :class:`Reporter` protocol (log lines, progress, metrics
rows).  The CLI implements it with rich; the library's default is silent."""

from __future__ import annotations

pass


class Reporter:
    """Callbacks the CLI implements (no-ops here so the library works on its own)."""

    def log(self, msg: str) -> None:  # noqa: D401
        pass

    def progress(self, task: str, done: int, total: int, info: str = "") -> None:
        pass

    def metrics(self, row: dict) -> None:
        pass
