"""Opening files and directories without following a link someone else planted (issue 8).

Under systemd the manager runs as root while other users can write some of the directories it works
in: group ``dsproxy`` writes the run dir (``/run/dsproxy``: pid files, ``shm.lock``, the baseline
counter files) and the store owner (``--store-owner``) owns the data dir and every store.  Anything
in those directories may be a symbolic link, a hard link, a FIFO or a directory put there to make
root write, create or chown something outside.  The rules every writer here follows:

* **No symlink is followed.**  Every open carries ``O_NOFOLLOW``; a directory path is walked one
  component at a time from a directory fd (``openat(parent, name, O_DIRECTORY|O_NOFOLLOW)``,
  ``mkdirat``), so no component -- not only the last -- can be a link, and a component swapped for
  a link during the walk makes the walk fail instead of leading elsewhere.  A store path therefore
  has to be canonical, which also keeps the nesting check of create (a string of components) sound.
* **A new file is created with ``O_CREAT|O_EXCL``** under a name nobody can predict (temp files) or
  that must not exist (a store's ``.lock``).  Only shared lock files are opened with ``O_CREAT``
  alone; those are then checked with ``fstat``: a regular file with a single link (a hard link could
  make root lock -- not write -- some other file) and, where the caller knows it, the right owner.
  ``O_NONBLOCK`` keeps a planted FIFO from blocking the open; it is refused by the same check.
* **Ownership and modes are changed on the open fd** (``fchown``/``fchmod``), never by path: a
  name can be swapped between two system calls, the open file cannot.

A refusal is an :class:`UnsafePath` (an ``OSError``, so callers that report ``strerror`` keep
working) that names the path and what is wrong with it.

A datastore's lay-out (its directory, ``.chunks`` and ``.lock``) is made here too, by the same
rules, in one place: :func:`lay_out_store` fills an opened store directory (the manager's create,
which journals first, and :func:`make_store`), :func:`make_store` walks to a path and fills it
(demo stores, tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024  # buffers per writev


class UnsafePath(OSError):
    """A path refused because opening it could lead somewhere else (a link, not a regular file...)."""

    def __init__(self, path: str, reason: str, code: int = errno.ELOOP) -> None:
        super().__init__(code, reason, path)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"'{self.path}' {self.reason}"


def _display(name: str | os.PathLike[str], dir_path: str | None) -> str:
    name = os.fspath(name)
    return name if dir_path is None else os.path.join(dir_path, name)


def _refuse_link(name: str, dir_fd: int | None, shown: str, expect_dir: bool) -> UnsafePath:
    """The reason an ``O_NOFOLLOW`` open failed with ``ELOOP``/``ENOTDIR``."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return UnsafePath(shown, "changed while it was opened")
    if stat.S_ISLNK(st.st_mode):
        return UnsafePath(shown, "is a symbolic link (refused: links are not followed here)")
    if expect_dir:
        return UnsafePath(shown, "is not a directory", errno.ENOTDIR)
    return UnsafePath(shown, "is not a regular file", errno.EINVAL)


def open_dir(name: str | os.PathLike[str], *, dir_fd: int | None = None, dir_path: str | None = None) -> int:
    """Open a directory without following a link: ``os.open(name, O_DIRECTORY|O_NOFOLLOW, dir_fd=...)``.

    ``dir_path`` only names the parent in messages.  Raises :class:`UnsafePath` for a link or a
    non-directory, ``FileNotFoundError`` if missing.

    >>> fd = open_dir("/tmp"); os.close(fd)
    """
    name = os.fspath(name)
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        raise _refuse_link(name, dir_fd, _display(name, dir_path), True) from None


