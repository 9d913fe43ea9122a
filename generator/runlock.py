"""One run per folder: ``with RunLock(folder):`` holds ``<folder>/.lock`` for the life of a run.

The lock is an ``fcntl.flock`` on the open file, so the kernel lets it go when the holder ends,
however it ends (a kill included). The file says who holds it (pid, host, start time, command) for
the message a second taker gets. A file whose lock nobody holds was left by a run that is gone: it
is taken over with a warning. The lock is removed when the run ends.

Where a filesystem cannot ``flock``, the recorded pid decides: a lock of a pid that is not alive on
this host is stale. The lock is advisory: it keeps synthmed runs apart, not other programs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class RunFolderInUseError(UserError):
    """Another live process holds the run folder's lock."""


def owner_record() -> dict:
    """Who takes the lock: this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(fd: int) -> dict | None:
    data = os.pread(fd, 4096, 0)
    try:
        owner = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) else None


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing holder unlinks it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this filesystem cannot flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return None
        raise
    return True


def _owner_alive(owner: dict | None) -> bool:
    """For filesystems without flock: the recorded owner still runs (unknown hosts are assumed alive)."""
    if owner is None or not isinstance(owner.get("pid"), int):
        return False
    return owner.get("host") != socket.gethostname() or pid_alive(owner["pid"])


class RunLock:
    """``<folder>/<name>``, held from ``acquire`` (or ``with``) to ``release``; the folder is made if absent."""

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, previous = self._lock_file()
        except PermissionError as exc:
            raise UserError(f"cannot lock {self.path}: {exc.strerror}; the run folder must be writable") from None
        if previous is not None:
            log.warning("%s: taking over a lock left by pid %s on host %s (since %s), which no longer runs", self.path,
                        previous.get("pid"), previous.get("host"), previous.get("started"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner_record()) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def _lock_file(self) -> tuple[int, dict | None]:
        """The lock file, open and locked, and the record a previous owner left in it (None when none did)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                got, owner = _try_flock(fd), _read_owner(fd)
                if _same_file(fd, self.path):
                    if got is False or (got is None and _owner_alive(owner)):
                        raise RunFolderInUseError(self._in_use(owner))
                    return fd, owner
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # its holder removed it between our open and our lock: open the new one

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one takes the removed file) and let go."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _in_use(self, owner: dict | None) -> str:
        if owner is None:  # the holder has not written its record yet
            return (f"{self.folder} is in use by another process that is just starting; wait for it to finish or, if no "
                    f"synthmed process uses it, remove {self.path}")
        return (f"{self.folder} is in use by pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('started')}; "
                f"wait for it to finish or, if that process is gone, remove {self.path}")

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def one_at_a_time(path: str | os.PathLike, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (made if absent; never removed, so no two holders ever lock
    different files), waiting while another process holds it: for a step two processes may both start but
    only one should do (building a missing knowledge base). ``waiting`` is logged while it waits. Where the
    filesystem cannot flock, nothing is held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        got = _try_flock(fd)
        if got is False:
            log.info("%s", waiting or f"waiting for {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the file lets the lock go


__all__ = ["LOCK_NAME", "RunFolderInUseError", "RunLock", "one_at_a_time", "owner_record", "pid_alive"]
