"""Small file-system helpers: atomic writes, checksums, run-directory locks, and reads of JSON, torch
and ONNX artifacts that turn every failure into a one-line :class:`SmcpError`.

Checksums.  A write with ``checksum=True`` records the file's SHA-256 in ``SHA256SUMS`` in the same
directory (``sha256sum`` format: ``<hex>  <name>``, so ``cd DIR && sha256sum -c SHA256SUMS`` checks
it by hand).  The record is updated in two atomic steps around the ``os.replace`` of the file (first
old + new digest, then only the new one), so a crash at any point leaves a manifest that matches
the file on disk: a mismatch always means the file was corrupted or changed after it was written.
Readers (:func:`read_json`, :func:`load_torch`, :func:`verify_artifact`) check the digest when the
manifest lists the file and fall back to a structural check (JSON parse, zip CRCs, ONNX parse)
when it does not.  A record whose file does not exist (the first write of a file, killed just
before its rename) is ignored.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from smcp_core.errors import SmcpError
from smcp_core.utils.text import first_line


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


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *,
                      checksum: bool = False) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it into place.

    Readers never see a half-written file; on failure the temp file is removed and the old file (if
    any) is left untouched.  Parent directories are created.  ``checksum``: record the SHA-256 in
    the directory's ``SHA256SUMS`` (crash-consistently, see the module docstring).
    """
    path = Path(path)
    tmp = make_temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if checksum:
            digest = sha256_file(tmp)
            old = [h for h in _sums_for(path) if h != digest]
            _set_sums(path, [digest] + old)  # both the file now on disk and the new one are valid
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    if checksum:
        _set_sums(path, [digest])
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, checksum: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    Readers never see a half-written file; on failure the temp file is removed and the old file (if
    any) is left untouched.  Parent directories are created.
    """
    return atomic_write_with(path, lambda f: f.write(data), checksum=checksum)


def atomic_write_text(path: str | os.PathLike, text: str, *, checksum: bool = False) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), checksum=checksum)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, checksum: bool = False) -> Path:
    """Atomically write ``obj`` as JSON (sorted keys off: insertion order is kept, trailing newline)."""
    text = json.dumps(obj, indent=indent, allow_nan=True)
    return atomic_write_text(path, text + "\n", checksum=checksum)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, checksum: bool = False) -> Path:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace``."""
    import torch

    return atomic_write_with(path, lambda f: torch.save(obj, f), checksum=checksum)


CHECKSUMS = "SHA256SUMS"


_HEX = set("0123456789abcdef")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_sums(directory: Path) -> list[tuple[str, str]]:
    """Entries of ``directory/SHA256SUMS``; malformed lines (e.g. a truncated manifest) are ignored."""
    try:
        text = (directory / CHECKSUMS).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        name = name[1:] if name.startswith("*") else name
        if sep and len(digest) == 64 and set(digest) <= _HEX and name:
            out.append((digest, name))
    return out


def _sums_for(path: Path) -> list[str]:
    return [d for d, n in _read_sums(path.parent) if n == path.name]


def _set_sums(path: Path, digests: list[str]) -> None:
    """Replace the manifest lines of ``path`` by ``digests`` (none: drop it); atomic, no checksum."""
    entries = [(d, n) for d, n in _read_sums(path.parent) if n != path.name]
    entries += [(d, path.name) for d in dict.fromkeys(digests)]
    man = path.parent / CHECKSUMS
    if not entries:
        if man.exists():
            atomic_write_text(man, "")
        return
    atomic_write_text(man, "".join(f"{d}  {n}\n" for d, n in entries))


def record_checksum(path: str | os.PathLike) -> str:
    """Record the SHA-256 of a file written by someone else (call :func:`forget_checksum` before
    that write, so that a crash in between leaves no stale record)."""
    path = Path(path)
    digest = sha256_file(path)
    _set_sums(path, [digest])
    return digest


def forget_checksum(path: str | os.PathLike) -> None:
    path = Path(path)
    if _sums_for(path):
        _set_sums(path, [])


def remove_artifact(path: str | os.PathLike) -> None:
    """Delete a file and its checksum record (missing file: no-op)."""
    path = Path(path)
    forget_checksum(path)
    try:
        path.unlink()
    except FileNotFoundError:
        pass




