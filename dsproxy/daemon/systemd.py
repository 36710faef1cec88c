"""systemd glue: sd_notify, socket activation, journald logging (docs/design.md §7).

* :func:`notify` sends ``READY=1``, ``RELOADING=1``, ``STATUS=...`` etc. to ``$NOTIFY_SOCKET`` with
  ``systemd.daemon.notify`` (systemd-python) when it is installed, else with the same datagram
  itself (the protocol is one ``sendto`` of ``KEY=VALUE`` lines; ``@`` means the abstract
  namespace).  Only the proxy master and the manager notify (``NotifyAccess=main``).
* :func:`listen_fds` returns the sockets systemd passed (``LISTEN_PID``/``LISTEN_FDS``, fds from 3)
  and unsets the variables so that children do not take them for their own.
* :func:`setup_logging` logs to journald (:class:`JournalFieldsHandler`: priority, identifier and
  structured ``DSPROXY_*`` fields such as the role, worker pid and loaded generation) when stderr
  *is* the journal (``$JOURNAL_STREAM`` names stderr's device:inode), else to stderr with
  timestamps.
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


#: the journal's priorities (syslog levels) for the logging levels
_PRIORITIES = ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3))
#: role of each process, by its log identifier: a journal field, so ``journalctl DSPROXY_ROLE=worker``
_ROLES = {"dsproxy-proxy": "master", "dsproxy-worker": "worker", "dsproxy-manager": "manager", "dsproxy-run": "run"}
_log_fields: dict[str, object] = {}


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level (``WARNING`` -> 4)."""
    for level, priority in _PRIORITIES:
        if levelno <= level:
            return priority
    return 2


def set_log_fields(**fields: object) -> None:
    """Journal fields for every later record of this process; a callable is called per record.

    >>> set_log_fields(DSPROXY_GENERATION=lambda: registry.loaded_generation)
    """
    _log_fields.update(fields)


class JournalFieldsHandler(logging.Handler):
    """Records to journald as structured entries.

    Fields: ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``LOGGER``, ``CODE_FILE/LINE/FUNC``,
    this process's :func:`set_log_fields` (``DSPROXY_ROLE``, ``DSPROXY_WORKER_PID``,
    ``DSPROXY_GENERATION``, ...) and the upper-case keys of a record's ``extra`` (``log.warning(...,
    extra={"DSPROXY_STORES": n})``).  Unlike ``systemd.journal.JournalHandler`` it does not send
    every attribute of the record (lower-case names, which journald drops anyway).  ``sender``
    is ``systemd.journal.send`` unless a test injects one.
    """

    def __init__(self, identifier: str, sender: Any = None) -> None:
        super().__init__()
        if sender is None:
            from systemd.journal import send

            sender = send
        self.identifier = identifier
        self.sender = sender

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "PRIORITY": str(journal_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        for key, value in _log_fields.items():
            with contextlib.suppress(Exception):  # a field must never cost the record
                value = value() if callable(value) else value
                if value is not None:
                    fields[key] = str(value)
        fields.update((k, str(v)) for k, v in record.__dict__.items() if k.isupper())
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sender(self.format(record), **self.fields(record))
        except Exception:
            self.handleError(record)


class _PriorityPrefixFormatter(logging.Formatter):
    """``<4>dsproxy.master: ...``: journald reads the priority from the prefix of a stderr line."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{journal_priority(record.levelno)}>{super().format(record)}"


def setup_logging(name: str, verbose: bool = False) -> None:
    """Configure the root logger once per process (journald or stderr).

    Under systemd (stderr is the journal) records go to journald with structured fields
    (:class:`JournalFieldsHandler`); without systemd-python, to stderr with a ``<priority>``
    prefix, which journald understands.  Elsewhere: stderr with timestamps.
    """
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.setLevel(level)
    _log_fields.clear()
    role = _ROLES.get(name)
    if role is not None:
        _log_fields["DSPROXY_ROLE"] = role
    if role == "worker":
        _log_fields["DSPROXY_WORKER_PID"] = os.getpid()
    handler: logging.Handler
    if stderr_is_journal():
        try:
            handler = JournalFieldsHandler(name)
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_PriorityPrefixFormatter("%(name)s: %(message)s"))
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
    from ..fsutil import replace_in

    target = os.fspath(path)
    name = os.path.basename(target)
    try:
        dir_fd = os.open(os.path.dirname(target) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            replace_in(dir_fd, name, f"{os.getpid()}\n".encode(), 0o644)
        finally:
            os.close(dir_fd)
    except OSError as err:
        logging.getLogger("dsproxy.systemd").warning("cannot write the pid file %s: %s", target, err)
        return False
    return True
