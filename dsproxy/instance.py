"""Per-process datastore instances (DESIGN §3.2, §5 step 5).

An instance is what a lookup hands out a handle to: the store's name and path, its properties as
configured when the instance was built, its last garbage-collection status, and an open file
descriptor on ``<path>/.lock`` carrying a *shared* ``fcntl`` lock.

``fcntl`` record locks belong to the process, and closing *any* descriptor of the file drops all
of them.  So when the config changes, the instance is rebuilt around the **same** descriptor
(:func:`build` with ``previous``); the descriptor is closed only when the instance is evicted (or
the store moved to another path).  This is also why a host with 1,000 stores needs 1,000+ fds per
process and the raised ``LimitNOFILE``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from typing import Any

from ._lazylog import LazyLogger
from .config import Value
from .errors import InstanceError

log = LazyLogger("dsproxy.instance")


class Instance:
    """One store's per-process instance; built by :func:`build`."""

    __slots__ = ("gc_status", "generation", "lock_fd", "name", "path", "props")

    def __init__(
        self,
        name: str,
        path: str,
        props: dict[str, Value],
        generation: int,
        lock_fd: int,
        gc_status: dict[str, Any] | None,
    ) -> None:
        self.name = name
        self.path = path
        self.props = props
        self.generation = generation
        self.lock_fd = lock_fd
        self.gc_status = gc_status

    def __repr__(self) -> str:
        return f"<Instance {self.name!r} {self.path!r} fd={self.lock_fd} generation={self.generation}>"

    def close(self) -> None:
        """Close the ``.lock`` descriptor (drops this process's locks on the store)."""
        if self.lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = -1


def _open_lock(name: str, path: str) -> int:
    # plain string joins and os-level calls: a host opens 1,000s of these on a cold start
    chunks = path + "/.chunks"
    if not _isdir(chunks):
        raise InstanceError(f"unable to open chunk store '{name}' at \"{chunks}\" - no such directory")
    lock = path + "/.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise InstanceError(f"unable to open chunk store '{name}' at \"{lock}\" - {err.strerror}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        raise InstanceError(f"unable to lock chunk store '{name}' - {err.strerror}") from None
    return fd


def _isdir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _read_gc_status(name: str, path: str) -> dict[str, Any] | None:
    try:  # os.open, not open(): the usual answer is ENOENT, and io.open's failure path costs ~3x more
        fd = os.open(path + "/.gc-status", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("datastore '%s': ignoring unreadable .gc-status: %s", name, err.strerror)
        return None
    import json  # only when there is a status to read: keeps `import dsproxy` light

    try:
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as err:
        log.warning("datastore '%s': ignoring unreadable .gc-status: %s", name, err)
        return None
    return data if isinstance(data, dict) else None


def build(name: str, props: dict[str, Value], generation: int, previous: Instance | None = None) -> Instance:
    """Build the instance of ``name``; reuse ``previous``'s descriptor if the path is unchanged."""
    path = str(props["path"])
    if previous is not None and previous.path == path and previous.lock_fd >= 0:
        fd = previous.lock_fd
        previous.lock_fd = -1  # handed over: closing the old instance must not close it
    else:
        fd = _open_lock(name, path)
        if previous is not None:
            previous.close()
    return Instance(name, path, props, generation, fd, _read_gc_status(name, path))
