"""Reading and (manager-only) writing of ``datastore.cfg`` on disk (docs/design.md §3.1).

Reading: the digest is SHA-256 of the raw bytes, lowercase hex; a missing file is an empty config.

Writing is one locked read-modify-write, :func:`update_config`:

1. take the exclusive ``flock`` on ``.datastore.lck`` (created 0660 if missing; timeout 10 s, polled
   with ``LOCK_NB`` so no signal or thread is needed; :class:`LockError` names the lock file);
2. read and parse the file *under the lock* -- a file that does not parse is never overwritten: the
   :class:`ParseError` goes back to the caller, so an admin's broken hand edit survives until fixed;
3. compare the client's digest, if it sent one (:class:`DigestMismatch`);
4. let the caller mutate the parsed config, render it canonically (every value through the
   parser's own checkers), then **parse the exact bytes about to be written** and compare them with
   the config they were rendered from: bytes that do not parse, or parse to anything else, are
   refused (:class:`PropertyError`, a 400 naming the field) and never reach the disk (the extra
   parse costs ~4 ms at 1,000 stores, a fraction of a write's fsyncs);
5. write a temp file in the same directory, ``fchmod`` 0640, ``fsync``, ``rename`` over the old file,
   ``fsync`` the directory -- a crash anywhere leaves the old file or the new one, never a mix;
6. **then** bump the generation (publish after write), still under the lock, so a reader that sees
   the new generation is guaranteed to read the new file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

from ..fsutil import UnsafePath, create_temp, write_all
from ..ipc import flock
from . import record as file_record
from .errors import DigestMismatch, LockError, ParseError, PropertyError, WriteError
from .record import FileRecord, Stamp
from .section import SectionConfig, parse, render

LOCK_TIMEOUT = 10.0
CONFIG_MODE = 0o640
LOCK_MODE = 0o660


class Replaced(NamedTuple):
    """What :func:`replace_file` wrote: the new file's stamp, and whether its record was set."""

    stamp: Stamp
    recorded: bool


def digest(data: bytes) -> str:
    """SHA-256 of the raw file bytes, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def read_raw(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes; a missing file reads as empty."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def read_config(path: str | os.PathLike[str]) -> tuple[SectionConfig, str]:
    """Read, hash and parse ``path``; return ``(config, digest)``.  Raises ``ParseError``."""
    data = read_raw(path)
    return parse(data, filename=str(path)), digest(data)


@contextlib.contextmanager
def config_lock(lock_path: str | os.PathLike[str], timeout: float = LOCK_TIMEOUT) -> Iterator[int]:
    """Hold the exclusive ``flock`` on ``lock_path`` (``.datastore.lck``) for the ``with`` block.

    The kernel drops the lock when the holder dies, so a killed writer never wedges anyone.  The
    file is opened without following a link and must be a plain file owned by root, this process's
    user or the config dir's owner (:mod:`dsproxy.fsutil`); anything else is a :class:`LockError`.
    """
    try:
        owners = _trusted_owners(os.path.dirname(os.fspath(lock_path)) or ".")
        with flock.exclusive(lock_path, timeout, LOCK_MODE, owners=owners) as fd:
            yield fd
    except flock.LockTimeout as err:
        raise LockError(err.path, f"timed out after {timeout:g} s") from None
    except UnsafePath as err:
        raise LockError(os.fspath(lock_path), f"refusing the lock file: {err}") from None
    except OSError as err:
        if err.filename is None:
            raise
        raise LockError(os.fspath(lock_path), f"cannot open lock file: {err.strerror}") from None


def _trusted_owners(directory: str) -> set[int]:
    owners = {0, os.geteuid()}
    with contextlib.suppress(OSError):
        owners.add(os.stat(directory).st_uid)
    return owners


def replace_file(
    path: str | os.PathLike[str],
    data: bytes | list[bytes],
    mode: int = CONFIG_MODE,
    group: int | None = None,
    *,
    sync: bool = True,
    record: FileRecord | None = None,
) -> Replaced:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, rename, directory fsync);
    ``data`` may be a list of buffers, written in order (:func:`dsproxy.fsutil.write_all`).
    ``sync=False`` leaves out both fsyncs (still temp file + rename: a reader never sees a torn
    file); only for a file whose durable copy is elsewhere (fleet mode's mirror of etcd: see
    :meth:`dsproxy.daemon.writer.ConfigWriter.sync_mirror`).

    Every step works from one fd of the directory: the temp file is new (``O_EXCL|O_NOFOLLOW``,
    an unpredictable name), its mode and group are set on its fd, and the rename and the fsync
    are of that same directory even if its path is swapped meanwhile.

    ``record`` (the manager's writes of ``datastore.cfg``) is set on the temp file before the
    rename (:mod:`dsproxy.config.record`), so the file never exists without it; its ``new`` stamp
    is filled in here.  Returns the new file's stamp, ``(inode, size, mtime ns)``, from the temp
    file's fd once it is written, and whether the record was set (a file system without user
    xattrs takes none).
    """
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."
    name = os.path.basename(target)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise WriteError(f'writing "{target}" failed: cannot open its directory: {err.strerror}') from None
    try:
        return _replace_in(dir_fd, name, data, mode, group, target, sync, record)
    finally:
        os.close(dir_fd)


