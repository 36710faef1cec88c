"""``dsproxy run``: manager + proxy in the foreground for local use (Ctrl-C stops both).

:class:`DaemonPair` starts both as child processes of this one (``python -m dsproxy ... manager|
proxy``), the manager first; the proxy starts once ``manager.sock`` answers, so the demo datastores
exist before the first worker loads the config, and :meth:`DaemonPair.start_proxy` returns once
every worker has booted.  Leaving the ``with`` block stops both (proxy first: its draining workers
may still forward a write), kills what is left and, unless told otherwise, unlinks the shared
memory -- also when the block raised.  ``dsproxy run`` is that pair in the foreground: if either
child exits, the other is stopped and ``run`` exits with the failed child's status.  The tests,
benchmarks and the stress run use the same pair (:mod:`dsproxy.testing.daemons`).

    with DaemonPair(Paths.resolve("/tmp/x"), log_dir=Path("/tmp/x/logs")) as pair:
        pair.start_manager("--demo-stores", "5")
        pair.start_proxy("--workers", "2", workers=2)
        ...  # talk to /tmp/x/run/proxy.sock
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..client import ApiError, Client, wait_for_daemon
from ..ipc import shm
from ..paths import Paths
from . import systemd

log = logging.getLogger("dsproxy.run")

API = "/api2/json"


class DaemonFailed(RuntimeError):
    """A daemon exited or did not answer in time while starting; the message says which (and its log)."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.code = code


