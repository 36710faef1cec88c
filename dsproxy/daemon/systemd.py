"""systemd glue: sd_notify, socket activation, journald logging (DESIGN §7).

* :func:`notify` sends ``READY=1``, ``RELOADING=1``, ``STATUS=...`` etc. to ``$NOTIFY_SOCKET`` with
  ``systemd.daemon.notify`` (systemd-python) when it is installed, else with the same datagram
  itself (the protocol is one ``sendto`` of ``KEY=VALUE`` lines; ``@`` means the abstract
  namespace).  Only the proxy master and the manager notify (``NotifyAccess=main``).
* :func:`listen_fds` returns the sockets systemd passed (``LISTEN_PID``/``LISTEN_FDS``, fds from 3)
  and unsets the variables so that children do not take them for their own.
* :func:`setup_logging` logs to journald (``systemd.journal.JournalHandler``) when stderr *is* the
  journal (``$JOURNAL_STREAM`` names stderr's device:inode), else to stderr with timestamps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from typing import Any

SD_LISTEN_FDS_START = 3

_sd_daemon: Any = None
with contextlib.suppress(ImportError):  # optional extra: dsproxy[systemd]
    import systemd.daemon

    _sd_daemon = systemd.daemon


def notify(*lines: str) -> bool:
    """Send ``lines`` (``"READY=1"``, ...) to the service manager; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    message = "\n".join(lines)
    if _sd_daemon is not None:
        return bool(_sd_daemon.notify(message))
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), target)
        except OSError:
            return False
    return True


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for (seconds), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


def listen_fds() -> list[socket.socket]:
    """Sockets passed by socket activation (empty if none, or if they were meant for another pid)."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if not count or pid != str(os.getpid()):
        return []
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, True)
        sock = socket.socket(fileno=fd)
        out.append(sock)
    return out


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup_logging(name: str, verbose: bool = False) -> None:
    """Configure the root logger once per process (journald or stderr)."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    if stderr_is_journal():
        try:
            from systemd.journal import JournalHandler

            root.addHandler(JournalHandler(SYSLOG_IDENTIFIER=name))
            return
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"))
    root.addHandler(handler)


def write_pid_file(path: os.PathLike[str]) -> bool:
    """``path`` holds this process's pid (replaced atomically); False (logged) if it cannot be written.

    The run dir is group-writable under systemd, so the temp file is new (``O_EXCL|O_NOFOLLOW``,
    an unpredictable name) and renamed over ``path`` -- a rename replaces a link planted there, it
    never writes through it.  A pid file is informational (systemd tracks the main pid itself), so
    a failure is a warning, not a reason to stop.  (The run dir's own path is the admin's choice and
    is followed; only what is inside it is not trusted.)

    >>> write_pid_file(Path("/run/dsproxy/manager.pid"))
    True
    """
    from ..fsutil import create_temp, write_all

    target = os.fspath(path)
    name = os.path.basename(target)
    try:
        dir_fd = os.open(os.path.dirname(target) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd, tmp = create_temp(dir_fd, f".{name}.tmp", 0o644)
            try:
                try:
                    write_all(fd, f"{os.getpid()}\n".encode())
                    os.fchmod(fd, 0o644)
                finally:
                    os.close(fd)
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
        finally:
            os.close(dir_fd)
    except OSError as err:
        logging.getLogger("dsproxy.systemd").warning("cannot write the pid file %s: %s", target, err)
        return False
    return True
