"""Real manager + proxy processes on a temp base dir, for integration tests.

:class:`Daemons` starts ``python -m dsproxy manager`` and ``... proxy`` (each its own process
group), waits until every worker has booted, and on :meth:`stop` terminates both, kills what is
left, and unlinks the shared memory -- also when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dsproxy.client import Client, wait_for_daemon
from dsproxy.ipc import shm


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Daemons:
    def __init__(self, base: Path, workers: int = 2, stores: int = 5, cache: str = "on", ttl: float = 60.0) -> None:
        self.base = base
        self.run_dir = base / "run"
        self.config_file = base / "etc" / "datastore.cfg"
        self.workers = workers
        self.stores = stores
        self.cache = cache
        self.ttl = ttl
        self.manager: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.logs = base / "logs"

    @property
    def proxy_sock(self) -> str:
        return str(self.run_dir / "proxy.sock")

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dsproxy", "--base-dir", str(self.base), *args]

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115
        return subprocess.Popen(args, stdout=log, stderr=log, env={**os.environ, **(env or {})}, start_new_session=True)

    def start_manager(self, *extra: str) -> None:
        self.manager = self._spawn("manager", self.command("manager", "--demo-stores", str(self.stores), *extra))
        self.wait_socket(self.run_dir / "manager.sock", self.manager)

    def start_proxy(self, *extra: str, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        cmd = args or self.command(
            "proxy", "--workers", str(self.workers), "--cache", self.cache, "--ttl", str(self.ttl), *extra
        )
        self.proxy = self._spawn("proxy", cmd, env)
        self.wait_socket(self.run_dir / "proxy.sock", self.proxy)
        wait_for(lambda: len(self.worker_pids()) == self.workers, what="all workers booted")

    def start(self) -> Daemons:
        self.start_manager()
        self.start_proxy()
        return self

    def wait_socket(self, path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        if not wait_for_daemon(str(path), timeout, proc):
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args!r} exited with {proc.returncode}:\n{self.log_text()}")
            raise AssertionError(f"timed out after {timeout} s waiting for {path} to answer")

    def client(self) -> Client:
        return Client(self.proxy_sock, timeout=30.0)

    def get(self, path: str) -> Any:
        with self.client() as c:
            return c.get(path)

    def node(self) -> dict[str, Any]:
        data: dict[str, Any] = self.get("/api2/json/nodes/localhost/status").data
        return data

    def worker_pids(self) -> set[int]:
        return {w["pid"] for w in self.node()["workers"] if w["booted"]}

    def log_text(self) -> str:
        if not self.logs.exists():
            return ""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.logs.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in (self.proxy, self.manager):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.proxy, self.manager):
            if proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            # whatever is left of the process group (workers of a killed master)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=5)
        shm.unlink(self.run_dir)
