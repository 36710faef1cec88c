"""The manager's parse of ``datastore.cfg``, left beside the file for the proxy master.

A fleet host's cold start at 100,000 stores parsed the same 14 MB twice: the manager decoded
etcd's values (it must: it validates and renders them) and wrote the file, then the proxy master
parsed that file again before it forked its workers (:func:`dsproxy.registry.preload`), ~0.45 s
of a core idle and 0.6-0.8 s beside the rest of the start (py-spy of a cold start, 2026-12-04).
The manager still holds that parse once the file is written, so it leaves it here: its
``marshal`` form, keyed by the SHA-256 of the file's bytes, which the master checks against the
bytes it read before it takes the parse instead of parsing.

Measured at 100,000 stores (14.3 MB of bench-fleet's sections, this machine): ``parse`` 0.45 s,
``marshal.loads`` of its output 0.09 s (``pickle`` the same, ``json`` 0.12 s; ``marshal.dumps``
0.03 s, 11 MB).  ``marshal`` and not ``pickle``: loading it runs no code.

Trust: the file is written like ``datastore.cfg`` (temp file + rename in the config dir, its mode)
and read only if it is a regular file owned by the config file's owner, not writable by others,
within :func:`_bound` of the file's size, starting with :data:`MAGIC` and the digest of the exact
bytes the reader holds: as trusted as ``datastore.cfg`` itself, which only that owner can write.
Its shape is checked (a dict of store name -> dict of properties); the values themselves are the
manager's parse of those very bytes.  Anything else reads as "no parse" and the master parses
the file, as it did before; a stale parse (the file changed since) is never taken, and the next
first write replaces it.  The manager leaves one only after the first write of a start (a fleet
host's first mirror): every later whole write would pay the dump and 11 MB of I/O per write.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import stat
from typing import Final

from .file import replace_file
from .section import SectionConfig

#: the file's name, in the config dir beside ``datastore.cfg``
NAME: Final = ".datastore.cfg.parsed"
MAGIC: Final = b"dsproxy parsed datastore.cfg v1\n"
_DIGEST_BYTES: Final = 32
_MARSHAL_VERSION: Final = 4  # (shared objects written once: the parser's interned values)


def path_beside(config_file: str | os.PathLike[str]) -> str:
    return os.path.join(os.path.dirname(os.fspath(config_file)), NAME)


def save(config_file: str | os.PathLike[str], file_digest: str, config: SectionConfig) -> None:
    """Leave ``config`` (the parse of the file whose SHA-256 is ``file_digest``) beside
    ``config_file``.  No fsync: a parse lost in a crash is only parsed again."""
    body = marshal.dumps((dict(config), config.duplicates), _MARSHAL_VERSION)
    replace_file(path_beside(config_file), [MAGIC, bytes.fromhex(file_digest), body], sync=False)


def remove(config_file: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path_beside(config_file))


def load(config_file: str | os.PathLike[str], file_digest: str, file_size: int) -> SectionConfig | None:
    """The parse left beside ``config_file`` for the file whose bytes hash to ``file_digest``
    (``file_size`` bytes), or None (see the module: missing, stale, not the owner's, malformed)."""
    try:
        owner = os.stat(config_file).st_uid
        fd = os.open(path_beside(config_file), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_mode & stat.S_IWOTH:
            return None
        if st.st_size > _bound(file_size):
            return None
        head = len(MAGIC) + _DIGEST_BYTES
        raw = os.pread(fd, st.st_size + 1, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) != st.st_size or raw[: len(MAGIC)] != MAGIC or raw[len(MAGIC) : head] != bytes.fromhex(file_digest):
        return None
    try:
        sections, duplicates = marshal.loads(memoryview(raw)[head:])
    except (ValueError, EOFError, TypeError):
        return None
    if type(sections) is not dict or type(duplicates) is not int:
        return None
    if not all(type(name) is str and type(props) is dict for name, props in sections.items()):
        return None
    config = SectionConfig(sections)
    config.duplicates = duplicates
    return config


def _bound(file_size: int) -> int:
    """The largest parse taken for a file of ``file_size`` bytes: the marshal form is ~0.8x the
    text (bench-fleet's sections), a section's smallest text 20 bytes in all."""
    return 4 * file_size + 64 * 1024
