"""Files that are complete or absent: every write goes to a temporary file beside the target, is
flushed to disk, then renamed over the target (``os.replace`` is atomic on one filesystem). A crash
mid-write leaves the old file (or none), never half of a new one; the temporary file is removed
when the write fails.

- ``write_bytes_atomic`` / ``write_text_atomic`` / ``write_json_atomic``: a whole file at once.
- ``atomic_open``: a file streamed row by row (manifests, JSON lines).
- ``atomic_write(path, lambda tmp: save_file(state, str(tmp)))``: any writer that takes a path
  (safetensors, ``torch.save``, PIL, matplotlib). The temporary name keeps the target's suffix, so
  writers that infer the format from it still do.
- ``atomic_folder`` / ``replace_folder``: a folder written beside its target, swapped in when complete.
- ``append_whole``: lines appended to a log in full or not at all (a full disk cuts the file back).

A full disk or a read-only folder met by these helpers raises :class:`WriteError` (an ``OSError``
and a ``SynthmedError``): one line naming the target and what to do.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import SynthmedError

log = logging.getLogger(__name__)

_WRITE_HINTS = {
    errno.ENOSPC: "no space left on the disk; free some space and run again",
    errno.EDQUOT: "the disk quota is used up; free some space and run again",
    errno.EFBIG: "the file is larger than the file system allows",
    errno.EROFS: "the file system is read-only; choose a folder on a writable one",
    errno.EACCES: "permission denied; make the folder writable or choose another one",
    errno.EPERM: "permission denied; make the folder writable or choose another one",
}


class WriteError(SynthmedError, OSError):
    """A file that could not be written (full disk, read-only folder); nothing half-written was left."""


def write_error(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` as a one-line :class:`WriteError` naming ``path`` when it is a disk or permission fault, else ``exc``."""
    hint = _WRITE_HINTS.get(exc.errno)
    if hint is None or isinstance(exc, WriteError):
        return exc
    error = WriteError(f"cannot write {path}: {hint} (nothing half-written was kept)")
    error.errno = exc.errno  # strerror and filename stay unset: they would replace the message in str(error)
    return error


@contextmanager
def _writing(path: str | os.PathLike) -> Iterator[None]:
    """Turns a disk or permission fault of the enclosed writes into a :class:`WriteError` about ``path``."""
    try:
        yield
    except OSError as exc:
        error = write_error(exc, path)
        if error is exc:
            raise
        raise error from exc


def _remove(path: Path) -> None:
    with suppress(OSError):  # cleanup never hides the error that made it necessary
        path.unlink(missing_ok=True)