def _replace_in(
    dir_fd: int,
    name: str,
    data: bytes | list[bytes],
    mode: int,
    group: int | None,
    target: str,
    sync: bool = True,
    record: FileRecord | None = None,
) -> Replaced:
    try:
        fd, tmp = create_temp(dir_fd, f".{name}.tmp", 0o600)
    except OSError as err:
        raise WriteError(f'writing "{target}" failed: cannot create temp file: {err.strerror}') from None
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
            if group is not None:
                os.fchown(fd, -1, group)
            stamp = file_record.stamp_of(os.fstat(fd))  # (the record and fsync leave it as it is)
            if record is not None:
                record = record._replace(new=stamp)
            recorded = record is not None and file_record.write(fd, record, target)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise WriteError(f'writing "{target}" failed: {err.strerror or err}') from None
    replaced = Replaced(stamp, recorded)
    if not sync:
        return replaced
    try:
        os.fsync(dir_fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EROFS):
            raise WriteError(f'writing "{target}" failed: fsync of directory: {err.strerror}') from None
    return replaced


def update_config(
    path: str | os.PathLike[str],
    mutate: Callable[[SectionConfig], object],
    *,
    expected_digest: str | None = None,
    lock_path: str | os.PathLike[str] | None = None,
    bump: Callable[[], int | None] | None = None,
    timeout: float = LOCK_TIMEOUT,
    group: int | None = None,
) -> tuple[SectionConfig, str, int | None]:
    """Locked read-modify-write of ``datastore.cfg``; see the module docstring for the steps.

    ``mutate`` gets the current config (a private copy) and changes it in place (its return value
    is ignored); it may raise any ``ConfigError`` to abort without writing.
    ``bump`` publishes the write (the shared generation) and returns the new generation.

    Returns ``(new_config, new_digest, generation)``; ``new_config`` is the config parsed back
    from the bytes that were written (:func:`verified_bytes`), so it is exactly what the file says.
    """
    path = os.fspath(path)
    if lock_path is None:
        lock_path = os.path.join(os.path.dirname(path) or ".", ".datastore.lck")
    with config_lock(lock_path, timeout):
        current, current_digest = read_config(path)
        if expected_digest is not None and expected_digest != current_digest:
            raise DigestMismatch()
        working = SectionConfig((name, dict(props)) for name, props in current.items())
        mutate(working)
        data, written = verified_bytes(working, str(path))
        replace_file(path, data, group=group)
        generation = bump() if bump is not None else None
        return written, digest(data), generation


def reparse(text: str, filename: str, key_at: Callable[[int], str]) -> tuple[bytes, SectionConfig]:
    """``text`` as the bytes to write and the config they parse to; :class:`PropertyError` (naming
    ``key_at(line)`` of the first bad line) when they would not parse back."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # the checkers refuse surrogates; this is the last line of defence
        raise PropertyError("value", "not representable in UTF-8") from None
    try:
        return data, parse(data, filename)
    except ParseError as err:
        line, reason = err.errors[0]
        raise PropertyError(key_at(line), f"the value would not parse back: {reason}") from None


def verified_bytes(config: SectionConfig, filename: str = "datastore.cfg") -> tuple[bytes, SectionConfig]:
    """The file bytes for ``config``, and the config they parse to -- which is checked to be
    ``config`` (typed).  Raises :class:`PropertyError` naming the first key that would not read
    back as intended (a value the checkers let through but the file cannot hold)."""
    text, typed = render(config, filename)
    data, again = reparse(text, filename, lambda line: _key_at(text, line))
    if again != typed or list(again) != list(typed):
        raise PropertyError(_first_difference(typed, again), "the value would not read back as written")
    return data, again


def _key_at(text: str, line: int) -> str:
    """The key of property line ``line`` (1-based) of rendered text, or ``name`` for a header."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return "name"
    entry = lines[line - 1]
    if entry[:1].isspace():
        return entry.split(None, 1)[0] if entry.strip() else "name"
    return "name"


def _first_difference(wanted: SectionConfig, got: SectionConfig) -> str:
    for name, props in wanted.items():
        other = got.get(name)
        if other is None:
            return "name"
        for key in sorted(set(props) | set(other)):
            if props.get(key) != other.get(key):
                return key
    return "name"
