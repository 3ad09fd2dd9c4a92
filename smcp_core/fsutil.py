"""Small file-system helpers: atomic writes and JSON reads with one-line user errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import SmcpError


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory so that a rename survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open(path, "w")`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def make_temp_beside(path: Path) -> Path:
    """A new empty temp file in ``path``'s directory, with normal (umask) permissions, not 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        os.chmod(tmp, _default_mode())
    except OSError:
        pass
    return Path(tmp)


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it into place.

    Readers never see a half-written file; on failure the temp file is removed and the old file (if
    any) is left untouched.  Parent directories are created.
    """
    path = Path(path)
    tmp = make_temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    Readers never see a half-written file; on failure the temp file is removed and the old file (if
    any) is left untouched.  Parent directories are created.
    """
    return atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON (sorted keys off: insertion order is kept, trailing newline)."""
    text = json.dumps(obj, indent=indent, allow_nan=True)
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace``."""
    import torch

    return atomic_write_with(path, lambda f: torch.save(obj, f))


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file; a missing, unreadable or corrupt file raises :class:`SmcpError`.

    ``what`` describes the file for the message, e.g. ``"latency table"``.
    """
    path = Path(path)
    if not path.exists():
        raise SmcpError(f"{what} {path} does not exist")
    if path.is_dir():
        raise SmcpError(f"{what} {path} is a directory, expected a JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SmcpError(f"cannot read {what} {path}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SmcpError(
            f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "delete it and re-create it"
        ) from e