def verify_checksum(path: str | os.PathLike, what: str, fix: str = "re-create it") -> bool:
    """Check ``path`` against its ``SHA256SUMS`` record: True when it matches, False when there is
    no record, :class:`SmcpError` when it does not match."""
    path = Path(path)
    for attempt in range(2):  # a second look: a concurrent writer may have replaced file + record
        sums = _sums_for(path)
        if not sums:
            return False
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise SmcpError(f"cannot read {what} {path}: {first_line(exc)}") from None
        if digest in sums:
            return True
        if attempt == 0:
            time.sleep(0.05)
    raise SmcpError(
        f"{what} {path} is corrupt or was changed after smcp wrote it (its SHA-256 {digest[:12]}... does not "
        f"match {path.parent / CHECKSUMS}); {fix}, or remove its line from {CHECKSUMS} to accept the file as it is"
    )


def _check_zip(path: Path, what: str, fix: str) -> None:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise SmcpError(f"{what} {path} is truncated or corrupt ({first_line(exc)}); {fix}") from None
    if bad is not None:
        raise SmcpError(f"{what} {path} is corrupt (bad CRC in {bad}); {fix}")


def _check_onnx(path: Path, what: str, fix: str) -> None:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except ImportError:
        return
    except Exception as exc:  # noqa: BLE001 - protobuf and the checker raise many types
        raise SmcpError(f"{what} {path} is truncated or corrupt ({first_line(exc)}); {fix}") from None


def verify_artifact(path: str | os.PathLike, what: str, fix: str = "re-create it") -> None:
    """Raise :class:`SmcpError` (one line) unless ``path`` exists and is intact: its checksum
    record when there is one, else a structural check by type (JSON parse, zip CRCs of torch
    files, ONNX parse + checker)."""
    path = Path(path)
    if not path.is_file():
        raise SmcpError(f"{what} {path} does not exist; {fix}")
    if verify_checksum(path, what, fix):
        return
    suffix = path.suffix.lower()
    if suffix == ".json":
        read_json(path, what)
    elif suffix in (".pt", ".pth", ".pt2"):
        _check_zip(path, what, fix)
    elif suffix == ".onnx":
        _check_onnx(path, what, fix)


