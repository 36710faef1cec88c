"""The create journal: store lay-outs the manager began and has not finished (issue 8, deliverable 8).

A create lays the store out (``<path>``, ``.chunks``, ``.lock``) *before* the config names it (see
:mod:`dsproxy.daemon.writer`), so a manager killed in between leaves directories no section names,
and a second create of that name is then refused ("not empty").  The manager therefore writes down
what it is about to create before it creates anything, and on start removes what an interrupted
create left -- but only what it wrote down, and only what is still empty.

Why a journal in the config dir and not a marker file in the new store:

* the config dir is root-only under systemd (``/etc/dsproxy`` 0750 root), while a store and its
  parent are the store owner's: a marker there could be planted by that user in any empty
  directory they can write, or removed to keep a half-made store; an entry in the journal can
  only be the manager's (the file is opened ``O_NOFOLLOW`` and must be owned by the manager's
  user, :mod:`dsproxy.fsutil`);
* it names the exact path, so nothing has to scan the data dir, and stores outside it are covered.

What is recorded, *before* the first ``mkdir``: the name, the store path, and ``top`` -- the
first directory of the path that does not exist yet (None when the store directory exists: an
admin's empty mount point, which must stay).  The entry is fsynced, so it is on disk before any
directory it names.  Format: ``<config_dir>/.datastore.creating``, one JSON object a line,
``{"begin": ID, "name": ..., "path": ..., "top": ...}`` and ``{"end": ID}``; a torn last line
(a crash while appending) is ignored.  When no create is open the file is removed, so normally
it does not exist.

Clean-up on start (:meth:`dsproxy.daemon.writer.ConfigWriter.recover_interrupted_creates`), under
the config lock: an entry whose path a section names finished (the crash came after the rename) and
is dropped; otherwise ``.lock`` (if a plain empty file), ``.chunks`` (if empty) and, with ``top``,
the store directory and the created parents up to ``top`` are removed with ``unlinkat``/``rmdir``
from directory fds opened without following links.  ``rmdir`` removes only empty directories, so
even if the store owner filled or swapped the directory after the crash, at most an empty
directory at a path the manager itself was creating goes; anything with data stays, logged.
While ``datastore.cfg`` does not parse nothing is decided and the journal is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

from ..config import replace_file
from ..fsutil import open_file, read_capped, write_all

JOURNAL_NAME = ".datastore.creating"
#: a journal holds a few open creates; anything larger was not written by the manager
MAX_SIZE = 1 << 20


@dataclass(frozen=True)
class PendingCreate:
    id: str
    name: str
    path: str
    top: str | None


class CreateJournal:
    """The journal of one config dir.  Used only from the manager's writer thread."""

    def __init__(self, config_dir: str | os.PathLike[str]) -> None:
        self.path = os.path.join(os.fspath(config_dir), JOURNAL_NAME)
        self._open: set[str] = set()  # ids begun (or loaded and kept) and not ended

    def begin(self, name: str, path: str, top: str | None) -> str:
        """Record (durably) that a lay-out of ``path`` starts; returns the id for :meth:`end`."""
        entry_id = os.urandom(8).hex()
        self._append({"begin": entry_id, "name": name, "path": path, "top": top}, sync=True)
        self._open.add(entry_id)
        return entry_id

    def end(self, entry_id: str) -> None:
        """The create finished (the config names the store) or was undone."""
        self._open.discard(entry_id)
        if self._open:
            self._append({"end": entry_id}, sync=False)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def pending(self) -> list[PendingCreate]:
        """Creates begun and not ended, oldest first.  Raises ``OSError`` (``UnsafePath``) if unreadable."""
        try:
            fd = open_file(self.path, os.O_RDONLY, owners={os.geteuid()})
        except FileNotFoundError:
            return []
        try:
            data = read_capped(fd, MAX_SIZE, self.path)
        finally:
            os.close(fd)
        begun: dict[str, PendingCreate] = {}
        for line in data.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if not isinstance(record, dict):
                continue
            if isinstance(record.get("end"), str):
                begun.pop(record["end"], None)
            entry = _entry(record)
            if entry is not None:
                begun[entry.id] = entry
        return list(begun.values())

    def keep(self, entries: list[PendingCreate]) -> None:
        """Replace the journal with ``entries`` (those a clean-up could not decide yet)."""
        self._open = {e.id for e in entries}
        if not entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        lines = "".join(
            json.dumps({"begin": e.id, "name": e.name, "path": e.path, "top": e.top}) + "\n" for e in entries
        )
        replace_file(self.path, lines.encode(), mode=0o600)

    def _append(self, record: dict[str, object], sync: bool) -> None:
        fd = open_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600, owners={os.geteuid()})
        try:
            write_all(fd, (json.dumps(record) + "\n").encode())
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)


def _entry(record: dict[str, object]) -> PendingCreate | None:
    entry_id, name, path, top = record.get("begin"), record.get("name"), record.get("path"), record.get("top")
    if not (isinstance(entry_id, str) and isinstance(name, str) and isinstance(path, str)):
        return None
    if not path.startswith("/") or not (top is None or isinstance(top, str)):
        return None
    return PendingCreate(entry_id, name, path, top)
