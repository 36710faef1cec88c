"""The file record: how a ``datastore.cfg`` the manager wrote differs from the one it replaced,
kept *with the file*, as an extended attribute (docs/shared-memory.md, "The file record").

A worker applying a write would otherwise read the whole file and compare it with the one it
parsed: at 100,000 stores a 14 MB read and ``memcmp`` (~2 ms of a ~3 ms apply) for a change of
a hundred bytes.  With the record it reads only the bytes in between (``pread``) and patches its
copy (:meth:`dsproxy.registry.Registry._patch`).  What it says, set on the temp file before the
rename (:func:`dsproxy.config.file.replace_file`):

* ``token`` -- 16 random bytes naming this file: what a worker that reads it remembers.  A stamp
  (inode, size, mtime) alone does not tell files apart where timestamps are coarse (ext2/3, NFS,
  kernels before multigrain timestamps): an inode freed by one write and reused by the next with
  the same size within one clock tick looked like the file before;
* ``new`` -- this file's stamp once written (``fstat`` of the temp file): an edit in place keeps
  the attribute but not the mtime, so a file whose stamp is another holds what the record does
  not describe;
* ``old_token`` and ``old`` -- the token and stamp of the file it replaced (the manager's previous
  write, from its kept blocks), or none: then nobody patches from it;
* ``prefix`` and ``suffix`` -- the bytes at the start and the end both files share.

Why an xattr and not the shared memory (where it lived first): anyone in the segment's group can
write the segment, and a forged window makes a worker patch the wrong bytes and serve a config
the file does not hold.  A ``user.`` attribute of the file can be set only by someone who may
write the file -- who could write the config anyway.  Reading it is one ``fgetxattr`` on the fd
already open (~1 us).  A file system without user xattrs (or a file PBS or an editor wrote, which
has none) just has no record: the worker reads and compares the whole file, as before.

Every field is range-checked on the way in; anything else reads as "no record".
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Final, NamedTuple

from .._lazylog import LazyLogger

log = LazyLogger("dsproxy.config.record")

NAME: Final = "user.dsproxy.record"
MAGIC: Final = b"DSPR"
VERSION: Final = 1
TOKEN_BYTES: Final = 16
SIZE_LIMIT: Final = 2**40  # no datastore.cfg is a terabyte: anything above is garbage
_ZERO: Final = bytes(TOKEN_BYTES)
# magic, version, token, new stamp (inode, size, mtime ns), old token, old stamp, prefix, suffix
_FORMAT: Final = struct.Struct("<4sH2x16sQQQ16sQQQQQ")
#: errors that mean "this file system (or this file) takes no user xattr": the record is left out
_UNSUPPORTED: Final = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.ENOSPC, errno.E2BIG, errno.EACCES})

#: a file's (inode, size, mtime ns): what the worker's fstat of the file it read says
Stamp = tuple[int, int, int]


def stamp_of(st: os.stat_result) -> Stamp:
    """The stamp of a ``stat``/``fstat`` result."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class FileRecord(NamedTuple):
    """What the manager's write says of its file (see the module docs)."""

    token: bytes
    new: Stamp = (0, 0, 0)  #: this file's stamp (filled in by :func:`dsproxy.config.file.replace_file`)
    old_token: bytes | None = None  #: the replaced file's token, or None: no patch from it
    old: Stamp | None = None  #: the replaced file's stamp (with ``old_token``)
    prefix: int = 0  #: bytes at the start the two files share
    suffix: int = 0  #: bytes at the end they share (``prefix + suffix`` fits in both)

    def pack(self) -> bytes:
        old_token, old = _ZERO, (0, 0, 0)
        if self.old_token is not None and self.old is not None:
            old_token, old = self.old_token, self.old
        return _FORMAT.pack(MAGIC, VERSION, self.token, *self.new, old_token, *old, self.prefix, self.suffix)

    @classmethod
    def unpack(cls, raw: bytes) -> FileRecord | None:
        """The record in ``raw``, or None: another size, magic or version, or a field out of range."""
        if len(raw) != _FORMAT.size:
            return None
        magic, version, token, *words = _FORMAT.unpack(raw)
        new, old_token, old, (prefix, suffix) = tuple(words[0:3]), words[3], tuple(words[4:7]), words[7:9]
        if magic != MAGIC or version != VERSION or token == _ZERO or not _stamp_ok(new):
            return None
        if old_token == _ZERO:
            return cls(token, new)
        if not _stamp_ok(old) or prefix + suffix > min(new[1], old[1]):
            return None
        return cls(token, new, old_token, old, prefix, suffix)


def _stamp_ok(stamp: tuple[int, ...]) -> bool:
    return stamp[1] < SIZE_LIMIT and max(stamp) < 2**63


def new_token() -> bytes:
    """A token no other write has (random: the manager may restart between two writes)."""
    while (token := os.urandom(TOKEN_BYTES)) == _ZERO:
        pass  # (never, in practice: zero means "none" on disk)
    return token


def read(fd: int) -> FileRecord | None:
    """The record of the open file ``fd``, or None (none set, not supported, garbage)."""
    try:
        return FileRecord.unpack(os.getxattr(fd, NAME))
    except OSError:
        return None  # ENODATA (no record), ENOTSUP, ERANGE (not ours: too large)


_warned = False


def write(fd: int, record: FileRecord, path: str) -> bool:
    """Set ``record`` on the open file ``fd``; whether it was.  It is an optimisation, so no error
    fails the write: a file system that takes no user xattr is logged once (every write then has
    its workers read the whole file), any other error each time."""
    global _warned
    try:
        os.setxattr(fd, NAME, record.pack())
    except OSError as err:  # never a reason to refuse the write (EDQUOT for an xattr block, EIO)
        if err.errno not in _UNSUPPORTED:
            log.warning('cannot keep the file record with "%s": %s', path, err.strerror or err)
            return False
        if not _warned:
            _warned = True
            log.info(
                'cannot keep the file record with "%s" (%s): workers read the whole file to apply each write',
                path,
                err.strerror or err,
            )
        return False
    return True


def identity_of(path: str) -> tuple[bytes, Stamp] | None:
    """The token of the file's record and the file's stamp, if it has a record naming its stamp
    (no edit in place since the manager wrote it), else None."""
    found = identity_and_ctime_of(path)
    return None if found is None else found[0]


def identity_and_ctime_of(path: str) -> tuple[tuple[bytes, Stamp], int] | None:
    """:func:`identity_of` the file and its ctime (ns), from one open and one ``fstat``, or None
    (no record naming its stamp, a symlink, unreadable).  The ctime also moves when an edit in
    place puts the mtime back (``touch -r``, ``cp --preserve=timestamps``, ``rsync -t
    --inplace``), which keeps the stamp."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        record = read(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    stamp = stamp_of(st)
    return None if record is None or record.new != stamp else ((record.token, stamp), st.st_ctime_ns)


def identity_of_fd(fd: int) -> tuple[bytes, Stamp] | None:
    """:func:`identity_of` the open file ``fd`` (raises ``OSError`` if it cannot be stat'ed)."""
    stamp = stamp_of(os.fstat(fd))
    record = read(fd)
    return None if record is None or record.new != stamp else (record.token, stamp)
