"""File-based active-operation counters: the PBS 3.2 mechanism, kept for baselines and degraded mode.

``cache=off`` and ``cache=config`` (DESIGN §5.2) reproduce PBS's ``task_tracking.rs``, and a process
without shared memory (degraded) falls back to it, so the totals stay correct in every mode:

* ``<run_dir>/active-operations/<store>``: a compact JSON array, one entry per process,
  ``[{"pid":1,"starttime":2,"active_operations":{"read":0,"write":1}}]``;
* ``<run_dir>/active-operations/<store>.lock``: ``flock``-ed (10 s) for every update;
* an update reads the file, drops entries of dead processes (and of an earlier process with this
  pid), applies the delta to this process's entry (adding it if missing -- PBS 3.2's "only if the
  list is empty" quirk is not reproduced), and replaces the file (temp file + rename, no fsync:
  the directory is on tmpfs and dies with a reboot anyway).

Totals are summed over entries whose ``(pid, starttime)`` is alive; a killed process's operations
vanish without anyone having to clean up.
"""

from __future__ import annotations

import contextlib
import json
import os

from . import flock
from .proc import is_alive, start_time

LOCK_TIMEOUT = 10.0


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

    def _paths(self, name: str) -> tuple[str, str]:
        return os.path.join(self.directory, name), os.path.join(self.directory, f"{name}.lock")

    def _read(self, path: str) -> list[dict[str, object]]:
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read() or b"[]")
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            raise OpFileError(f'unable to read "{path}" - {err}') from None
        return data if isinstance(data, list) else []

    def update(self, name: str, op: int, delta: int) -> tuple[int, int]:
        """Add ``delta`` to this process's READ (``op`` 0) or WRITE (1) count; return its (read, write).

        ``op`` 2 (LOOKUP) changes nothing but still rewrites the file, as PBS does.
        """
        identity = _self_identity()
        pid, start = identity
        path, lock = self._paths(name)
        try:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
            with flock.exclusive(lock, LOCK_TIMEOUT):
                entries = self._read(path)
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
                tmp = os.path.join(self.directory, f".{name}.tmp.{pid}")
                with open(tmp, "w") as f:
                    f.write(json.dumps(kept, separators=(",", ":")))
                os.replace(tmp, path)
                return own["read"], own["write"]
        except flock.LockTimeout as err:
            raise OpFileError(str(err)) from None
        except OSError as err:
            raise OpFileError(f'unable to update active operations of "{name}" - {err}') from None

    def own(self, name: str) -> tuple[int, int]:
        """This process's ``(read, write)`` as recorded in the file (no lock)."""
        pid, start = _self_identity()
        path, _ = self._paths(name)
        with contextlib.suppress(OpFileError):
            for entry in self._read(path):
                ops = entry.get("active_operations")
                if entry.get("pid") == pid and entry.get("starttime") == start and isinstance(ops, dict):
                    return int(ops.get("read", 0)), int(ops.get("write", 0))
        return 0, 0

    def totals(self, name: str) -> tuple[int, int]:
        """``(read, write)`` over live processes (no lock, like PBS's ``get_active_operations``)."""
        path, _ = self._paths(name)
        read = write = 0
        with contextlib.suppress(OpFileError):
            for entry in self._read(path):
                epid, estart, ops = entry.get("pid"), entry.get("starttime"), entry.get("active_operations")
                if not (isinstance(epid, int) and isinstance(estart, int) and isinstance(ops, dict)):
                    continue
                if is_alive(epid, estart):
                    read += int(ops.get("read", 0))
                    write += int(ops.get("write", 0))
        return read, write