def check_regular(
    fd: int, shown: str, *, owners: Iterable[int] | None = None, single_link: bool = True
) -> os.stat_result:
    """``fstat`` check of an opened file: regular, one link, owned by one of ``owners`` (if given)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(shown, "is not a regular file", errno.EINVAL)
    if single_link and st.st_nlink > 1:
        raise UnsafePath(shown, f"has {st.st_nlink} hard links (refused: it may be another file)", errno.EMLINK)
    if owners is not None and st.st_uid not in set(owners):
        raise UnsafePath(shown, f"is owned by uid {st.st_uid} (refused)", errno.EPERM)
    return st


def open_file(
    name: str | os.PathLike[str],
    flags: int,
    mode: int = 0o600,
    *,
    dir_fd: int | None = None,
    dir_path: str | None = None,
    owners: Iterable[int] | None = None,
    single_link: bool = True,
) -> int:
    """Open a regular file with ``O_NOFOLLOW|O_NONBLOCK`` and check it with :func:`check_regular`.

    >>> fd = open_file("/tmp/x.lock", os.O_RDWR | os.O_CREAT, 0o660); os.close(fd)
    """
    name = os.fspath(name)
    shown = _display(name, dir_path)
    try:
        fd = os.open(name, flags | FILE_FLAGS, mode, dir_fd=dir_fd)
    except OSError as err:
        # ELOOP: a link; ENXIO: a FIFO without a reader (O_NONBLOCK) or a socket
        if err.errno not in (errno.ELOOP, errno.ENXIO):
            raise
        raise _refuse_link(name, dir_fd, shown, False) from None
    try:
        check_regular(fd, shown, owners=owners, single_link=single_link)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_temp(dir_fd: int, prefix: str, mode: int = 0o600) -> tuple[int, str]:
    """Create a new file ``<prefix>.<random>`` in ``dir_fd`` (``O_EXCL|O_NOFOLLOW``); return (fd, name).

    Nobody can plant a link under a name that does not exist yet, and ``O_EXCL`` refuses one that
    was guessed.
    """
    for _ in range(100):
        name = f"{prefix}.{os.urandom(8).hex()}"
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FILE_FLAGS, mode, dir_fd=dir_fd), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temp file name", prefix)


def write_all(fd: int, data: bytes | list[bytes]) -> None:
    """Write ``data`` -- one buffer, or a list of buffers written in order (``writev``, at most
    ``IOV_MAX`` at a time, no join of them) -- to ``fd``, however many calls that takes."""
    if not isinstance(data, list):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return
    pending: list[bytes | memoryview] = [piece for piece in data if piece]
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        done = 0
        while done < len(pending) and written >= len(pending[done]):
            written -= len(pending[done])
            done += 1
        del pending[:done]
        if written:  # a short write ended inside this buffer
            pending[0] = memoryview(pending[0])[written:]


def replace_in(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Put ``data`` at ``name`` in ``dir_fd``: an ``O_EXCL|O_NOFOLLOW`` temp file of ``mode``, renamed
    into place.  A rename replaces a link planted at ``name``; it never writes through it."""
    fd, tmp = create_temp(dir_fd, f".{name}.tmp", mode)
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def read_capped(fd: int, limit: int, shown: str) -> bytes:
    """Up to ``limit`` bytes of ``fd``; a longer file is refused (a planted huge file)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise UnsafePath(shown, f"is larger than {limit} bytes (refused)", errno.EFBIG)


def normalise(path: str) -> str:
    """``os.path.normpath`` that also collapses a leading ``//`` (which POSIX lets normpath keep)."""
    norm = os.path.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


def components(path: str) -> tuple[str, ...]:
    """The names of a path, after :func:`normalise`: ``'//a/./b/'`` -> ``('a', 'b')``."""
    return tuple(part for part in normalise(path).split("/") if part)


def is_within(inner: str, outer: str) -> bool:
    """Whether ``inner`` is ``outer`` or below it, compared by components (not by string prefix)."""
    a, b = components(inner), components(outer)
    return a[: len(b)] == b


