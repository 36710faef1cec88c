"""Per-process datastore instances (docs/design.md §3.2, §5 step 5).

An instance is what a lookup hands out a handle to: the store's name and path, its properties as
configured when the instance was built, its last garbage-collection status, and an open file
descriptor on ``<path>/.lock`` carrying a *shared* ``fcntl`` lock.

``fcntl`` record locks belong to the process, and closing *any* descriptor of the file drops all
of them.  So when the config changes, the instance is rebuilt around the **same** descriptor
(:func:`build` with ``previous``); the descriptor is closed when the instance is evicted (or the
store moved to another path), and -- only while this process has no operation on the store -- by
the fd budget (:mod:`dsproxy.fdbudget`) to make room for another store; :meth:`Instance.reopen`
opens it and takes the shared lock again on the next lookup.  A host with more stores than
``LimitNOFILE`` allows is served, with reopens instead of an fd per store.

The files inside a store directory belong to the store owner, not to dsproxy, so they are
untrusted (issue 8: one bad ``.gc-status`` used to crash every worker at boot):

* ``.lock`` and ``.gc-status`` are opened with ``O_NOFOLLOW | O_NONBLOCK`` (a symbolic link is
  refused, a FIFO cannot block the opener) and must be regular files (``fstat``).
* ``.gc-status`` is read only up to :data:`GC_STATUS_MAX_BYTES` (1 MiB; PBS writes a few hundred
  bytes) and must be a JSON object without ``NaN``/``Infinity``, lone surrogates or nesting
  deeper than the interpreter's recursion limit.  Anything wrong with it becomes an inline error,
  ``gc_status == {"error": "datastore 'X': ignoring .gc-status: <why>"}``, which the verbose
  status shows; the lookup itself goes on.
* A ``.lock`` that cannot be used fails the lookup of that store with :class:`InstanceError`.
* Running out of descriptors (EMFILE/ENFILE) on either file fails the lookup with
  :class:`~dsproxy.errors.OutOfDescriptors` (503, "datastore 'X': cannot open its lock file: Too
  many open files") -- never a raw ``OSError``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from typing import Any, Final

from ._lazylog import LazyLogger
from .config import Value
from .errors import InstanceError, OutOfDescriptors

log = LazyLogger("dsproxy.instance")


class Instance:
    """One store's per-process instance; built by :func:`build`."""

    __slots__ = ("gc_status", "generation", "lock_fd", "name", "path", "props", "used")

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
        self.used = True  # the clock mark of :mod:`dsproxy.fdbudget` (set by slow-path lookups)

    def __repr__(self) -> str:
        return f"<Instance {self.name!r} {self.path!r} fd={self.lock_fd} generation={self.generation}>"

    def close(self) -> None:
        """Close the ``.lock`` descriptor (drops this process's locks on the store)."""
        if self.lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = -1

    def reopen(self) -> None:
        """Open ``.lock`` again and take the shared lock (after :mod:`dsproxy.fdbudget` closed it)."""
        if self.lock_fd < 0:
            self.lock_fd = _open_lock(self.name, self.path)
        self.used = True


#: how a store file is opened: never blocks (a FIFO planted as the file), never follows a link
_READ_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_LOCK_FLAGS: Final = os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
#: the largest ``.gc-status`` read (PBS writes a few hundred bytes)
GC_STATUS_MAX_BYTES: Final = 1 << 20


