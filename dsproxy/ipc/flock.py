"""Exclusive ``flock`` with a timeout, the one lock primitive every dsproxy writer uses.

``flock`` is released by the kernel when the holder's last descriptor closes -- also when the
holder is SIGKILLed -- so no crash can leave it held.  The wait is polled with ``LOCK_NB`` and an
exponential back-off (0.2 ms .. 20 ms) instead of a blocking call interrupted by a timer signal,
so it needs neither signals nor threads and works the same in every process role.

Lock files live in directories other users may write (the run dir is group-writable under
systemd), so the file is opened with ``O_NOFOLLOW|O_NONBLOCK`` and checked with ``fstat`` (a
regular file with one link, see :mod:`dsproxy.fsutil`): root never creates the target of a planted
link nor locks a file someone hard-linked there.  With ``replace_unsafe`` (the run dir's locks) such
an entry is removed -- ``unlink`` removes a link, not its target -- and the lock file created anew,
once; the owner of a lock file is not checked there, as any member of the group may create it (and
can hold the lock anyway: the file is 0660).  Without it (``.datastore.lck`` in the root-only
config dir, where only an admin can have put the entry) the open is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Iterable, Iterator

from .._lazylog import LazyLogger
from ..fsutil import UnsafePath, open_file

log = LazyLogger("dsproxy.flock")  # the library path must not pay for importing logging


class LockTimeout(Exception):
    """The lock was not acquired within the timeout."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(f'unable to acquire lock "{path}" - timed out after {timeout:g} s')
        self.path = path
        self.timeout = timeout


def open_lock_file(
    path: str | os.PathLike[str],
    mode: int = 0o660,
    *,
    dir_fd: int | None = None,
    replace_unsafe: bool = False,
    owners: Iterable[int] | None = None,
) -> int:
    """Open (creating if missing) a lock file without following a link; see the module docstring."""
    try:
        return open_file(path, os.O_RDWR | os.O_CREAT, mode, dir_fd=dir_fd, owners=owners)
    except UnsafePath as err:
        if not replace_unsafe:
            raise
        try:
            st = os.lstat(path, dir_fd=dir_fd)
            if stat.S_ISDIR(st.st_mode):
                raise err from None
            os.unlink(path, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        log.warning("%s: removed it, using a new lock file", err)
        return open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode, dir_fd=dir_fd, owners=owners)


@contextlib.contextmanager
def exclusive(
    path: str | os.PathLike[str],
    timeout: float,
    mode: int = 0o660,
    *,
    dir_fd: int | None = None,
    replace_unsafe: bool = False,
    owners: Iterable[int] | None = None,
) -> Iterator[int]:
    """Hold ``flock(LOCK_EX)`` on ``path`` (created if missing) for the ``with`` block.

    Raises :class:`LockTimeout`, or ``OSError`` (:class:`~dsproxy.fsutil.UnsafePath` for a link or
    a file that is not a plain one) if the lock file cannot be opened.
    """
    fd = open_lock_file(path, mode, dir_fd=dir_fd, replace_unsafe=replace_unsafe, owners=owners)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(os.fspath(path), timeout) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        yield fd
    finally:
        os.close(fd)