def load_torch(path: str | os.PathLike, what: str, fix: str = "re-create it", *,
               keys: tuple[str, ...] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` after the checksum check; a missing, truncated,
    corrupt or unexpected file raises :class:`SmcpError`.  ``keys``: the dict keys it must have."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise SmcpError(f"{what} {path} not found; {fix}")
    verify_checksum(path, what, fix)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and unpickler errors
        raise SmcpError(f"{what} {path} is truncated or corrupt and cannot be read "
                        f"({first_line(exc)}); {fix}") from None
    if keys:
        missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise SmcpError(f"{what} {path} is not an smcp file of this kind (missing {', '.join(missing)}); {fix}")
    return obj


def _remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files of atomic writes (``.NAME.XXXX.tmp``) left in a run directory and its
    stage directories by a writer that was killed; only safe while holding the run lock."""
    removed = []
    for d in (directory, directory / "prune", directory / "slim", directory / "export"):
        if not d.is_dir():
            continue
        for f in d.glob(".*.tmp"):
            try:
                if f.is_file():
                    f.unlink()
                    removed.append(f)
            except OSError:
                pass
    return removed


LOCK_NAME = ".smcp.lock"


def _exists(p: Path) -> bool:
    try:
        return p.exists() or p.is_symlink()
    except OSError:  # e.g. a name too long for the file system
        return False


def _first_file_above(directory: Path) -> Path | None:
    """The nearest existing ancestor of ``directory`` (itself included) that is not a directory."""
    for p in (directory, *directory.parents):
        if _exists(p):
            return None if p.is_dir() else p
    return None


def run_dir_error(directory: Path, exc: OSError) -> SmcpError:
    """One-line :class:`SmcpError` for an ``OSError`` met while creating the run directory."""
    reason = exc.strerror or first_line(exc)
    if exc.errno == errno.ENAMETOOLONG:
        longest = max(directory.parts, key=len, default=str(directory))
        return SmcpError(f"run directory {str(directory)[:80]}... has a name too long for the file system "
                         f"({len(longest)} characters in one component, {len(str(directory))} in all); use a "
                         "shorter recipe `name` or --out")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = _first_file_above(directory)
        if blocker == directory:
            return SmcpError(f"run directory {directory} exists and is a file, not a directory; remove it or use "
                             "another --out")
        if blocker is not None:
            return SmcpError(f"run directory {directory} cannot be created: {blocker} is a file, not a directory; "
                             "use another --out")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SmcpError(f"run directory {directory} cannot be created or written ({reason}); make its parent "
                         "writable or use another --out")
    if exc.errno == errno.ELOOP:
        return SmcpError(f"run directory {directory} cannot be created ({reason}: a symbolic link loop in the "
                         "path); fix the link or use another --out")
    return SmcpError(f"run directory {directory} cannot be created ({reason}); use another --out")


def _lock_error(path: Path, exc: OSError) -> SmcpError:
    reason = exc.strerror or first_line(exc)
    if exc.errno == errno.ELOOP or path.is_symlink():
        return SmcpError(f"lock file {path} is a symbolic link ({reason}); delete it (rm {path}) and retry")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SmcpError(f"run directory {path.parent} is not writable ({reason}); make it writable or use "
                         "another --out")
    return SmcpError(f"cannot lock run directory {path.parent} ({reason}: {path}); delete {path} or use another "
                     "--out")


def make_run_dir(directory: Path) -> None:
    """``directory.mkdir(parents=True, exist_ok=True)``; an ``OSError`` (a file in the way, a read-only
    parent, a name too long) becomes a one-line :class:`SmcpError` and the parents created by the
    failed call are removed again (no empty ``runs/`` left behind)."""
    missing = []
    for p in (directory, *directory.parents):
        if _exists(p):
            break
        missing.append(p)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        for p in missing:  # deepest first; rmdir leaves anything that is not an empty directory
            try:
                p.rmdir()
            except OSError:
                pass
        raise run_dir_error(directory, exc) from None


@contextmanager
def run_lock(directory: str | os.PathLike, command: str = "smcp", *, create: bool = True) -> Iterator[Path]:
    """Hold an exclusive lock on a run directory for the duration of the block.

    A second process (or a second lock in this process) fails at once with :class:`SmcpError`
    naming the holder.  The lock is an OS file lock (``filelock``): the kernel releases it when the
    holder exits or is killed, so a stale ``.smcp.lock`` file never blocks a later run.
    ``create=False``: a missing directory is not created (and there is nothing to lock).
    """
    from filelock import FileLock, Timeout

    directory = Path(directory)
    if not create and not directory.is_dir():
        yield directory
        return
    make_run_dir(directory)
    lock = FileLock(str(directory / LOCK_NAME), timeout=0)
    info_path = directory / (LOCK_NAME + ".info")
    try:
        lock.acquire()
    except Timeout:  # (a TimeoutError, so an OSError too: before the clause below)
        holder = "another smcp process"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            holder = f"`{info.get('command', 'smcp')}` (pid {int(info['pid'])}, since {info.get('since', '?')})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise SmcpError(f"run directory {directory} is in use by {holder}; wait for it to finish or use "
                        "another --out") from None
    except OSError as exc:  # a symlink loop, a read-only directory, ...: bad input, not a bug
        raise _lock_error(directory / LOCK_NAME, exc) from None
    try:
        _remove_stale_temps(directory)
        try:
            atomic_write_json(info_path, {"pid": os.getpid(), "command": command,
                                          "since": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=None)
        except OSError:
            pass
        yield directory
    finally:
        try:
            info_path.unlink()
        except OSError:
            pass
        lock.release()


def read_json(path: str | os.PathLike, what: str, fix: str = "delete it and re-create it") -> Any:
    """Read a JSON file; a missing, unreadable or corrupt file (checksum mismatch, invalid JSON)
    raises :class:`SmcpError`.

    ``what`` describes the file for the message, e.g. ``"latency table"``; ``fix`` says what to do.
    """
    path = Path(path)
    if not path.exists():
        raise SmcpError(f"{what} {path} does not exist")
    if path.is_dir():
        raise SmcpError(f"{what} {path} is a directory, expected a JSON file")
    verify_checksum(path, what, fix)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SmcpError(f"cannot read {what} {path}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SmcpError(
            f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {fix}"
        ) from e
