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

import os
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