class DirChain:
    """Every directory from ``/`` down to a path, each opened from its parent without following a link.

    ``fds[i]`` is the directory named by the first ``i`` components (``fds[0]`` is ``/``);
    ``created_from`` is the index of the first directory this walk created (None: all existed).
    Close it (or use ``with``) to release the fds.
    """

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.names: tuple[str, ...] = ()
        self.created_from: int | None = None

    @property
    def fd(self) -> int:
        return self.fds[-1]

    def path(self, index: int | None = None) -> str:
        """The path of ``fds[index]`` (default: the last)."""
        n = len(self.fds) - 1 if index is None else index
        return "/" + "/".join(self.names[:n])

    def close(self) -> None:
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop())

    def __enter__(self) -> DirChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def walk(path: str, *, create_mode: int | None = None) -> DirChain:
    """Open every directory of the absolute ``path`` from ``/``, refusing links (:class:`UnsafePath`).

    With ``create_mode``, missing directories are created (``mkdirat``, that mode); without it a
    missing one raises ``FileNotFoundError``.
    """
    chain = DirChain()
    chain.names = components(path)
    try:
        chain.fds.append(os.open("/", DIR_FLAGS))
        for i, name in enumerate(chain.names):
            parent = chain.fds[-1]
            try:
                fd = open_dir(name, dir_fd=parent, dir_path=chain.path(i))
            except FileNotFoundError:
                if create_mode is None:
                    raise
                with contextlib.suppress(FileExistsError):  # someone else made it: use theirs, checked
                    os.mkdir(name, create_mode, dir_fd=parent)
                    if chain.created_from is None:
                        chain.created_from = i + 1
                fd = open_dir(name, dir_fd=parent, dir_path=chain.path(i))
            chain.fds.append(fd)
    except BaseException:
        chain.close()
        raise
    return chain


def first_missing(path: str) -> str | None:
    """The shortest prefix of ``path`` that does not exist (None if it all does); links refused."""
    names = components(path)
    with contextlib.ExitStack() as stack:
        fd = os.open("/", DIR_FLAGS)
        stack.callback(os.close, fd)
        for i, name in enumerate(names):
            shown = "/" + "/".join(names[:i])
            try:
                fd = open_dir(name, dir_fd=fd, dir_path=shown)
            except FileNotFoundError:
                return "/" + "/".join(names[: i + 1])
            stack.callback(os.close, fd)
    return None


# -- a datastore's lay-out ----------------------------------------------------------------------------

STORE_DIR_MODE = 0o750  # a store directory, its parents made on the way, and ``.chunks``
STORE_LOCK_MODE = 0o660  # ``.lock``: the proxy's user opens it read-write


def lay_out_store(
    store_fd: int,
    path: str,
    *,
    owner: tuple[int, int] | None = None,
    fresh: bool = False,
    made: list[str] | None = None,
) -> None:
    """Make ``.chunks`` and ``.lock`` in the open store directory ``store_fd`` (``path`` names it).

    ``fresh`` (a create): both must be new -- ``mkdirat`` and ``O_CREAT|O_EXCL``, so anything
    already there (a planted link too) is a ``FileExistsError``.  Without it what exists is reused
    once it checks out (a directory; a regular file with one link).  Each name made is appended to
    ``made`` as soon as it exists, so an undo knows it even when a later step fails.  With
    ``owner`` (uid, gid) both and then the store directory are handed over by fd (``fchown``), the
    directory last: its owner cannot touch the lay-out before it is complete.

    >>> with walk("/tmp/demo0001", create_mode=STORE_DIR_MODE) as chain:
    ...     lay_out_store(chain.fd, "/tmp/demo0001")
    """
    try:
        os.mkdir(".chunks", STORE_DIR_MODE, dir_fd=store_fd)
    except FileExistsError:
        if fresh:
            raise
    else:
        if made is not None:
            made.append(".chunks")
    chunks = open_dir(".chunks", dir_fd=store_fd, dir_path=path)
    try:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if fresh else 0)
        lock = open_file(".lock", flags, STORE_LOCK_MODE, dir_fd=store_fd, dir_path=path)
        if fresh and made is not None:
            made.append(".lock")
        try:
            if owner is not None:
                for fd in (lock, chunks, store_fd):
                    os.fchown(fd, *owner)
        finally:
            os.close(lock)
    finally:
        os.close(chunks)


def make_store(path: str, *, owner: tuple[int, int] | None = None) -> None:
    """The whole lay-out of a datastore at the absolute ``path``, reusing what an earlier run made.

    Missing directories are made (``STORE_DIR_MODE``) on a walk from ``/`` that follows no link;
    then :func:`lay_out_store`.  Demo stores, tests and benchmarks use this; a create journals what
    it makes and so walks itself.

    >>> make_store("/tmp/x/datastores/store1")
    """
    with walk(path, create_mode=STORE_DIR_MODE) as chain:
        lay_out_store(chain.fd, path, owner=owner)
