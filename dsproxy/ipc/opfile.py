"""File-based active-operation counters: the PBS 3.2 mechanism, kept for baselines and degraded mode.

``cache=off`` and ``cache=config`` (docs/design.md §5.2) reproduce PBS's ``task_tracking.rs``, and a process
without shared memory (degraded) falls back to it, so the totals stay correct in every mode:

* ``<run_dir>/active-operations/<store>``: a compact JSON array, one entry per process,
  ``[{"pid":1,"starttime":2,"active_operations":{"read":0,"write":1}}]``;
* ``<run_dir>/active-operations/<store>.lock``: ``flock``-ed (10 s) for every update;
* an update reads the file, drops entries of dead processes (and of an earlier process with this
  pid), applies the delta to this process's entry (adding it if missing -- PBS 3.2's "only if the
  list is empty" quirk is not reproduced), and replaces the file (temp file + rename, no fsync:
  the directory is on tmpfs and dies with a reboot anyway).

The run dir is group-writable under systemd, so everything is opened from one fd of
``active-operations`` taken with ``O_NOFOLLOW`` (the directory itself may have been swapped for a
link), files with ``O_NOFOLLOW|O_NONBLOCK`` and checked to be regular and at most
:data:`MAX_FILE_SIZE`, and the temp file is new (``O_EXCL``, an unpredictable name) -- see
:mod:`dsproxy.fsutil`.  A planted link or FIFO is an :class:`OpFileError`, never followed.

Totals are summed over entries whose ``(pid, starttime)`` is alive; a killed process's operations
vanish without anyone having to clean up.
"""

from __future__ import annotations

import contextlib
import json
import os

from ..fsutil import open_dir, open_file, read_capped, replace_in
from . import flock
from .proc import is_alive, start_time

LOCK_TIMEOUT = 10.0
#: a counter file holds one short entry per live process; anything larger was not written by dsproxy
MAX_FILE_SIZE = 1 << 20


class OpFileError(Exception):
    """The counter file could not be locked, read or written."""


def _self_identity() -> tuple[int, int]:
    pid = os.getpid()
    start = start_time(pid)
    return pid, start if start is not None else 0


class FileCounters:
    """Per-store JSON counter files under ``<run_dir>/active-operations``."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.directory = os.path.join(os.fspath(run_dir), "active-operations")
        self._identity: tuple[int, int] | None = None

    def _open_dir(self, create: bool) -> int:
        if create:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
        return open_dir(self.directory)

    def _read(self, name: str) -> list[dict[str, object]]:
        """The entries of ``name``'s counter file (``[]`` if missing); ``OpFileError`` if unreadable."""
        try:
            dir_fd = self._open_dir(create=False)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise OpFileError(f'unable to read "{self.directory}" - {err}') from None
        try:
            return self._read_at(dir_fd, name)
        finally:
            os.close(dir_fd)

    def _read_at(self, dir_fd: int, name: str) -> list[dict[str, object]]:
        shown = os.path.join(self.directory, name)
        try:
            fd = open_file(name, os.O_RDONLY, dir_fd=dir_fd, dir_path=self.directory)
            try:
                data = json.loads(read_capped(fd, MAX_FILE_SIZE, shown) or b"[]")
            finally:
                os.close(fd)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            raise OpFileError(f'unable to read "{shown}" - {err}') from None
        return data if isinstance(data, list) else []

    def update(self, name: str, op: int, delta: int) -> tuple[int, int]:
        """Add ``delta`` to this process's READ (``op`` 0) or WRITE (1) count; return its (read, write).

        ``op`` 2 (LOOKUP) changes nothing but still rewrites the file, as PBS does.
        """
        pid, start = _self_identity()
        try:
            dir_fd = self._open_dir(create=True)
            try:
                with flock.exclusive(f"{name}.lock", LOCK_TIMEOUT, dir_fd=dir_fd, replace_unsafe=True):
                    return self._update_locked(dir_fd, name, op, delta, pid, start)
            finally:
                os.close(dir_fd)
        except flock.LockTimeout as err:
            raise OpFileError(str(err)) from None
        except OSError as err:
            raise OpFileError(f'unable to update active operations of "{name}" - {err}') from None

    def _update_locked(self, dir_fd: int, name: str, op: int, delta: int, pid: int, start: int) -> tuple[int, int]:
        entries = self._read_at(dir_fd, name)
        kept: list[dict[str, object]] = []
        own: dict[str, int] = {"read": 0, "write": 0}
        for entry in entries:
            epid, estart = entry.get("pid"), entry.get("starttime")
            if not isinstance(epid, int) or not isinstance(estart, int):
                continue
            if epid == pid:
                if estart == start:
                    ops = entry.get("active_operations")
                    if isinstance(ops, dict):
                        own = {"read": int(ops.get("read", 0)), "write": int(ops.get("write", 0))}
                continue
            if is_alive(epid, estart):
                kept.append(entry)
        if op == 0:
            own["read"] = max(0, own["read"] + delta)
        elif op == 1:
            own["write"] = max(0, own["write"] + delta)
        if own["read"] or own["write"] or op == 2:
            kept.append({"pid": pid, "starttime": start, "active_operations": own})
        replace_in(dir_fd, name, json.dumps(kept, separators=(",", ":")).encode(), 0o640)
        return own["read"], own["write"]

    def own(self, name: str) -> tuple[int, int]:
        """This process's ``(read, write)`` as recorded in the file (no lock)."""
        pid, start = _self_identity()
        with contextlib.suppress(OpFileError):
            for entry in self._read(name):
                ops = entry.get("active_operations")
                if entry.get("pid") == pid and entry.get("starttime") == start and isinstance(ops, dict):
                    return int(ops.get("read", 0)), int(ops.get("write", 0))
        return 0, 0

    def totals(self, name: str) -> tuple[int, int]:
        """``(read, write)`` over live processes (no lock, like PBS's ``get_active_operations``)."""
        read = write = 0
        with contextlib.suppress(OpFileError):
            for entry in self._read(name):
                epid, estart, ops = entry.get("pid"), entry.get("starttime"), entry.get("active_operations")
                if not (isinstance(epid, int) and isinstance(estart, int) and isinstance(ops, dict)):
                    continue
                if is_alive(epid, estart):
                    read += int(ops.get("read", 0))
                    write += int(ops.get("write", 0))
        return read, write