def _strerror(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "it is a symbolic link (not followed)"
    return err.strerror or str(err)


def _out_of_fds(name: str, what: str, err: OSError) -> OutOfDescriptors | None:
    if err.errno in (errno.EMFILE, errno.ENFILE):
        return OutOfDescriptors(f"datastore '{name}': cannot open its {what}: {err.strerror}")
    return None


def _open_lock(name: str, path: str) -> int:
    # plain string joins and os-level calls: a host opens 1,000s of these on a cold start
    chunks = path + "/.chunks"
    if not _isdir(chunks):
        raise InstanceError(f"unable to open chunk store '{name}' at \"{chunks}\" - no such directory")
    lock = path + "/.lock"
    try:
        fd = os.open(lock, _LOCK_FLAGS)
    except OSError as err:
        raise _out_of_fds(name, "lock file", err) or InstanceError(
            f"unable to open chunk store '{name}' at \"{lock}\" - {_strerror(err)}"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InstanceError(f"unable to open chunk store '{name}' at \"{lock}\" - not a regular file")
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        raise InstanceError(f"unable to lock chunk store '{name}' - {err.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _isdir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


class StoreFileError(Exception):
    """A store file cannot be used; ``str(err)`` says why (shown inline for that store)."""


def read_store_file(path: str, limit: int) -> bytes | None:
    """The bytes of a file inside a store directory, or None if it does not exist.

    The store directory belongs to the store owner, so the file may be anything: it is opened
    without following a symbolic link and without blocking (a FIFO), must be a regular file and
    at most ``limit`` bytes.  Raises :class:`StoreFileError`, or ``OSError`` for EMFILE/ENFILE.
    """
    try:  # os.open, not open(): the usual answer is ENOENT, and io.open's failure path costs ~3x more
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno in (errno.EMFILE, errno.ENFILE):
            raise
        raise StoreFileError(f"cannot open it: {_strerror(err)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreFileError("it is not a regular file")
        if st.st_size > limit:
            raise StoreFileError(f"it is larger than {limit} bytes ({st.st_size})")
        data = os.read(fd, limit + 1)  # one read: a regular file returns what it has
        if len(data) > limit:
            raise StoreFileError(f"it is larger than {limit} bytes")
        return data
    except OSError as err:
        raise StoreFileError(f"cannot read it: {_strerror(err)}") from None
    finally:
        os.close(fd)


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not a JSON number")


def _read_gc_status(name: str, path: str) -> dict[str, Any] | None:
    """The store's ``.gc-status``: None if there is none, ``{"error": ...}`` if it is unusable.

    Whatever is wrong with the file (not regular, a link, too big, too deeply nested, not a JSON
    object) becomes that inline error, which the verbose status shows; the lookup goes on.
    """
    try:
        data = read_store_file(path + "/.gc-status", GC_STATUS_MAX_BYTES)
        if data is None:
            return None
        import json  # only when there is a status to read: keeps `import dsproxy` light

        try:
            status = json.loads(data, parse_constant=_reject_constant)
            json.dumps(status, ensure_ascii=False).encode()  # lone surrogates would break the reply
        except RecursionError:
            raise StoreFileError("it is nested too deeply") from None
        except (ValueError, UnicodeError) as err:
            raise StoreFileError(f"it is not valid JSON: {str(err)[:200]}") from None
        if not isinstance(status, dict):
            raise StoreFileError("it is not a JSON object")
        return status
    except StoreFileError as err:
        message = f"datastore '{name}': ignoring .gc-status: {err}"
        log.warning("%s", message)
        return {"error": message}


def build(name: str, props: dict[str, Value], generation: int, previous: Instance | None = None) -> Instance:
    """Build the instance of ``name``; reuse ``previous``'s descriptor if the path is unchanged."""
    path = str(props["path"])
    reuse = previous is not None and previous.path == path and previous.lock_fd >= 0
    fd = previous.lock_fd if reuse and previous is not None else _open_lock(name, path)
    try:
        gc_status = _read_gc_status(name, path)
    except OSError as err:  # out of descriptors: this lookup fails, a reused fd stays with previous
        if not reuse:
            os.close(fd)
        raise _out_of_fds(name, ".gc-status", err) or InstanceError(f"datastore '{name}': {_strerror(err)}") from None
    if previous is not None:
        if reuse:
            previous.lock_fd = -1  # handed over: closing the old instance must not close it
        else:
            previous.close()
    return Instance(name, path, props, generation, fd, gc_status)
