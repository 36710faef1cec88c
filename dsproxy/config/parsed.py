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
and read only if it is a regular file owned by the config file's owner, writable by nobody else
(group or others), within :func:`_bound` of the file's size, starting with :data:`MAGIC`, the
fingerprint of the code that parses (:func:`fingerprint`: the Python version and the parser's and
schema's source -- an upgrade's parser may type or refuse a value differently), the digest of the
exact bytes the reader holds and the SHA-256 of its own body (a torn or corrupted file after a
crash: it is written without fsync).  It is then as trusted as ``datastore.cfg`` itself, which
only that owner can write, and its values are the manager's parse of those very bytes; only the
shape is checked (a dict of store name -> dict of properties), and the master falls back to
parsing if making the entries of what it took fails anyway (:func:`dsproxy.registry.preload`).
Anything else reads as "no parse" and the master parses the file, as it did before; a stale
parse (the file changed since) is never taken.  The manager leaves one only at start (the file
as read, or a fleet host's first mirror): every later whole write would pay the dump and 11 MB of
I/O per write; it leaves none while an overlay holds changes not in the file (its config is not
the file's), and removes an earlier start's when it cannot write its own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import marshal
import mmap
import os
import stat
import sys
from typing import Final

from .file import replace_file
from .section import SectionConfig

#: the file's name, in the config dir beside ``datastore.cfg``
NAME: Final = ".datastore.cfg.parsed"
MAGIC: Final = b"dsproxy parsed datastore.cfg v2\n"
_HASH: Final = 32  # SHA-256
_HEAD: Final = len(MAGIC) + 3 * _HASH  # MAGIC, fingerprint, the file's digest, the body's
_MARSHAL_VERSION: Final = 4  # (shared objects written once: the parser's interned values)


@functools.cache
def fingerprint() -> bytes:
    """SHA-256 of what decides a parse's values: the Python version (marshal's format) and the
    source of the parser and the schema (an upgrade may type or refuse a value differently)."""
    from . import schema, section

    h = hashlib.sha256(f"{sys.version_info[0]}.{sys.version_info[1]} marshal {_MARSHAL_VERSION}\0".encode())
    for module in (section, schema):
        with open(module.__file__ or "", "rb") as f:
            h.update(f.read())
    return h.digest()


def path_beside(config_file: str | os.PathLike[str]) -> str:
    return os.path.join(os.path.dirname(os.fspath(config_file)), NAME)


def save(config_file: str | os.PathLike[str], file_digest: str, config: SectionConfig) -> None:
    """Leave ``config`` (the parse of the file whose SHA-256 is ``file_digest``) beside
    ``config_file``.  No fsync: a parse lost in a crash is only parsed again, and a torn one is
    refused by its body's hash."""
    body = marshal.dumps((dict(config), config.duplicates), _MARSHAL_VERSION)
    head = [MAGIC, fingerprint(), bytes.fromhex(file_digest), hashlib.sha256(body).digest()]
    replace_file(path_beside(config_file), [*head, body], sync=False)


def remove(config_file: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path_beside(config_file))


def load(config_file: str | os.PathLike[str], file_digest: str, file_size: int) -> SectionConfig | None:
    """The parse left beside ``config_file`` for the file whose bytes hash to ``file_digest``
    (``file_size`` bytes), or None (see the module: missing, stale, another build's, not the
    owner's, torn, malformed)."""
    try:
        owner = os.stat(config_file).st_uid
        fd = os.open(path_beside(config_file), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        if not _HEAD < st.st_size <= _bound(file_size):
            return None
        head = os.pread(fd, _HEAD, 0)
        if head[: _HEAD - _HASH] != MAGIC + fingerprint() + bytes.fromhex(file_digest):
            return None  # (a stale parse, the common case after a write: never mapped)
        # the parse of these very bytes, mapped and not read: its pages are the page cache the
        # manager wrote at its start, where a read copied 11 MB into fresh memory at 100,000
        # stores (2,800 page faults of the proxy's start).  (A mapping dies of SIGBUS where a
        # read fails: only if its owner truncates it meanwhile, which dsproxy never does -- it
        # replaces it whole -- or on a disk error while the pages are read back.)
        mapped = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    with mapped, memoryview(mapped) as view:
        return _loaded(view, head)


def _loaded(view: memoryview, head: bytes) -> SectionConfig | None:
    """The parse in ``view`` (the whole file, whose first bytes were ``head``), or None."""
    if view[:_HEAD] != head:
        return None
    with view[_HEAD:] as body:
        if hashlib.sha256(body).digest() != view[_HEAD - _HASH : _HEAD]:
            return None
        try:
            sections, duplicates = marshal.loads(body)
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
