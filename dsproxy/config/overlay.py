"""The mirror's overlay: fleet mode's recent changes beside ``datastore.cfg``, not yet in it.

At 100,000 stores a fleet host rewrote its 14 MB ``datastore.cfg`` for every watch batch: a write
and rename of that size is 20-27 ms of this machine (measured 2026-12-03 with a bare
``os.write`` + ``rename`` loop), and three hosts on two cores doing that per write was most of
bench-fleet's served-everywhere p50 (46 ms against etcd's put->watch p99 of 6 ms).  In fleet mode
the file is a mirror (etcd is the durable copy: :meth:`dsproxy.daemon.writer.ConfigWriter.sync_mirror`),
so a batch may reach the workers first through a small file and the mirror file later:

* the manager writes the stores a batch changed -- each one's canonical section text, or
  ``null`` once removed -- into the overlay (temp file + rename, beside ``datastore.cfg`` in the
  config dir: as trusted as the file), cumulative since the file it is *based on*, before it
  bumps the generation, as it would write the file;
* a worker serves the file's config with the overlay's stores on top, when the overlay is based on
  the file it read (the token and stamp of the file's record: :mod:`dsproxy.config.record`) or
  that file has no record of the manager at all (a hand edit: its editor read the file without
  the overlay's stores, so the overlay still holds what the edit left out; the manager restores
  the mirror whole in fleet mode anyway);
* once no batch came for a second (or the overlay holds :data:`MAX_STORES` stores or
  :data:`MAX_BYTES`, or is :data:`MAX_AGE` s old) the manager writes the file whole, as before,
  and an empty overlay based on it; a hand edit, a re-list or a fence also write the file whole.

The digest a client sees (PBS's ``digest``: SHA-256 of the file) cannot be the file's while the
overlay adds to it, and hashing 14 MB per batch was what this avoids.  With an overlay it is
:func:`digest_of`: SHA-256 of the digest it continues (the file's, or the one before the last
flush) and the overlay's stores -- the same on the manager, which validates a write's digest,
and on every worker.  A flush carries the digest on, so writing the file does not change what a
client holds.

Every field is checked on the way in (types, sizes, names); anything else reads as "no overlay":
the worker then serves the file alone, which is never newer than what it should serve, and the
manager's next whole write brings it up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Final

from .record import TOKEN_BYTES, Stamp

#: the overlay's file name, in the config dir beside ``datastore.cfg``
NAME: Final = ".datastore.cfg.overlay"
#: a batch that would take the overlay past either bound (stores; bytes of the file as written,
#: which a reader refuses above) writes the file whole instead
MAX_STORES: Final = 256
MAX_BYTES: Final = 256 * 1024
#: the file is written whole once no batch came for this long (s) ...
FLUSH_IDLE: Final = 1.0
#: ... or once the overlay is this old (s), however busy
MAX_AGE: Final = 10.0
_VERSION: Final = 1
_NAME_MAX: Final = 256  # longer than any store name the schema takes
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Overlay:
    """The stores changed since the file ``base`` names (its record's token and its stamp)."""

    token: bytes
    stamp: Stamp
    #: the digest this one continues: the file's before the first flush (None: hash the file)
    carried: str | None = None
    #: store name -> its section's canonical text, or None once removed
    stores: dict[str, str | None] = field(default_factory=dict)

    def digest(self, file_digest: str | None) -> str:
        """What a client sees as the config's digest (see the module)."""
        start = self.carried if self.carried is not None else file_digest
        if not self.stores:
            return start or ""
        h = hashlib.sha256((start or "").encode())
        h.update(json.dumps(self.stores, sort_keys=True, separators=(",", ":")).encode())
        return h.hexdigest()

    def dump(self) -> bytes:
        return json.dumps(
            {
                "version": _VERSION,
                "base": [self.token.hex(), *self.stamp],
                "carried": self.carried,
                "stores": self.stores,
            },
            separators=(",", ":"),
        ).encode()

    def applies_to(self, identity: tuple[bytes, Stamp] | None) -> bool:
        """Whether a worker that read the file of ``identity`` serves this overlay on top of it:
        the file it is based on, or a file without the manager's record (a hand edit)."""
        return identity is None or identity == (self.token, self.stamp)


def fresh_digest(token: bytes) -> str:
    """The digest an empty overlay based on a file with a new change carries (no hash of the file)."""
    return hashlib.sha256(b"dsproxy overlay\0" + token).hexdigest()


def path_in(config_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(config_dir), NAME)


def read(path: str, owner: int | None = None) -> Overlay | None:
    """The overlay at ``path``, or None: missing, not a regular file, a link, larger than a
    manager writes, not owned by ``owner`` (the config file's owner) or writable by anyone else
    (group or others: the manager writes it 0640), or
    anything in it that is not what :meth:`Overlay.dump` writes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        if owner is not None and st.st_uid != owner:
            return None
        raw = os.read(fd, st.st_size + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return _decode(json.loads(raw))
    except (ValueError, TypeError, UnicodeError, RecursionError):  # (a lone surrogate; [[[[...)
        return None


def read_beside(config_file: str | os.PathLike[str]) -> Overlay | None:
    """The overlay beside ``config_file``, owned by that file's owner (:func:`read`), or None
    (also when the file itself cannot be looked at)."""
    try:
        owner = os.stat(config_file).st_uid
    except OSError:
        return None
    return read(path_in(os.path.dirname(os.fspath(config_file))), owner)


def _decode(data: Any) -> Overlay | None:
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        return None
    base, carried, stores = data.get("base"), data.get("carried"), data.get("stores")
    if not isinstance(base, list) or len(base) != 4 or not isinstance(base[0], str):
        return None
    token = bytes.fromhex(base[0])
    stamp = tuple(base[1:])
    if len(token) != TOKEN_BYTES or not all(isinstance(w, int) and 0 <= w < 2**63 for w in stamp):
        return None
    if carried is not None and not (isinstance(carried, str) and _HEX64.fullmatch(carried)):
        return None
    if not isinstance(stores, dict) or len(stores) > MAX_STORES:
        return None
    for name, text in stores.items():
        if not 0 < len(name) <= _NAME_MAX or not (text is None or isinstance(text, str)):
            return None
        name.encode()  # (UnicodeEncodeError for a lone surrogate: no text of the manager's has one)
        if text is not None:
            text.encode()
    return Overlay(token, (stamp[0], stamp[1], stamp[2]), carried, stores)


def served(config_file: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """What a worker serves of ``config_file`` and the overlay beside it: the file parsed, with
    the overlay's stores on top when it applies to the file (raises ``ParseError`` like
    :func:`dsproxy.config.parse`; a missing file reads as empty).  For tools and tests; the
    registry keeps its own parses.

    The overlay is read first, as a worker reads it: a flush between the two reads leaves a file
    that holds the overlay's stores (and the overlay read, based on the file before, does not
    apply to it); the file's bytes and its identity come from one open."""
    return served_with_digest(config_file)[0]