class DaemonPair:
    """A manager and a proxy on ``paths`` as child processes; a context manager (see the module).

    ``log_dir``: each daemon appends its output to ``<log_dir>/<manager|proxy>.log`` (None: this
    process's stdout/stderr).  ``new_session``: each child leads its own process group, so that
    :meth:`stop` can kill what is left of it (the workers of a killed master); ``dsproxy run``
    keeps them in its group instead, where a terminal's Ctrl-C reaches them.
    """

    def __init__(
        self,
        paths: Paths,
        *,
        log_dir: Path | None = None,
        unlink_shm: bool = True,
        new_session: bool = True,
        ready_timeout: float = 60.0,
    ) -> None:
        self.paths = paths
        self.run_dir = paths.run_dir
        self.log_dir = log_dir
        self.unlink_shm = unlink_shm
        self.new_session = new_session
        self.ready_timeout = ready_timeout
        self.manager: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None

    @property
    def proxy_sock(self) -> str:
        return str(self.run_dir / "proxy.sock")

    @property
    def manager_sock(self) -> str:
        return str(self.run_dir / "manager.sock")

    def command(self, *args: str) -> list[str]:
        """``python -m dsproxy`` on this pair's directories, then ``args`` (``manager ...``)."""
        dirs = ("--config-dir", self.paths.config_dir, "--run-dir", self.run_dir, "--data-dir", self.paths.data_dir)
        return [sys.executable, "-m", "dsproxy", *map(str, dirs), *args]

    # -- starting -------------------------------------------------------------------------------------

    def start_manager(self, *args: str) -> None:
        """Start ``dsproxy manager ARGS`` (again, after an earlier one exited) and wait for its socket."""
        self.manager = self._spawn("manager", self.command("manager", *args))
        self._wait_socket("manager", self.manager_sock, self.manager)

    def start_proxy(
        self,
        *args: str,
        workers: int | None = None,
        env: Mapping[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        """Start ``dsproxy proxy ARGS`` (or ``command``, e.g. under ``systemd-socket-activate``) and
        wait until it answers and, with ``workers``, until that many workers have booted."""
        self.proxy = self._spawn("proxy", command or self.command("proxy", *args), env)
        self._wait_socket("proxy", self.proxy_sock, self.proxy)
        if workers is not None:
            self.wait_workers(workers)

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, **env} if env else None
        if self.log_dir is None:
            return subprocess.Popen(args, env=full_env, start_new_session=self.new_session)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:  # the child keeps its own copy
            return subprocess.Popen(args, stdout=out, stderr=out, env=full_env, start_new_session=self.new_session)

    def _wait_socket(self, name: str, sock: str, proc: subprocess.Popen[bytes]) -> None:
        if wait_for_daemon(sock, self.ready_timeout, proc):
            return
        code = proc.poll()
        if code is not None:
            raise DaemonFailed(f"the {name} ({proc.args!r}) exited with {code}{self._logs()}", code)
        raise DaemonFailed(f"the {name} did not answer on {sock} within {self.ready_timeout:g} s{self._logs()}", None)

    def wait_workers(self, count: int) -> None:
        """Wait until ``count`` workers have booted (or the proxy is degraded: it then has no slots)."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            with contextlib.suppress(OSError, ApiError):
                node = self.node()
                if len(self.booted_workers(node)) >= count or node["degraded"]:
                    return
            code = None if self.proxy is None else self.proxy.poll()
            if code is not None:
                raise DaemonFailed(f"the proxy exited with {code}{self._logs()}", code)
            if time.monotonic() > deadline:
                raise DaemonFailed(f"{count} workers not booted after {self.ready_timeout:g} s{self._logs()}", None)
            time.sleep(0.02)

    # -- asking the proxy -----------------------------------------------------------------------------

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.proxy_sock, timeout=timeout)

    def node(self) -> dict[str, Any]:
        """``GET /nodes/localhost/status`` of one worker (its ``workers`` list covers them all)."""
        with self.client() as c:
            data: dict[str, Any] = c.get(f"{API}/nodes/localhost/status").raise_for_status().data
        return data

    @staticmethod
    def booted_workers(node: Mapping[str, Any]) -> list[int]:
        return [w["pid"] for w in node["workers"] if w["booted"]]

    def exited(self) -> tuple[str, int] | None:
        """``(name, status)`` of a started daemon that has exited, if one has."""
        for name, proc in (("manager", self.manager), ("proxy", self.proxy)):
            if proc is not None and proc.poll() is not None:
                return name, proc.returncode
        return None

    def log_text(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of each daemon's log (empty without ``log_dir``)."""
        if self.log_dir is None or not self.log_dir.exists():
            return ""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def _logs(self) -> str:
        text = self.log_text()
        return f":\n{text}" if text else ""

    # -- stopping -------------------------------------------------------------------------------------

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the proxy, then the manager; SIGKILL what is left; unlink the shared memory."""
        for proc in (self.proxy, self.manager):
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
            if self.new_session:  # whatever is left of its process group (workers of a killed master)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        if self.unlink_shm:
            shm.unlink(self.run_dir)

    def __enter__(self) -> DaemonPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(paths: Paths, manager_args: list[str], proxy_args: list[str], ready_timeout: float = 60.0) -> int:
    systemd.setup_logging("dsproxy-run")
    paths.ensure()
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.append(s))
    # the segment outlives a run, as it outlives a daemon under systemd
    with DaemonPair(paths, unlink_shm=False, new_session=False, ready_timeout=ready_timeout) as pair:
        try:
            pair.start_manager(*manager_args)
            pair.start_proxy(*proxy_args, workers=_workers(proxy_args))
        except DaemonFailed as err:
            log.error("%s", err)
            return err.code or 1
        print(
            f"dsproxy running: proxy {pair.proxy_sock}, manager {pair.manager_sock} (Ctrl-C stops both)",
            file=sys.stderr,
            flush=True,
        )
        while not stop:
            failed = pair.exited()
            if failed is not None:
                log.error("%s exited with status %d; stopping", *failed)
                return failed[1] or 1
            time.sleep(0.2)
        return 0


def _workers(proxy_args: list[str]) -> int | None:
    """The ``--workers N`` among ``proxy_args`` (``dsproxy run`` always passes it)."""
    with contextlib.suppress(ValueError, IndexError):
        return int(proxy_args[proxy_args.index("--workers") + 1])
    return None


__all__ = ["DaemonFailed", "DaemonPair", "run"]
