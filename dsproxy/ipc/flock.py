"""Exclusive ``flock`` with a timeout, the one lock primitive every dsproxy writer uses.

``flock`` is released by the kernel when the holder's last descriptor closes -- also when the
holder is SIGKILLed -- so no crash can leave it held.  The wait is polled with ``LOCK_NB`` and an
exponential back-off (0.2 ms .. 20 ms) instead of a blocking call interrupted by a timer signal,
so it needs neither signals nor threads and works the same in every process role.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator


class LockTimeout(Exception):
    """The lock was not acquired within the timeout."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(f'unable to acquire lock "{path}" - timed out after {timeout:g} s')
        self.path = path
        self.timeout = timeout


@contextlib.contextmanager
def exclusive(path: str | os.PathLike[str], timeout: float, mode: int = 0o660) -> Iterator[int]:
    """Hold ``flock(LOCK_EX)`` on ``path`` (created if missing) for the ``with`` block.

    Raises :class:`LockTimeout`, or ``OSError`` if the lock file cannot be opened.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
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