def served_with_digest(config_file: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], str, bool]:
    """:func:`served`, the digest a client sees of it (the overlay's when one applies, else the
    file's SHA-256) and whether an overlay with stores applied."""
    from .file import digest as file_digest
    from .record import identity_of_fd
    from .section import parse

    path = os.fspath(config_file)
    overlay = read_beside(path)
    try:
        with open(path, "rb") as f:
            identity = identity_of_fd(f.fileno())
            data = f.read()
    except FileNotFoundError:
        data, identity = b"", None
    config: dict[str, dict[str, Any]] = dict(parse(data, filename=path))
    whole = file_digest(data)
    if overlay is None or not overlay.applies_to(identity):
        return config, whole, False
    where = path_in(os.path.dirname(path))
    for name, text in overlay.stores.items():
        section = None if text is None else store_section(name, text, where)
        if isinstance(section, str):
            continue  # (a worker leaves it out too)
        if section is None:
            config.pop(name, None)
        else:
            config[name] = section
    return config, overlay.digest(whole), bool(overlay.stores)


def store_section(name: str, text: str, filename: str) -> dict[str, Any] | str:
    """Store ``name``'s section from its overlay ``text``, or why it is not served: a text that
    does not parse, or parses to anything but exactly that store's section."""
    from .errors import ParseError
    from .section import parse

    try:
        cfg = parse(text.encode(), filename=filename)
    except ParseError as err:
        return str(err)
    if list(cfg) != [name]:
        return f"the text of datastore '{name}' holds {list(cfg)}"
    return cfg[name]