def temporary_path(path: str | os.PathLike) -> Path:
    """A hidden, unique sibling of ``path`` with the same suffix: ``.name.<pid>.<token>.tmp<suffix>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


_TEMP_FILE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp")  # temporary_path's names: .name.<pid>.<token>.tmp<suffix>
_TEMP_FOLDER = re.compile(r"^\.(.+)\.(tmp|old)-(\d+)$")  # atomic_folder's .name.tmp-<pid>, replace_folder's .name.old-<pid>


def sweep_temporaries(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Settle what writers killed mid-write left under ``folder`` (in it only, unless ``recursive``; their pid
    is gone, or is this process's from an earlier life: a resumed run has a new pid); the paths settled.
    A ``.x.<pid>.<token>.tmp`` file or ``.x.tmp-<pid>`` folder is removed; a ``.x.old-<pid>`` folder (a swap
    killed between its two renames) is put back as ``x`` where ``x`` is missing, else removed. Called when a
    run resumes and before every folder swap, so nothing half-done stays; each step is logged as a warning."""
    from .runlock import pid_alive

    folder = Path(folder)
    if not folder.is_dir():
        return []
    settled = []
    found = folder.rglob(".*") if recursive else folder.glob(".*")
    for path in sorted(found, key=lambda p: (-len(p.parts), p.name)):  # deepest first; .x.old before .x.tmp
        is_dir = path.is_dir()
        match = (_TEMP_FOLDER if is_dir else _TEMP_FILE).match(path.name)
        pid = int(match.group(match.re.groups)) if match else None
        if pid is None or (pid != os.getpid() and pid_alive(pid)):
            continue
        target = path.with_name(match.group(1)) if is_dir and match.group(2) == "old" else None
        if target is not None and not target.exists():
            os.replace(path, target)
            log.warning("put back %s as %s: a folder swap was killed halfway", path, target)
        elif is_dir:
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by a write that was killed", path)
        else:
            with suppress(FileNotFoundError):
                path.unlink()
            log.warning("removed %s, left by a write that was killed", path)
        settled.append(path)
    return settled


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with _writing(path):
            write(tmp)
            _fsync(tmp)
            os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``open`` for writing whose file appears at ``path`` only when the ``with`` block ends without error."""
    if not mode.startswith(("w", "x")):
        raise ValueError(f"atomic_open writes a new file; mode {mode!r} is not a write mode")
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with _writing(path):
            f = open(tmp, mode, **open_kwargs)
        with f:
            yield f  # what the block raises passes unchanged
            with _writing(path):
                f.flush()
                os.fsync(f.fileno())
        with _writing(path):
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f, _writing(path):
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_open(path, "w", encoding=encoding) as f, _writing(path):
        f.write(text)
    return Path(path)


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars (numbers and booleans), arrays and paths."""
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json_atomic(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> Path:
    """``obj`` as JSON and a final newline; ``json.dumps`` options default to ``indent=2`` and
    :func:`json_default` (numpy values and paths), others as ``json.dumps``'s own."""
    text = json.dumps(obj, **{"indent": 2, "default": json_default, **json_kwargs}) + "\n"
    return write_text_atomic(path, text)


def claim_new_folder(base: str | os.PathLike) -> Path:
    """Make and return ``base``, or ``base-1``, ``base-2``, ... if taken: ``mkdir`` is atomic, so two processes
    starting in the same second (run folders are named by time) never get the same folder."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    root, i = base, 1
    while True:
        try:
            root.mkdir()
            return root
        except FileExistsError:
            root, i = base.with_name(f"{base.name}-{i}"), i + 1


@contextmanager
def atomic_folder(folder: str | os.PathLike, tmp: str | os.PathLike | None = None, keep: bool = False) -> Iterator[Path]:
    """A fresh temporary folder (default ``.<name>.tmp-<pid>`` beside ``folder``) to fill; it becomes
    ``folder`` when the ``with`` block ends without error and is removed when it fails. ``keep``: the
    temporary folder starts as a copy of ``folder``'s present content (less temporaries), so an export
    that rewrites some files of a folder keeps the others (a model folder's ``vae/`` and its metadata)."""
    folder = Path(folder)
    tmp = Path(tmp) if tmp is not None else folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    sweep_temporaries(folder.parent, recursive=False)  # what a killed earlier swap left beside it
    shutil.rmtree(tmp, ignore_errors=True)
    with _writing(folder):
        if keep and folder.is_dir():
            shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(".*.tmp*", ".*.old-*"))
        else:
            tmp.mkdir(parents=True)
    try:
        yield tmp
        with _writing(folder):
            replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(tmp: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Swap the complete folder ``tmp`` in as ``folder``. A directory cannot be renamed over a
    non-empty one, so the old folder steps aside first and is deleted after."""
    tmp, folder = Path(tmp), Path(folder)
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def append_whole(path: str | os.PathLike, data: bytes) -> Path:
    """Append ``data`` (whole lines) to ``path`` and fsync it, in full or not at all: when a write
    fails (a full disk) the file is cut back to its previous size, so no reader sees half a line."""
    path = Path(path)
    with _writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            with _writing(path):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
        except BaseException:
            with suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    return path


__all__ = [
    "WriteError", "append_whole", "claim_new_folder", "sweep_temporaries", "atomic_folder", "atomic_open", "atomic_write", "json_default", "replace_folder",
           "temporary_path", "write_bytes_atomic", "write_error", "write_json_atomic", "write_text_atomic"]
