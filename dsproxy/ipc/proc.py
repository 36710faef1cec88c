"""Process identity that survives PID reuse: ``(pid, start time)``.

The start time is field 22 of ``/proc/<pid>/stat`` -- clock ticks since boot, an exact integer
that never drifts with the wall clock (PBS stores the same).  psutil builds its process identity
from the same field but exposes it as a float of epoch seconds; the raw integer is what two
processes can compare for equality, and reading it directly costs ~15 us instead of ~45 us.
Liveness checks run on slow paths only (slot claims, operation totals), never per request.

The pids and start times checked here come from shared memory that other processes can write,
so they are range-checked before any system call sees them: a pid outside ``1..PID_MAX`` is
not alive (``os.kill`` would raise ``OverflowError`` on a u64 such as ``2**64-1``).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import threading
import time
from typing import Final


def _read_pid_max() -> int:
    # 2**22 is PID_MAX_LIMIT on 64-bit Linux, the most /proc/sys/kernel/pid_max can ever be
    # raised to: the bound stays right when an admin raises pid_max while dsproxy runs.
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            return max(int(f.read()), 2**22)
    except (OSError, ValueError):
        return 2**22


#: the largest pid this host can hand out (read once)
PID_MAX: Final = _read_pid_max()
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def valid_pid(pid: int) -> bool:
    """True if ``pid`` is a number the kernel could have handed out."""
    return 0 < pid <= PID_MAX


def start_time_limit(margin: float = 3600.0) -> int:
    """An upper bound of any start time on this host now: ticks since boot, plus ``margin`` s.

    ``/proc/<pid>/stat`` counts the start in ticks of the boot-time clock, so no process can have
    started later than now.
    """
    return int((time.clock_gettime(time.CLOCK_BOOTTIME) + margin) * CLOCK_TICKS)


def _stat_fields(pid: int) -> list[str] | None:
    if not 0 < pid <= PID_MAX:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    close = data.rfind(b")")
    if close < 0:
        return None
    return data[close + 2 :].decode("ascii", "replace").split()


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or ``None`` if it does not exist."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])


def is_alive(pid: int, start: int) -> bool:
    """True if ``pid`` runs, is not a zombie, and is the process that started at ``start``.

    Any ``pid`` is accepted (garbage from shared memory included): one outside ``1..PID_MAX`` is
    simply not alive.
    """
    if not 0 < pid <= PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return False
    return fields[0] not in ("Z", "X") and fields[19] == str(start)


#: pidfds a :class:`Liveness` keeps open at most (a segment has 128 slots: two segments' worth)
LIVENESS_FDS: Final = 256


class Liveness:
    """Which processes, each known by ``(pid, start time)``, still run -- and a signal that cannot
    reach a process that reused a pid: one *pidfd* per process (Linux 5.3+), opened once and polled
    together (a pidfd is readable once its process has exited, a zombie included).

    :func:`is_alive` is a ``kill(0)`` and a ``/proc`` read per process, ~30 us each: the fleet
    manager looked at its slots dozens of times per config write (until its workers serve it, to
    sum the operations of stores in transition, to nudge the workers) and those looks were a fifth
    of its CPU at 1,000 stores (py-spy, bench-fleet).  Here a look is one ``poll`` of every pidfd.

    A pidfd is opened for a ``(pid, start)`` only after :func:`is_alive` confirmed it (the pid
    now belongs to the process that started then), so it never names another process.  Without
    pidfds (an older kernel, a seccomp filter) every look falls back to :func:`is_alive`.  Only the
    manager keeps one: at most :data:`LIVENESS_FDS` fds, each closed once its process has exited.
    """

    def __init__(self) -> None:
        self._fds: dict[tuple[int, int], int] = {}
        self._supported = hasattr(os, "pidfd_open")
        # the manager's loop and its writer thread both look: no fd closed while another uses it
        self._lock = threading.Lock()

    def alive(self, procs: list[tuple[int, int]]) -> set[tuple[int, int]]:
        """Those of ``procs`` (``(pid, start)`` pairs, garbage allowed) whose process runs."""
        with self._lock:
            return self._alive(procs)

    def _alive(self, procs: list[tuple[int, int]]) -> set[tuple[int, int]]:
        out: set[tuple[int, int]] = set()
        polled: dict[int, tuple[int, int]] = {}
        for key in procs:
            fd = self._fds.get(key)
            if fd is None:
                fd = self._open(*key)
            if fd is None:  # no pidfd to be had
                if is_alive(*key):
                    out.add(key)
            elif fd >= 0:
                polled[fd] = key
        if not polled:
            return out
        poller = select.poll()
        for fd in polled:
            poller.register(fd, select.POLLIN)
        exited = {fd for fd, _ in poller.poll(0)}
        for fd, key in polled.items():
            if fd in exited:
                self._drop(key)
            else:
                out.add(key)
        return out

    def signal(self, pid: int, start: int, sig: int) -> bool:
        """Send ``sig`` to the process ``(pid, start)`` if it runs; whether it was sent."""
        with self._lock:
            return self._signal(pid, start, sig)

    def _signal(self, pid: int, start: int, sig: int) -> bool:
        fd = self._fds.get((pid, start))
        if fd is None:
            fd = self._open(pid, start)
        if fd is None:  # no pidfd to be had: the check, then kill (a pid reused in between: rare)
            if not is_alive(pid, start):
                return False
            try:
                os.kill(pid, sig)
            except OSError:
                return False
            return True
        if fd < 0:
            return False
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            self._drop((pid, start))
            return False
        except OSError:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _open(self, pid: int, start: int) -> int | None:
        """A pidfd for ``(pid, start)``, kept; -1 if that process does not run; None if no pidfd
        can be had (none on this kernel, or out of fds): the caller looks the slow way."""
        if not self._supported:
            return None
        if not is_alive(pid, start):
            return -1
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return -1
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                self._supported = False  # ENOSYS, or a seccomp filter's EPERM: for good
            return None
        if not is_alive(pid, start):  # died (and maybe reused) between the check and the open
            os.close(fd)
            return -1
        if len(self._fds) >= LIVENESS_FDS:
            os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[(pid, start)] = fd
        return fd

    def _drop(self, key: tuple[int, int]) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)
